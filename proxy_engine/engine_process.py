"""The engine core in its own process (the default: ``runtime.engine_process`` / ``PROXY_SERVE_ENGINE_PROCESS``).

``EngineProcess`` is an ``AsyncEngine`` (same interface, same streams) whose ``ProxyEngine`` runs in a child
process started with ``spawn``: the step loop no longer shares a GIL with the HTTP event loop, and its intra-op
team may use every core (the child's default; an explicit ``cpu_threads`` / ``OMP_NUM_THREADS`` wins).

One duplex pipe carries everything. To the child: ``add`` (render, validate and queue, answered with
``reply``), ``tokenize`` (answered), ``abort``, ``stop``. To the parent: ``ready`` (model info and the
tokenizer, kept here for ``detokenize``) or ``failed``; ``step`` (one step's outputs and the stats after it,
once per step, as ``AsyncEngine._dispatch`` receives them); ``reply``; ``fatal``. A reply is sent under the
same lock as steps, after the request is queued, so it always precedes that request's first outputs; the
stream is registered before the request is sent, so no output can miss it. If the child dies (a crash, a
kill, the OOM killer) the pipe closes and every open stream ends with an error, as with a crashed step thread.
A message this process cannot unpickle (the two run different code, as after files changed under a running
server) is such an end too, and stops the child; an error reply of a class this process lacks keeps its text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from typing import Any

from proxy_engine.async_engine import (
    AsyncEngine,
    EngineStats,
    ModelInfo,
    RequestStream,
    _in_daemon_thread,
    admitted,
    check_logprob_entries,
    constrained_render_pool,
    engine_stats,
    make_request_sequences,
)
from proxy_engine.config import EngineConfig, ExpertPairConfig
from proxy_engine.request import EngineOverloadedError, PromptInput, PromptTokens, SamplingParams, Target

log = logging.getLogger("proxy_engine")

_STOP_WAIT_S = 10.0
_CALL_TIMEOUT_S = 120.0


def _error_payload(error: BaseException) -> tuple[bytes | None, str]:
    """An exception as the pickled (class, args, attributes), rebuilt without calling ``__init__`` (exceptions
    whose ``__init__`` takes other arguments than ``args``, ``ContextLengthError``'s ``param``, do not unpickle),
    and its text: what the caller gets where the class cannot be pickled here or read there."""
    text = f"{type(error).__name__}: {error}"
    try:
        return pickle.dumps((type(error), error.args, dict(vars(error)))), text
    except Exception:  # noqa: BLE001 - an unpicklable class or attribute: its name and message still say it
        return None, text


def _rebuild_error(payload: tuple[bytes | None, str]) -> BaseException:
    pickled, text = payload
    try:
        cls, args, attributes = pickle.loads(pickled)
    except Exception:  # noqa: BLE001 - None, or a class this process lacks (its code changed under the server)
        return RuntimeError(text)
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(attributes)
    return error


class EngineProcess(AsyncEngine):
    """``AsyncEngine``'s interface over a ``ProxyEngine`` in a child process (see the module docstring)."""

    def __init__(self, config: EngineConfig, *, idle_wait_s: float = 0.5) -> None:
        super().__init__(config, idle_wait_s=idle_wait_s)
        self.process: multiprocessing.process.BaseProcess | None = None
        self.tokenizer = None  # the base's tokenizer, for detokenize (None: ask the child)
        self._conn = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._stats = EngineStats()

    # --- life cycle ------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        alive = self.process is not None and self.process.is_alive() and self._thread is not None
        return self.engine is not None and alive and self.fatal_error is None

    async def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.process = context.Process(target=child_main, args=(child, self.config, self._idle_wait_s),
                                       name="proxy-engine-core", daemon=True)
        self.process.start()
        child.close()
        self._conn = parent
        # Loading takes minutes for big models: wait for the child's first message off the event loop.
        message = await _in_daemon_thread(self._first_message, "proxy-engine-load")
        if message[0] != "ready":
            self.process.join(_STOP_WAIT_S)
            raise RuntimeError(message[1])
        _, self.info, tokenizer_bytes = message
        if tokenizer_bytes is not None:
            self.tokenizer = pickle.loads(tokenizer_bytes)
        self._loop = asyncio.get_running_loop()
        self.engine = self.process  # not None: loaded (server/process.py tells "loading" from "loaded" by it)
        self._thread = threading.Thread(target=self._receive, name="proxy-engine-receive", daemon=True)
        self._thread.start()
        log.info("engine process %d ready: max_model_len %d", self.process.pid, self.info.max_model_len)

    def _first_message(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return ("failed", f"the engine process exited while loading (exit code {self.process.exitcode})")

    async def shutdown(self) -> None:
        self._stopping = True
        self._send(("stop",))
        if self.process is not None:
            await asyncio.to_thread(self.process.join, _STOP_WAIT_S)
            if self.process.is_alive():
                self.process.kill()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _STOP_WAIT_S)

    # --- requests --------------------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: PromptInput | list[PromptInput],
        params: SamplingParams,
        target: Target = Target.PROXY,
        *,
        max_logprob_entries: int | None = None,
    ) -> RequestStream:
        self._require_engine()
        prompts = self._admissible(request_id, prompt, params)
        # Registered before the child sees the request: its outputs may be dispatched before this task resumes.
        stream = RequestStream(request_id, len(prompts) * params.n, 0)
        self._streams[request_id] = stream
        try:
            stream.prompt_tokens, stream.prompt_ids = await asyncio.wrap_future(
                self._call("add", request_id, prompts, params, target, max_logprob_entries)
            )
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if self.engine is not None and request_id in self._streams:
            self._send(("abort", request_id))

    async def add_pair(self, pair: ExpertPairConfig, replace: bool = False) -> list[ExpertPairConfig]:
        self._require_engine()
        return await asyncio.wrap_future(self._call("add_pair", pair, replace))

    async def remove_pair(self, name: str) -> list[ExpertPairConfig]:
        self._require_engine()
        return await asyncio.wrap_future(self._call("remove_pair", name))

    def stats(self) -> EngineStats:
        return self._stats  # as of the child's last step (sent with its outputs)

    def tokenize(self, prompt: PromptInput, target: Target = Target.PROXY) -> list[int]:
        self._require_engine()
        return self._call("tokenize", prompt, target).result(_CALL_TIMEOUT_S)

    def prompt_tokens(self, prompt: PromptInput, target: Target = Target.PROXY) -> PromptTokens:
        self._require_engine()
        return self._call("prompt_tokens", prompt, target).result(_CALL_TIMEOUT_S)

    def detokenize(self, token_ids: list[int]) -> str:
        self._require_engine()
        if any(not 0 <= t < self.info.vocab_size for t in token_ids):
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size})")
        if self.tokenizer is not None:
            return self.tokenizer.decode(token_ids)
        return self._call("detokenize", token_ids).result(_CALL_TIMEOUT_S)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id's piece of the vocabulary as the tokenizer stores it (``▁Hello``, ``ĠHello``)."""
        self._require_engine()
        if self.tokenizer is not None:
            return self.tokenizer.convert_ids_to_tokens(token_ids)
        return self._call("token_strings", token_ids).result(_CALL_TIMEOUT_S)

    # --- the pipe --------------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> bool:
        if self._conn is None:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # the child is gone: the receiver reports it
            return False

    def _call(self, kind: str, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        if self.fatal_error is not None or not self._send((kind, call_id, *args)):
            self._calls.pop(call_id, None)
            future.set_exception(EngineOverloadedError("the engine has stopped", retry_after_s=5))
        return future

    def _receive(self) -> None:
        """The receiver thread: routes the child's messages until the pipe closes."""
        message: tuple = ("eof",)
        try:
            while True:
                try:
                    data = self._conn.recv_bytes()
                except (EOFError, OSError):
                    message = ("eof",)
                    break
                try:
                    message = pickle.loads(data)
                except Exception as error:  # noqa: BLE001 - a class this process lacks: no stream can be trusted
                    message = ("unreadable", f"{type(error).__name__}: {error}")
                    break
                kind = message[0]
                if kind == "step":
                    _, outputs, self._stats = message
                    if outputs:
                        self._loop.call_soon_threadsafe(self._dispatch, outputs)
                elif kind == "stats":
                    self._stats = message[1]
                elif kind == "reply":
                    _, call_id, ok, value = message
                    future = self._calls.pop(call_id, None)
                    if future is not None:
                        if ok:
                            future.set_result(value)
                        else:
                            future.set_exception(_rebuild_error(value))
                elif kind == "fatal":
                    break
        finally:
            self._child_gone(message)

    def _child_gone(self, message: tuple) -> None:
        if message[0] == "fatal":
            error: BaseException = RuntimeError(f"the engine process failed: {message[1]}")
        elif message[0] == "unreadable":  # the child runs on: stop it, or it keeps the models' memory
            error = RuntimeError(f"the engine process sent a message this process cannot read ({message[1]}): the "
                                 "two run different code, as after files changed under a running server; restart it")
            self.process.kill()
        elif self._stopping:
            return
        else:
            self.process.join(1.0)
            error = RuntimeError(f"the engine process exited (exit code {self.process.exitcode})")
        log.error("%s", error)
        self.fatal_error = error
        self._stopping = True
        for call_id in list(self._calls):
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(EngineOverloadedError("the engine has stopped", retry_after_s=5))
        try:
            self._loop.call_soon_threadsafe(self._fail_all, f"the engine stopped: {error}")
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass


# --- the child -------------------------------------------------------------------------------------------------
def _child_config(config: EngineConfig) -> EngineConfig:
    """Every core for the intra-op team unless the deployer chose: no event loop shares this process."""
    if config.runtime.cpu_threads or os.environ.get("OMP_NUM_THREADS"):
        return config
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return config.model_copy(update={"runtime": config.runtime.model_copy(update={"cpu_threads": cores})})


class _Child:
    """The engine side: the step loop (as ``AsyncEngine._steps``) and the pipe reader, on two threads."""

    def __init__(self, conn, engine, idle_wait_s: float) -> None:
        self.conn, self.engine, self.idle_wait_s = conn, engine, idle_wait_s
        self.send_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        # Rendering a long prompt takes a while: off the reader, so that aborts are not held up behind it.
        self.workers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="proxy-engine-render")
        # A request with an output constraint waits for the grammar compiler: never in the pool above.
        self.constrained = constrained_render_pool()

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def steps(self) -> None:
        engine = self.engine
        try:
            while not self.stopping:
                if not engine.has_work():
                    self.wake.wait(self.idle_wait_s)
                    self.wake.clear()
                    continue
                outputs = engine.step()
                try:
                    self.send(("step", outputs, engine_stats(engine)))
                except OSError:  # the pipe closed: the API process is gone, no one to tell
                    return
        except BaseException as error:  # noqa: BLE001 - the engine's own guards failed: stop loudly
            log.exception("the engine step loop crashed")
            try:
                self.send(("fatal", f"{type(error).__name__}: {error}"))
            finally:
                os._exit(1)

    def add(self, call_id: int, request_id: str, prompts: list[PromptInput], params: SamplingParams,
            target: Target, max_logprob_entries: int | None) -> None:
        engine = self.engine
        try:
            sequences = make_request_sequences(engine, request_id, prompts, params, target)
            check_logprob_entries(sequences, params, max_logprob_entries)
            with self.send_lock:  # the reply goes out before any of the request's outputs can
                engine.add(sequences)
                self.conn.send(("reply", call_id, True, admitted(sequences, params)))
        except Exception as error:  # noqa: BLE001 - handed to the caller
            self.send(("reply", call_id, False, _error_payload(error)))
            return
        self.wake.set()

    def change(self, call_id: int, function, *args) -> None:
        """Answer with the outcome of a change to the expert pairs, once the step thread has taken it up."""
        def changed():
            future = function(*args)  # loads on this thread
            self.wake.set()
            return future.result()

        self.answer(call_id, changed)

    def answer(self, call_id: int, function, *args) -> None:
        try:
            value = function(*args)
        except Exception as error:  # noqa: BLE001 - handed to the caller
            self.send(("reply", call_id, False, _error_payload(error)))
        else:
            self.send(("reply", call_id, True, value))

    def read(self) -> None:
        """Serve the pipe until ``stop`` or until it closes (the API process is gone); then stop the step loop."""
        try:
            self._read()
        finally:
            self.stopping = True
            self.wake.set()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the API process is gone
                return
            kind = message[0]
            if kind == "add":
                params: SamplingParams = message[4]
                pool = self.workers if params.structured is None else self.constrained
                pool.submit(self.add, *message[1:])
            elif kind == "abort":
                self.engine.abort(message[1])
                self.wake.set()
            elif kind == "tokenize":
                self.workers.submit(self.answer, message[1], self.engine.render, *message[2:])
            elif kind == "prompt_tokens":
                self.workers.submit(self.answer, message[1], self.engine.tokens, *message[2:])
            elif kind == "detokenize":
                self.workers.submit(self.answer, message[1], self.engine.tokenizer.decode, message[2])
            elif kind == "token_strings":
                self.workers.submit(self.answer, message[1], self.engine.tokenizer.convert_ids_to_tokens, message[2])
            elif kind == "add_pair":  # loading takes a while: on a thread of its own (the engine serialises them)
                threading.Thread(target=self.change, args=(message[1], self.engine.add_pair, *message[2:]),
                                 name="proxy-engine-add-pair", daemon=True).start()
            elif kind == "remove_pair":
                self.workers.submit(self.change, message[1], self.engine.remove_pair, message[2])
            elif kind == "stop":
                return


def _thread_lock_for_progress_bars() -> None:
    """tqdm (transformers' "Loading weights" bars) guards its bars with a ``multiprocessing.RLock``: in a spawned
    process that is a named semaphore registered with the resource tracker, which this process never unlinks (it
    ends with ``os._exit``, or is killed), so the tracker warned of "1 leaked semaphore objects" after every
    shutdown. No other process shares this one's bars: a thread lock is enough, and leaves nothing behind."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def child_main(conn, config: EngineConfig, idle_wait_s: float) -> None:
    """The child process's entry point: load, report ``ready`` (or ``failed``), then serve the pipe."""
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's control-group kill, a supervisor's
    # killpg), reach this process too: the API process drains and then sends "stop" (or exits, which closes
    # the pipe); the engine must keep serving the running requests meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    _thread_lock_for_progress_bars()
    try:
        from proxy_engine.engine import ProxyEngine
        from proxy_engine.loader import load_models

        config = _child_config(config)
        engine = ProxyEngine(load_models(config), config)
        info = ModelInfo.of(engine, config)
        try:
            tokenizer_bytes = pickle.dumps(engine.tokenizer)
        except Exception:  # noqa: BLE001 - not picklable: the parent asks for each detokenize instead
            tokenizer_bytes = None
    except BaseException as error:  # noqa: BLE001 - reported to the parent in one line
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        conn.close()
        return
    conn.send(("ready", info, tokenizer_bytes))
    conn.send(("stats", engine_stats(engine)))  # before any step: the running cap the server's admission counts
    serve_child(conn, engine, idle_wait_s)
    logging.shutdown()
    os._exit(0)  # skip the interpreter's teardown of torch and the models (seconds)


def serve_child(conn, engine, idle_wait_s: float) -> None:
    """Step ``engine`` on the calling thread, the one that loaded it, while another thread reads the pipe;
    return once ``stop`` came or the pipe closed, and the step in progress has finished.

    Why the loading thread steps: an OpenMP team belongs to the thread that starts it, and loading (copies,
    fusing and packing weights) starts one in this thread, which lives on. Stepping on a second thread started
    a second team: libgomp then manages more threads than there are cores and throttles its spin-wait, so the
    team's workers sleep between the step's several hundred small parallel regions and each must be woken.
    On two cores that made the real SmolLM2-135M's one-row step 52 ms instead of 27 (bench/NOTES.md).
    """
    child = _Child(conn, engine, idle_wait_s)
    threading.Thread(target=child.read, name="proxy-engine-read", daemon=True).start()
    child.steps()


def async_engine_for(config: EngineConfig) -> AsyncEngine:
    """The engine the server runs: in this process (default) or in its own (``runtime.engine_process``)."""
    return EngineProcess(config) if config.runtime.engine_process else AsyncEngine(config)
