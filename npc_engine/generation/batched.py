"""Many conversations decoded together: llama.cpp's batch API on one context, one sequence
per conversation slot (continuous batching).

``Llama.create_completion`` serves one sequence at a time, so eight NPCs talking at once
would queue behind each other. Here one worker thread owns a context with ``slots``
sequences: every step it puts the next token of every replying slot and a chunk of any
new prompt into one ``llama_decode`` call, then samples each slot with its own sampler.
A new reply starts while others stream (no queueing behind whole replies), and the
machine does more tokens per second in all.

Each slot keeps its conversation's tokens in the KV cache between turns (prefix reuse),
and a slot given to another conversation first leaves a snapshot of its state in the
shared ``SnapshotCache`` (restored in milliseconds when that conversation comes back).
Prompt evaluation goes in chunks of at most ``PROMPT_BATCH`` tokens per step, so a cancel
frees the slot within one batch.

llama-cpp-python has no batched generation API, hence the hand-written loop over its
low-level bindings (the bindings, sampler chains and state calls are llama.cpp's own).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npc_engine.errors import GenerationError
from npc_engine.generation.base import (
    FinishReason,
    GenerationParams,
    GenerationStats,
    GeneratorFeatures,
    Message,
    RenderedPrompt,
)
from npc_engine.generation.llama import (
    PROMPT_BATCH,
    ChatModel,
    load_llama,
    read_sequence_state,
    restore_best_snapshot,
    should_store_head,
)
from npc_engine.generation.prefix_store import PrefixStore
from npc_engine.generation.snapshots import SnapshotCache, common_prefix_length

DRY_BREAKERS = (b"\n", b":", b'"', b"*")

log = logging.getLogger(__name__)


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back what could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to show now (never part of a stop string)."""
        if self.stopped:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def finish(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


@dataclass
class _Request:
    tokens: list[int]
    params: GenerationParams
    stop: list[str]
    on_text: Callable[[str], None]
    cancel: threading.Event | None
    stats: GenerationStats
    head_tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cells hold
    key: str | None = None  # the conversation whose state it holds
    request: _Request | None = None
    prompt_done: int = 0  # prompt tokens evaluated so far for the current request
    store_head_at: int = 0  # when the prompt reaches this many tokens, store its head
    sampler: object | None = None
    decoder: codecs.IncrementalDecoder | None = None
    matcher: StopMatcher | None = None
    next_token: int | None = None
    produced: int = 0


class BatchedLlamaGenerator:
    """A ``Generator`` that serves up to ``slots`` generations at once from one model."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        chat_format: str | None = None,
        seed: int = -1,
        snapshots: SnapshotCache | None = None,
        heads: PrefixStore | None = None,
        slots: int = 8,
    ) -> None:
        from llama_cpp import llama_cpp as low

        self.threads = n_threads or os.cpu_count() or 1
        # The Llama object holds the weights and renders and tokenizes (ChatModel); its own
        # context is never decoded in, so it gets the smallest one.
        self._llama = load_llama(
            model_path, n_ctx=256, n_threads=self.threads, n_gpu_layers=n_gpu_layers, seed=seed
        )
        self.model = ChatModel(self._llama, model_path, chat_format)
        self.name = model_path.name
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.snapshots = snapshots
        self.heads = heads
        self._low = low
        self.slots = [_Slot(seq_id) for seq_id in range(slots)]
        params = low.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_batch = PROMPT_BATCH + slots
        params.n_ubatch = PROMPT_BATCH + slots
        params.n_seq_max = slots
        params.kv_unified = False  # each slot gets n_ctx cells, as a single context would
        # Flash attention off, as llama-cpp-python's Llama does by default: llama.cpp's
        # "auto" turns it on, which made a warm turn's prompt chunk ~40% slower on CPU.
        params.flash_attn_type = low.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = self.threads
        self._ctx = low.llama_init_from_model(self._llama._model.model, params)
        if not self._ctx:
            raise GenerationError("llama.cpp could not create the batched context")
        self._memory = low.llama_get_memory(self._ctx)
        self._vocab = low.llama_model_get_vocab(self._llama._model.model)
        self._batch = low.llama_batch_init(PROMPT_BATCH + slots, 0, 1)
        self._waiting: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._seed_counter = 0
        self._worker = threading.Thread(target=self._run, name="npc-batch", daemon=True)
        self._worker.start()

    # -- the Generator interface ---------------------------------------------------------

    def render(self, messages: Sequence[Message], shared: int = 0) -> RenderedPrompt:
        return self.model.render(messages, shared)

    def features(self) -> GeneratorFeatures:
        return GeneratorFeatures(len(self.slots), self.warm_keys, self.tokenize)

    def warm_keys(self) -> set[str]:
        """Conversations held by free slots: a job for one of them starts without re-reading
        its prompt (read by the scheduler, which decides what runs next)."""
        return {slot.key for slot in self.slots if slot.key and slot.request is None}

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos)

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        tokens = prompt.tokens if prompt.tokens is not None else self.tokenize(prompt.text)
        stop = list(dict.fromkeys([*prompt.stop, *params.stop]))
        request = _Request(
            list(tokens),
            params,
            stop,
            on_text,
            cancel,
            GenerationStats(len(tokens)),
            head_tokens=prompt.head_tokens,
        )
        with self._wake:
            if self._closed:
                raise GenerationError("the generator is closed")
            self._waiting.append(request)
            self._wake.notify()
        request.done.wait()
        if request.error is not None:
            raise GenerationError(f"generation failed: {request.error}") from request.error
        return request.stats

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join()
        for slot in self.slots:
            self._free_sampler(slot)
        self._low.llama_batch_free(self._batch)
        self._low.llama_free(self._ctx)
        self._llama.close()

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active():
                    self._wake.wait()
                if self._closed:
                    for request in self._waiting:
                        request.error = GenerationError("the generator was closed")
                        request.done.set()
                    self._waiting.clear()
                    return
                admitted = self._admit()
            try:
                for slot, request in admitted:
                    self._start(slot, request)
                self._step()
            except Exception as exc:  # an unexpected failure ends the replies in this batch
                log.exception("batched decode failed")
                for slot in self._active():
                    self._reset_slot(slot)
                    self._finish(slot, "stop", error=exc)

    def _active(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.request is not None]

    def _admit(self) -> list[tuple[_Slot, _Request]]:
        """Give waiting requests free slots, each the one holding most of its prompt. Placement
        only: requests come in the order the scheduler released them, at most one per slot."""
        admitted = []
        free = [slot for slot in self.slots if slot.request is None]
        while self._waiting and free:
            request = self._waiting.pop(0)
            if request.cancel is not None and request.cancel.is_set():
                request.stats.finish_reason = "cancelled"  # dropped while waiting
                request.done.set()
                continue
            wanted = np.asarray(request.tokens, dtype=np.int32)
            best = max(
                free,
                key=lambda s: (
                    common_prefix_length(np.asarray(s.tokens, dtype=np.int32), wanted),
                    s.key == request.params.cache_key,
                    -len(s.tokens),
                ),
            )
            free.remove(best)
            best.request = request  # reserved now, set up outside the lock
            admitted.append((best, request))
        return admitted

    def _start(self, slot: _Slot, request: _Request) -> None:
        low = self._low
        key = request.params.cache_key
        if slot.key is not None and slot.key != key and slot.tokens:
            self._save_slot(slot)  # leaving a conversation: keep it for its return
        wanted = np.asarray(request.tokens, dtype=np.int32)
        kept = common_prefix_length(np.asarray(slot.tokens, dtype=np.int32), wanted)
        held, kept = restore_best_snapshot(
            self.snapshots, low, self._ctx, slot.seq_id, wanted, kept, self.heads
        )
        if held is not None:
            slot.tokens = held.tolist()
            request.stats.restored_snapshot = len(held) > 0
        kept = min(kept, len(request.tokens) - 1)  # the last prompt token gives the logits
        low.llama_memory_seq_rm(self._memory, slot.seq_id, kept, -1)
        slot.tokens = request.tokens[:kept]
        slot.key = key
        slot.prompt_done = kept
        head = request.head_tokens
        stores_head = should_store_head(self.heads, request.tokens, head, kept)
        slot.store_head_at = head if stores_head else 0
        request.stats.cached_tokens = kept
        slot.produced = 0
        slot.next_token = None
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.matcher = StopMatcher(request.stop)
        self._free_sampler(slot)
        # The repetition penalty sees the prompt's tail, as usual; DRY the whole prompt (what
        # the reply must not copy: earlier replies, example lines, the player's words).
        seen = request.tokens if request.params.dry_multiplier > 0 else request.tokens[-64:]
        slot.sampler = self._make_sampler(request.params, seen)

    def _make_sampler(self, params: GenerationParams, recent: list[int]) -> object:
        low = self._low
        chain = low.llama_sampler_chain_init(low.llama_sampler_chain_default_params())
        if params.grammar is not None:
            # Constrained choice: the grammar, then the likeliest token it allows. No
            # penalties, and the prompt is not fed to it (the grammar would parse it).
            grammar = low.llama_sampler_init_grammar(
                self._vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                low.llama_sampler_free(chain)
                raise GenerationError("llama.cpp refused the grammar")
            low.llama_sampler_chain_add(chain, grammar)
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_greedy())
            return chain
        low.llama_sampler_chain_add(
            chain,
            low.llama_sampler_init_penalties(
                self._llama.n_vocab(), 64, params.repeat_penalty, 0.0, 0.0
            ),
        )
        if params.dry_multiplier > 0:
            low.llama_sampler_chain_add(chain, self._dry_sampler(params))
        if params.temperature <= 0:
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_greedy())
        else:  # the order of llama-cpp-python's own chain, so both paths sample alike
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_top_k(params.top_k))
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_top_p(params.top_p, 1))
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_min_p(params.min_p, 1))
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_temp(params.temperature))
            self._seed_counter += 1
            seed = params.seed + self._seed_counter if params.seed >= 0 else 0xFFFFFFFF
            low.llama_sampler_chain_add(chain, low.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for token in recent:
            low.llama_sampler_accept(chain, token)
        return chain

    def _dry_sampler(self, params: GenerationParams) -> object:
        # llama.cpp's default breakers: a match never runs across a line, a quote or a
        # "Name:" label, so a quoted name or a new line starts afresh.
        breakers = (ctypes.c_char_p * len(DRY_BREAKERS))(*DRY_BREAKERS)
        return self._low.llama_sampler_init_dry(
            self._vocab,
            params.dry_multiplier,
            params.dry_base,
            params.dry_allowed_length,
            self.n_ctx,  # the whole conversation
            breakers,
            len(DRY_BREAKERS),
        )

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._low.llama_sampler_free(slot.sampler)
            slot.sampler = None

    def _step(self) -> None:
        """One llama_decode: a token for every replying slot, plus prompt chunks.

        If llama.cpp refuses the batch, each slot's part is tried alone: a slot that fails
        alone ends its own reply (its cells reset), the others go on."""
        plan: list[tuple[_Slot, list[int], bool]] = []  # tokens to add; is it a prompt chunk
        for slot in self._active():
            request = slot.request
            assert request is not None
            if request.cancel is not None and request.cancel.is_set():
                self._finish(slot, "cancelled")
            elif slot.next_token is not None:
                plan.append((slot, [slot.next_token], False))
        budget = PROMPT_BATCH
        for slot in self._active():
            request = slot.request
            assert request is not None
            remaining = len(request.tokens) - slot.prompt_done
            if remaining <= 0 or budget <= 0 or slot.next_token is not None:
                continue
            take = min(remaining, budget)
            if slot.prompt_done < slot.store_head_at:  # stop at the head to store it
                take = min(take, slot.store_head_at - slot.prompt_done)
            plan.append((slot, request.tokens[slot.prompt_done : slot.prompt_done + take], True))
            budget -= take
        if not plan:
            return
        status = self._decode_and_sample(plan)
        if status == 0:
            self._store_heads()
            return
        log.warning("llama_decode returned %s for a batch; retrying each slot alone", status)
        for entry in plan:
            slot = entry[0]
            if slot.request is None:
                continue
            alone = self._decode_and_sample([entry])
            if alone != 0:
                self._reset_slot(slot)
                self._finish(slot, "stop", error=GenerationError(f"llama_decode returned {alone}"))
        self._store_heads()

    def _store_heads(self) -> None:
        """Store the cells of every slot whose prompt just reached its head."""
        if self.heads is None:
            return
        for slot in self._active():
            if slot.store_head_at and len(slot.tokens) == slot.store_head_at:
                slot.store_head_at = 0
                data = read_sequence_state(self._low, self._ctx, slot.seq_id)
                if data is not None:
                    self.heads.put(np.asarray(slot.tokens, dtype=np.int32), data)

    def _decode_and_sample(self, plan: list[tuple[_Slot, list[int], bool]]) -> int:
        """Decode the planned tokens in one batch and sample the slots that get logits; on
        failure (the status is returned) every slot is left as it was before."""
        low, batch = self._low, self._batch
        count = 0
        outputs: list[tuple[_Slot, int]] = []
        for slot, tokens, is_prompt in plan:
            request = slot.request
            assert request is not None
            for offset, token in enumerate(tokens):
                last = (
                    slot.prompt_done + offset == len(request.tokens) - 1
                    if is_prompt
                    else offset == len(tokens) - 1
                )
                batch.token[count] = token
                batch.pos[count] = len(slot.tokens) + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = slot.seq_id
                batch.logits[count] = last
                if last:
                    outputs.append((slot, count))
                count += 1
        batch.n_tokens = count
        status = int(low.llama_decode(self._ctx, batch))
        if status != 0:
            for slot, _tokens, _is_prompt in plan:  # cells of a failed batch: none kept
                low.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.tokens), -1)
            return status
        for slot, tokens, is_prompt in plan:
            slot.tokens.extend(tokens)
            if is_prompt:
                slot.prompt_done += len(tokens)
            else:
                slot.next_token = None
        for slot, index in outputs:
            self._sample(slot, index)
        return 0

    def _reset_slot(self, slot: _Slot) -> None:
        """Forget what a slot holds: its token list must never claim cells the KV cache
        may no longer have."""
        self._low.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens, slot.key, slot.next_token = [], None, None

    def _sample(self, slot: _Slot, index: int) -> None:
        low = self._low
        request = slot.request
        assert request is not None and slot.decoder is not None and slot.matcher is not None
        token = low.llama_sampler_sample(slot.sampler, self._ctx, index)
        if low.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        slot.produced += 1
        buffer = ctypes.create_string_buffer(64)
        size = low.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
        piece = slot.decoder.decode(buffer.raw[: max(size, 0)])
        shown = slot.matcher.feed(piece)
        if shown:
            request.on_text(shown)
        if slot.matcher.stopped:
            self._finish(slot, "stop")
        elif slot.produced >= request.params.max_tokens:
            self._finish(slot, "length")
        else:
            slot.next_token = token  # decoded in the next step

    def _finish(
        self, slot: _Slot, reason: FinishReason, error: BaseException | None = None
    ) -> None:
        request = slot.request
        if request is None:
            return
        if reason != "cancelled" and error is None and slot.matcher is not None:
            tail = slot.matcher.finish()
            if tail:
                request.on_text(tail)
        request.stats.completion_tokens = slot.produced
        request.stats.finish_reason = reason
        request.error = error
        slot.request = None
        slot.next_token = None
        request.done.set()

    def _save_slot(self, slot: _Slot) -> None:
        if self.snapshots is None or slot.key is None:
            return
        data = read_sequence_state(self._low, self._ctx, slot.seq_id)
        if data is not None:
            self.snapshots.put(slot.key, np.asarray(slot.tokens, dtype=np.int32), data)
