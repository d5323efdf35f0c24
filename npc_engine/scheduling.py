"""The generation queue: a worker per conversation the generator can decode at once (one
for a single ``Llama``, one per batch slot), jobs picked with NPC affinity.

This is the one place that decides what runs next. The generator never reorders: with one
worker per slot it is never handed more jobs than it has slots, and it only places each job
in the slot that holds most of that job's prompt. What the generator holds is an input
here (``warm``: the NPCs whose prompts sit in a free slot or the single context), so the
affinity below follows the real cache instead of guessing.

Taking jobs strictly first-in-first-out would make a single context switch NPC on nearly
every turn when many players talk to many NPCs, and every switch re-evaluates the new
NPC's world + persona prefix (about a second per thousand tokens on a small CPU). So a
worker prefers the oldest waiting job for the NPC served last, which keeps that prefix in
the KV cache, and how often the oldest waiting job may be passed over is bounded so that
no conversation starves.

Background jobs (chatter nobody is facing) run only while no foreground job waits.

Order is kept where the protocol promises it: jobs for the same (npc_id, player_id) are
always for the same NPC, among one NPC's jobs the oldest is taken first, and a
conversation's older background job goes before its newer foreground one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Job:
    npc_id: str
    work: Callable[[], Any]
    player_id: str = ""
    background: bool = False
    future: Future[Any] = field(default_factory=Future)
    passed_over: int = 0

    @property
    def conversation(self) -> tuple[str, str]:
        return (self.npc_id, self.player_id)


class GenerationScheduler:
    """Runs submitted jobs on ``workers`` threads (one per conversation the generator can
    decode at once); two jobs of the same conversation never run together."""

    def __init__(
        self,
        *,
        workers: int = 1,
        max_passed_over: int = 6,
        name: str = "npc-generate",
        warm: Callable[[], set[str]] | None = None,
    ) -> None:
        """``warm`` tells which NPCs' prompts the generator holds ready; without it the NPC
        served last is taken to be the warm one."""
        self.max_passed_over = max_passed_over
        self._warm = warm
        self._waiting: list[_Job] = []
        self._running: set[tuple[str, str]] = set()
        self._condition = threading.Condition()
        self._closed = False
        self._last_npc: str | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True)
            for index in range(max(workers, 1))
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        npc_id: str,
        work: Callable[[], Any],
        *,
        player_id: str = "",
        background: bool = False,
    ) -> Future[Any]:
        """Queue ``work`` for ``npc_id``; the future holds its result or exception.

        Background jobs run only while no foreground job waits.
        """
        job = _Job(npc_id, work, player_id, background)
        with self._condition:
            if self._closed:
                raise RuntimeError("the generation scheduler is closed")
            self._waiting.append(job)
            self._condition.notify_all()
        return job.future

    def wait_idle(self, longest: float) -> bool:
        """Block until no line is waiting or being generated, at most ``longest`` s: work
        outside the scheduler (a world tick) yields to lines. Woken by the line's end
        itself, not a poll. Returns whether it is idle (True once closed: shutting down,
        nothing is worth waiting for)."""
        with self._condition:
            return self._condition.wait_for(
                lambda: self._closed or not (self._waiting or self._running), longest
            )

    def close(self, wait: bool = True) -> None:
        """Run what is already queued, then stop the workers."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def pick(self) -> _Job | None:
        """Choose the next job, or None if every waiting job's conversation is running
        (called with the lock held)."""
        ready = [j for j in self._waiting if j.conversation not in self._running]
        if not ready:
            return None
        foreground = [j for j in ready if not j.background]
        eligible = foreground or ready
        oldest = eligible[0]
        chosen = oldest
        warm = self._warm() if self._warm is not None else {self._last_npc}
        if oldest.npc_id not in warm and oldest.passed_over < self.max_passed_over:
            same_npc = next((j for j in eligible if j.npc_id in warm), None)
            if same_npc is not None:
                chosen = same_npc
                oldest.passed_over += 1
        # Order within a conversation beats priority: an older background say of the same
        # (npc, player) goes first.
        chosen = next(j for j in self._waiting if j.conversation == chosen.conversation)
        self._waiting.remove(chosen)
        self._last_npc = chosen.npc_id
        return chosen

    def _run(self) -> None:
        while True:
            with self._condition:
                job = None
                while job is None:
                    if self._closed and not self._waiting:
                        return
                    job = self.pick()
                    if job is None:
                        self._condition.wait()
                self._running.add(job.conversation)
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.work())
                    except BaseException as exc:  # handed to whoever awaits the future
                        job.future.set_exception(exc)
            finally:
                with self._condition:
                    self._running.discard(job.conversation)
                    self._condition.notify_all()
