"""scheduler: the admission budget rule, the queue bound, and the moves between waiting, prefilling, running."""

from __future__ import annotations

from proxy_engine.config import LimitsConfig
from proxy_engine.request import FinishReason, SamplingParams
from proxy_engine.scheduler import MEMORY_GROW_STEPS, Scheduler, has_room, with_running_cap
from proxy_engine.sequence import Sequence, Status


def _sequence(seq_id: int, prompt_len: int, *, prompt_token: int | None = None, request_id: str = "r",
              priority: int = 0) -> Sequence:
    """A sequence whose base prompt is ``prompt_len`` tokens (distinct per seq_id unless ``prompt_token``)."""
    token = seq_id if prompt_token is None else prompt_token
    return Sequence(
        seq_id=seq_id, request_id=request_id, index=0, params=SamplingParams(priority=priority), weights=[1.0],
        prompts={0: [token] * prompt_len}, max_tokens=8, detokenizer=None, generator=None, eos_ids=frozenset(),
    )


def _scheduler(**limits) -> Scheduler:
    return Scheduler(LimitsConfig(**limits))


def test_admission_stops_at_the_padded_token_budget():
    # Left-padded to the longest prompt: 3 prompts of width 10 are 30 tokens; a 4th would make 40 > 32.
    scheduler = _scheduler(max_num_batched_tokens=32)
    scheduler.add([_sequence(i, 10) for i in range(5)])
    assert [s.seq_id for s in scheduler.admit()] == [0, 1, 2]
    assert [s.seq_id for s in scheduler.waiting] == [3, 4]


def test_a_long_prompt_widens_every_row_of_the_group():
    scheduler = _scheduler(max_num_batched_tokens=32)
    scheduler.add([_sequence(0, 4), _sequence(1, 20)])  # 2 rows x 20 columns = 40 > 32
    assert [s.seq_id for s in scheduler.admit()] == [0]


def test_the_first_waiting_sequence_is_admitted_whatever_its_length():
    scheduler = _scheduler(max_num_batched_tokens=16)
    scheduler.add([_sequence(0, 500), _sequence(1, 2)])
    assert [s.seq_id for s in scheduler.admit()] == [0]  # its prefill is chunked


def test_a_shared_prompt_costs_nothing_more():
    # The n choices of a request (same prompt) are prefilled once: they do not count against the budget.
    scheduler = _scheduler(max_num_batched_tokens=16)
    scheduler.add([_sequence(i, 10, prompt_token=7) for i in range(4)] + [_sequence(9, 10)])
    assert [s.seq_id for s in scheduler.admit()] == [0, 1, 2, 3]


def test_a_prompt_with_a_cached_prefix_is_not_prefilled_beside_one_that_would_throw_its_hit_away():
    """A group's prefill starts at its lowest uncached column: a warm prompt beside a cold one would recompute its
    cached columns. So the group ends where a newcomer would throw a block or more of a cached prefix away (its own
    or the group's); it heads the next group (first come, first served). Cold prompts batch as before."""
    hits = {0: 64, 1: 0, 2: 0, 3: 64, 4: 60}  # tokens of each prompt found in the prefix cache

    def admitted(order: list[int], lengths: dict[int, int] | None = None) -> list[list[int]]:
        scheduler = _scheduler(max_num_batched_tokens=4096)
        scheduler.add([_sequence(i, (lengths or {}).get(i, 80)) for i in order])
        groups = []
        while scheduler.waiting:
            groups.append([s.seq_id for s in scheduler.admit(cached=lambda s: hits[s.seq_id], block=16)])
            scheduler.promote(scheduler.prefilling)
        return groups

    assert admitted([0, 1, 2]) == [[0], [1, 2]]  # the warm one alone, then the cold ones together
    assert admitted([1, 2, 0]) == [[1, 2], [0]]
    assert admitted([0, 3]) == [[0, 3]]  # equal hits: nothing thrown away
    assert admitted([0, 4]) == [[0, 4]]  # 4 fewer cached columns than 0's hit: less than a block
    assert admitted([0, 3], {0: 80, 3: 200}) == [[0], [3]]  # left-padding moves 0's cached columns past 3's
    scheduler = _scheduler(max_num_batched_tokens=4096)
    scheduler.add([_sequence(i, 80) for i in (0, 1)])
    assert [s.seq_id for s in scheduler.admit()] == [0, 1]  # no cache: as before


def test_admission_stops_at_the_free_batch_slots():
    scheduler = _scheduler(max_num_seqs=3)
    scheduler.add([_sequence(i, 2) for i in range(5)])
    first = scheduler.admit()
    assert len(first) == 3 and all(s.status is Status.PREFILLING for s in first)
    assert scheduler.admit() == []  # three in the batch already
    first[0].finish(FinishReason.ABORT)
    assert [s.seq_id for s in scheduler.admit()] == [3]  # a finished one no longer holds its slot


def test_the_priority_policy_admits_lower_priority_values_first_then_by_arrival():
    scheduler = _scheduler(max_num_seqs=2, scheduling_policy="priority")
    scheduler.add([_sequence(0, 2, priority=5), _sequence(1, 2, priority=0)])
    scheduler.add([_sequence(2, 2, priority=-1), _sequence(3, 2, priority=0), _sequence(4, 2, priority=5)])
    assert [s.seq_id for s in scheduler.waiting] == [2, 1, 3, 0, 4]
    assert [s.seq_id for s in scheduler.admit()] == [2, 1]
    scheduler.add([_sequence(5, 2, priority=-3)])  # a late urgent request goes ahead of all that wait
    assert [s.seq_id for s in scheduler.waiting] == [5, 3, 0, 4]
    assert scheduler.admit() == []  # the batch is full: admission alone takes no slot (preempt does)


def _running(scheduler: Scheduler, sequences: list[Sequence]) -> None:
    scheduler.add(sequences)
    scheduler.promote(scheduler.admit())
    assert scheduler.running == sequences


def test_a_more_urgent_waiting_sequence_preempts_the_least_urgent_running_one():
    scheduler = _scheduler(max_num_seqs=3, scheduling_policy="priority")
    calm, idle, later_idle = _sequence(0, 2, priority=1), _sequence(1, 2, priority=7), _sequence(2, 2, priority=7)
    _running(scheduler, [calm, idle, later_idle])
    later_idle.output_ids = [11, 12]  # it has generated two tokens
    version = scheduler.running_version
    scheduler.add([_sequence(3, 2, priority=7), _sequence(4, 2, priority=0)])
    victims = scheduler.preempt()
    # Only the urgent one (priority 0) preempts; of the two at 7 the later arrival goes; nothing waits at 7 < 7.
    assert victims == [later_idle] and later_idle.status is Status.WAITING and later_idle.preemptions == 1
    assert scheduler.running == [calm, idle] and scheduler.running_version != version
    assert [s.seq_id for s in scheduler.waiting] == [4, 2, 3]  # back in priority order, by its first arrival
    assert scheduler.preemptions_total == 1
    readmitted = scheduler.admit()
    assert [s.seq_id for s in readmitted] == [4]
    assert later_idle.context_ids(0) == [2, 2, 11, 12]  # it resumes on its prompt and what it had generated


def test_preemption_uses_free_slots_first_and_never_takes_an_equally_urgent_slot():
    scheduler = _scheduler(max_num_seqs=3, scheduling_policy="priority")
    running = [_sequence(0, 2, priority=2), _sequence(1, 2, priority=2)]
    _running(scheduler, running)
    scheduler.add([_sequence(2, 2, priority=0), _sequence(3, 2, priority=1), _sequence(4, 2, priority=2)])
    victims = scheduler.preempt()  # seq 2 takes the free slot, seq 3 one victim's, seq 4 none (2 is not < 2)
    assert [s.seq_id for s in victims] == [1]
    assert scheduler.preempt() == []  # nothing more is owed until the next admission


def test_first_come_first_served_never_preempts():
    scheduler = _scheduler(max_num_seqs=1)
    _running(scheduler, [_sequence(0, 2)])
    scheduler.add([_sequence(1, 2)])
    assert scheduler.preempt() == [] and scheduler.preemptions_total == 0


def test_first_come_first_served_ignores_the_order_of_priorities():
    scheduler = _scheduler()  # fcfs, the default (the engine refuses a priority other than 0 under it)
    scheduler.add([_sequence(0, 2, priority=5), _sequence(1, 2, priority=0)])
    assert [s.seq_id for s in scheduler.waiting] == [0, 1]


def test_promote_runs_the_survivors_and_retire_drops_the_finished():
    scheduler = _scheduler()
    scheduler.add([_sequence(i, 2) for i in range(3)])
    group = scheduler.admit()
    group[1].finish(FinishReason.LENGTH)  # e.g. max_tokens 0: done at its prompt
    version = scheduler.running_version
    scheduler.promote(group)
    assert scheduler.running_version != version  # the engine resyncs its runners' rows
    assert scheduler.prefilling == [] and [s.seq_id for s in scheduler.running] == [0, 2]
    assert all(s.status is Status.RUNNING for s in scheduler.running)
    scheduler.running[0].finish(FinishReason.STOP)
    assert scheduler.in_batch == 1
    version = scheduler.running_version
    scheduler.retire()
    assert [s.seq_id for s in scheduler.running] == [2] and scheduler.running_version != version
    version = scheduler.running_version
    scheduler.retire()
    assert scheduler.running_version == version  # nothing left: no resync


def test_remove_takes_sequences_out_of_every_list():
    scheduler = _scheduler(max_num_seqs=2)
    scheduler.add([_sequence(i, 2, request_id=f"r{i % 2}") for i in range(4)])
    scheduler.promote(scheduler.admit())  # 0 (r0) and 1 (r1) running; 2 (r0) and 3 (r1) waiting
    removed = scheduler.remove(lambda s: s.request_id == "r0")
    assert sorted(s.seq_id for s in removed) == [0, 2]
    assert [s.seq_id for s in scheduler.waiting] == [3] and [s.seq_id for s in scheduler.running] == [1]


def test_the_queue_bound_counts_free_slots_then_max_waiting():
    limits = LimitsConfig(max_num_seqs=4, max_waiting=2)
    assert has_room(limits, count=6, queued=0, in_batch=0)  # 4 slots + 2 waiting
    assert not has_room(limits, count=7, queued=0, in_batch=0)
    assert has_room(limits, count=1, queued=1, in_batch=4)
    assert not has_room(limits, count=2, queued=1, in_batch=4)
    assert has_room(limits, count=2, queued=0, in_batch=9)  # over-full batch: no negative slots


def test_a_running_cap_lowers_max_num_seqs_and_nothing_else():
    limits = LimitsConfig(max_num_seqs=8, max_waiting=3)
    capped = with_running_cap(limits, 5)
    assert capped.max_num_seqs == 5 and capped.max_waiting == 3 and limits.max_num_seqs == 8
    assert with_running_cap(limits, 0) is limits and with_running_cap(limits, 8) is limits  # unknown, or no cap
    assert with_running_cap(limits, 12) is limits  # never raised past the config


def test_out_of_memory_preempts_everything_then_the_cap_halves_and_grows_back():
    scheduler = _scheduler(max_num_seqs=5)
    running = [_sequence(i, 2) for i in range(5)]
    _running(scheduler, running)
    scheduler.add([_sequence(9, 2)])  # came after all of them
    assert scheduler.preempt_all() == running and scheduler.running == []
    assert [s.seq_id for s in scheduler.waiting] == [0, 1, 2, 3, 4, 9]  # back ahead of it, in arrival order
    assert scheduler.memory_cap == 2 and scheduler.batch_limit == 2 and scheduler.preemptions_total == 5
    assert [s.seq_id for s in scheduler.admit()] == [0, 1]
    for cap in (3, 4):
        for _ in range(MEMORY_GROW_STEPS):
            scheduler.decoded()
        assert scheduler.memory_cap == cap
    for _ in range(MEMORY_GROW_STEPS):
        scheduler.decoded()
    assert scheduler.memory_cap is None and scheduler.batch_limit == 5  # back to max_num_seqs: no cap
