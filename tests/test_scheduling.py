"""GenerationScheduler: NPC affinity, bounded unfairness, order per NPC, errors."""

from __future__ import annotations

import threading

import pytest

from npc_engine.scheduling import GenerationScheduler


def hold_worker(scheduler: GenerationScheduler, npc_id: str) -> threading.Event:
    """Occupy the worker with a job for ``npc_id``; setting the returned gate frees it."""
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait()

    scheduler.submit(npc_id, hold)
    assert started.wait(10)
    return gate


def run_all(scheduler: GenerationScheduler, jobs: list[tuple[str, str]]) -> list[str]:
    """Queue ``jobs`` (npc, label) while the worker is held, then return the run order."""
    order: list[str] = []
    gate = hold_worker(scheduler, "blocker")
    futures = [
        scheduler.submit(npc, lambda label=label: order.append(label)) for npc, label in jobs
    ]
    gate.set()
    for future in futures:
        future.result(10)
    return order


def test_prefers_the_npc_it_served_last_and_keeps_each_npcs_order() -> None:
    scheduler = GenerationScheduler(max_passed_over=100)
    try:
        scheduler.submit("mara", lambda: None).result(10)
        order = run_all(
            scheduler,
            [("tom", "tom1"), ("mara", "mara1"), ("tom", "tom2"), ("mara", "mara2")],
        )
    finally:
        scheduler.close()
    # The blocker ran last, so "blocker" is the warm NPC: nothing matches; FIFO from there,
    # then the worker stays on tom while tom has work.
    assert order == ["tom1", "tom2", "mara1", "mara2"]


def test_prefers_the_npcs_the_generator_holds_warm() -> None:
    """With the generator's view (free slots holding tom's prompt), tom's jobs go first,
    whoever was served last."""
    scheduler = GenerationScheduler(max_passed_over=100, warm=lambda: {"tom"})
    try:
        order = run_all(
            scheduler,
            [("mara", "mara1"), ("tom", "tom1"), ("mara", "mara2"), ("tom", "tom2")],
        )
    finally:
        scheduler.close()
    assert order == ["tom1", "tom2", "mara1", "mara2"]


def test_the_oldest_job_is_passed_over_a_bounded_number_of_times() -> None:
    scheduler = GenerationScheduler(max_passed_over=2)
    try:
        jobs = [("mara", "mara1"), ("tom", "tom1")] + [("mara", f"mara{i}") for i in range(2, 7)]
        order = run_all(scheduler, jobs)
    finally:
        scheduler.close()
    assert order.index("tom1") == 3  # mara1, then two more mara turns, then tom's turn
    assert [label for label in order if label.startswith("mara")] == [
        f"mara{i}" for i in range(1, 7)
    ]


def test_exceptions_reach_the_caller_and_the_worker_keeps_going() -> None:
    scheduler = GenerationScheduler()
    try:

        def boom() -> None:
            raise ValueError("bad turn")

        with pytest.raises(ValueError, match="bad turn"):
            scheduler.submit("mara", boom).result(10)
        assert scheduler.submit("mara", lambda: 42).result(10) == 42
    finally:
        scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit("mara", lambda: None)


def test_close_runs_what_is_queued() -> None:
    scheduler = GenerationScheduler()
    gate = threading.Event()
    scheduler.submit("mara", gate.wait)
    later = scheduler.submit("tom", lambda: "done")
    gate.set()
    scheduler.close()
    assert later.result(0) == "done"


def test_background_waits_for_foreground_but_keeps_conversation_order() -> None:
    scheduler = GenerationScheduler()
    order: list[str] = []
    gate = hold_worker(scheduler, "x")
    jobs = [
        ("wren", "chatter", "npc", True),
        ("mara", "bg-aria", "aria", True),
        ("tom", "fg-rook", "rook", False),
        ("mara", "fg-aria", "aria", False),
    ]
    futures = [
        scheduler.submit(npc, lambda label=label: order.append(label), player_id=p, background=b)
        for npc, label, p, b in jobs
    ]
    gate.set()
    for future in futures:
        future.result(10)
    scheduler.close()
    # Foreground first; mara/aria's older background say precedes her foreground one.
    assert order == ["fg-rook", "bg-aria", "fg-aria", "chatter"]


def test_workers_run_conversations_together_but_never_one_conversation_twice() -> None:
    scheduler = GenerationScheduler(workers=3)
    running: dict[tuple[str, str], int] = {}
    overlap = {"most": 0, "same_conversation": 0}
    lock = threading.Lock()

    def job(conversation: tuple[str, str]) -> None:
        with lock:
            running[conversation] = running.get(conversation, 0) + 1
            overlap["most"] = max(overlap["most"], sum(running.values()))
            overlap["same_conversation"] = max(overlap["same_conversation"], running[conversation])
        threading.Event().wait(0.05)
        with lock:
            running[conversation] -= 1

    futures = [
        scheduler.submit(npc, lambda c=(npc, player): job(c), player_id=player)
        for npc, player in [("mara", "a"), ("mara", "a"), ("tom", "b"), ("wren", "c")] * 2
    ]
    for future in futures:
        future.result(10)
    scheduler.close()
    assert overlap["most"] >= 2 and overlap["same_conversation"] == 1


def test_wait_idle_returns_when_the_last_line_ends_and_at_once_when_idle() -> None:
    scheduler = GenerationScheduler()
    gates: list[threading.Event] = []
    try:
        assert scheduler.wait_idle(0.0)  # nothing queued: idle at once
        gates.append(hold_worker(scheduler, "mara"))
        waited: list[bool] = []
        waiter = threading.Thread(target=lambda: waited.append(scheduler.wait_idle(30)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # a line is being generated: background work waits
        gates[0].set()
        waiter.join(10)  # woken by the line's end, long before its 30 s
        assert waited == [True]
        gates.append(hold_worker(scheduler, "mara"))
        assert scheduler.wait_idle(0.05) is False  # the longest wait ends it
    finally:
        for gate in gates:
            gate.set()  # a failed assert must not leave close() waiting on a held worker
        scheduler.close()
