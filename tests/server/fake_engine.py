"""A scripted stand-in for ``AsyncEngine`` (same contract, no models): for what a real engine cannot be made
to do on demand, such as failing in the middle of a stream. Each choice yields ``max_tokens`` words."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from proxy_engine import EngineOverloadedError, FinishReason, PromptInput, RequestOutput, SamplingParams, TokenLogprob
from proxy_engine.async_engine import EngineStats, ModelInfo, RequestStream
from proxy_engine.request import Target, TopLogprob


@dataclass
class FakeEngine:
    step_s: float = 0.001
    fail_at_token: int | None = None  # emit FinishReason.ERROR at this token of choice 0
    crash_at_token: int | None = None  # the step loop "dies" here: no more outputs, ready turns False
    max_model_len: int = 64
    ready: bool = False
    aborted: list[str] = field(default_factory=list)
    requests: list[tuple[str, PromptInput, SamplingParams, Target]] = field(default_factory=list)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _admitting: bool = True

    async def start(self) -> None:
        self.info = ModelInfo("base", ["expert"], self.max_model_len, 100, [1.0], [0])
        self.ready = True

    def tokenize(self, prompt: PromptInput, target: Target = Target.PROXY) -> list[int]:
        text = prompt.text if prompt.text is not None else " ".join(m["content"] for m in prompt.messages or [])
        return prompt.token_ids or [ord(c) % 100 for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    async def add_request(self, request_id, prompt, params, target=Target.PROXY, *,
                          max_logprob_entries=None) -> RequestStream:
        if not self._admitting:
            raise EngineOverloadedError("draining", retry_after_s=2)
        params.validate(self.info.vocab_size, 1)
        prompt_len = len(self.tokenize(prompt, target))
        if prompt_len >= self.max_model_len:
            raise ValueError(f"prompt has {prompt_len} tokens, past the context of {self.max_model_len}")
        self.requests.append((request_id, prompt, params, target))
        stream = RequestStream(request_id, params.n, prompt_len)
        self._tasks[request_id] = asyncio.create_task(self._run(stream, params))
        return stream

    async def _run(self, stream: RequestStream, params: SamplingParams) -> None:
        total = params.max_tokens or 8
        for k in range(total):
            await asyncio.sleep(self.step_s)
            if self.crash_at_token == k:
                self.ready = False
                return
            for i in range(params.n):
                if i == 0 and self.fail_at_token == k:
                    stream.queue.put_nowait(RequestOutput.failure(stream.request_id, i, "boom",
                                                                  prompt_tokens=stream.prompt_tokens))
                    continue
                finish = FinishReason.LENGTH if k == total - 1 else None
                logprobs = None
                if params.logprobs is not None:
                    top = [TopLogprob(k, f"w{k}", -0.5)][: params.logprobs]
                    logprobs = [TokenLogprob(k, f"w{k} ", -0.5, top)]
                stream.queue.put_nowait(RequestOutput(
                    request_id=stream.request_id, index=i, new_token_ids=[k], text_delta=f"w{k} ", finish_reason=finish,
                    logprobs=logprobs, prompt_tokens=stream.prompt_tokens, completion_tokens=k + 1))

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    def stats(self) -> EngineStats:
        running = sum(1 for t in self._tasks.values() if not t.done())
        return EngineStats(running=running)

    def stop_admitting(self) -> None:
        self._admitting = False

    async def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
