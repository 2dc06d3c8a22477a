"""Continuous batching: requests join and leave one running batch between decode steps.

One thread owns the model. Each turn of its loop it admits waiting requests (a prefill each, into
the next free cache row, within a token budget so decoding never stalls long), runs one decode
step for every active row whatever its adapter, and retires rows that finished or whose client
went away, moving the last row into the freed one so the batch stays rows 0..n-1. Adapters are
added and removed between steps. Callers get each token's text through a callback that runs on
the loop's thread and must not block.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from slmops.shipping.batching import BatchModel, LoraStack, read_onnx_adapter
from slmops.shipping.manifest import BundleError
from slmops.shipping.prefix_cache import BLOCK, PrefixCache
from slmops.shipping.runtime import Completion, Runtime, Sampling, TextStream

log = logging.getLogger(__name__)

PREFILL_BUDGET = 1024  # prompt tokens admitted per turn before the running batch gets its next step
# LoRA rank columns kept free for adapters loaded at run time (a rank-16 adapter on q/k/v and o
# takes 48). Every column costs every decode step: 256 in all made SmolLM2's step at 32 rows ~10% slower than 112.
SPARE_COLUMNS = 64


class AdapterInUse(BundleError):
    pass


class ShuttingDown(BundleError):
    pass


class UnknownAdapter(BundleError):
    pass


@dataclass
class Event:
    kind: str  # "token", "done", "error", or "refused" (a bad request found late)
    text: str = ""
    completion: Optional[Completion] = None


@dataclass(eq=False)
class Sequence:
    """One request's generation: its prompt, adapter and options, and where it stands."""

    tokens: list[int]
    adapter: Optional[str]
    sampling: Sampling
    emit: Callable[[Event], None]
    text: TextStream
    limit: int  # most tokens to generate
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    length: int = 0  # positions in its cache row
    last: int = 0  # the token to feed next
    first: Optional[float] = None
    previous: Optional[float] = None
    finish: Optional[str] = None
    rng: Optional[np.random.Generator] = None


class Scheduler:
    """Serve generations from a bundle in one continuously batched loop (CPU bundles)."""

    def __init__(
        self,
        runtime: Runtime,
        slots: int = 32,
        max_len: Optional[int] = None,
        threads: Optional[int] = None,
        adapter_capacity: Optional[int] = None,
        prefix_cache_bytes: int = 256 << 20,
        observe: Optional[Callable[[str, float], None]] = None,
    ):
        self.runtime = runtime
        self.max_len = min(max_len or runtime.context_length, runtime.context_length)
        shipped = {  # the bundle's own adapters, as it ships them
            name: read_onnx_adapter(runtime.manifest.adapter_file(runtime.path, name)) for name in runtime.adapter_names
        }
        taken = sum(LoraStack.columns(t) for t in shipped.values())
        width = adapter_capacity or taken + SPARE_COLUMNS
        if taken > width:
            raise BundleError(
                f"the bundle's adapters take {taken} rank columns, more than --adapter-capacity {width}; raise it"
            )
        self.model = BatchModel(runtime.model_dir, slots, self.max_len, threads, lora_width=width)
        self.prefix = PrefixCache(prefix_cache_bytes, self.model.bytes_per_token * BLOCK)
        for name, tensors in shipped.items():
            self.model.stack.add(name, tensors)
        self.observe = observe or (lambda _name, _value: None)
        self._cond = threading.Condition()
        self._waiting: list[Sequence] = []
        self._active: list[Sequence] = []
        self._changes: list[Callable[[], None]] = []
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # -- what callers use (any thread) ----------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self.model.stack.adapters)

    @property
    def load(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        with self._cond:
            return len(self._waiting), len(self._active)

    def submit(
        self, tokens: list[int], adapter: Optional[str], sampling: Sampling, stop: tuple[str, ...], emit
    ) -> Sequence:
        sampling.check()
        if not tokens:
            raise BundleError("the prompt is empty; send some text")
        room = self.max_len - len(tokens)
        if room < 1:
            raise BundleError(
                f"prompt is {len(tokens)} tokens, this server's context is {self.max_len}; shorten the prompt"
            )
        seq = Sequence(
            tokens, adapter, sampling, emit, TextStream(self.runtime, stop), min(sampling.max_new_tokens, room)
        )
        if sampling.temperature > 0:
            seq.rng = np.random.default_rng(sampling.seed)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            if adapter is not None and adapter not in self.model.stack.adapters:  # under the lock: see remove_adapter
                raise BundleError(f"unknown adapter '{adapter}'; loaded: {', '.join(self.adapters) or 'none'}")
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a generation (its client went away): its row is freed before the next step."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def add_adapter(self, name: str, tensors: dict) -> None:
        """Load an adapter between two steps (BundleError if it does not fit)."""
        self.change_adapters(lambda: self.model.stack.add(name, tensors))

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter between two steps; BundleError if a request is using it."""

        def remove() -> None:
            with self._cond:  # no request for it can be submitted meanwhile
                if name not in self.model.stack.adapters:
                    raise UnknownAdapter(f"adapter '{name}' is not loaded")
                if any(s.adapter == name for s in itertools.chain(self._waiting, self._active)):
                    raise AdapterInUse(f"adapter '{name}' has requests running; retry when they finish")
                self.prefix.forget(self.model.stack.ids[name])
                self.model.stack.remove(name)

        self.change_adapters(remove)

    def change_adapters(self, change: Callable[[], None]) -> None:
        """Run `change` (adding or removing adapters) between two steps; returns once it ran, raising what it raised."""
        done = threading.Event()
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                change()
            except BaseException as exc:  # handed back to the caller's thread
                outcome.append(exc)
            finally:
                done.set()

        with self._cond:
            self._changes.append(run)
            self._cond.notify()
        done.wait()
        if outcome:
            raise outcome[0]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="slmops-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is running and waiting, then end the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the loop (its own thread) ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._changes or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._active or self._changes):
                    return
                changes, self._changes = self._changes, []
            for change in changes:  # before admitting: a removed adapter's requests are refused at submit
                change()
            with self._cond:
                admit = self._take_waiting()
            try:
                self._turn(admit)
            except Exception as exc:  # a bug here must not end the loop: every request would hang
                log.exception("scheduler turn failed")
                self._fail([*self._active, *admit], exc)
                self._active = []

    def _turn(self, admit: list[Sequence]) -> None:
        """Prefill the admitted requests, run one decode step, retire finished rows. A failed run
        fails the requests in it, not the server."""
        try:
            for group in self._groups(admit):
                self._prefill(group)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail(admit, exc)
        try:
            if any(seq.finish is None for seq in self._active):
                self._decode()
        except Exception as exc:
            log.exception("decode step failed")
            self._fail(self._active, exc)
        self._retire()
        self.observe("batch_size", len(self._active))
        self.observe("queue_depth", len(self._waiting))

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        for seq in seqs:
            if seq.finish is None:
                seq.finish = "error"
                self._send(seq, Event("error", f"generation failed: {type(exc).__name__}: {exc}"))

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # the caller's side is gone (a closed event loop): nothing to tell
            log.warning("could not deliver an event", exc_info=True)

    def _take_waiting(self) -> list[Sequence]:
        """Waiting requests to prefill this turn: while rows are free and the prompt-token budget lasts."""
        admit: list[Sequence] = []
        budget = PREFILL_BUDGET
        while self._waiting and len(self._active) + len(admit) < self.model.slots and (budget > 0 or not admit):
            seq = self._waiting.pop(0)
            if seq.cancelled:
                seq.finish = "cancelled"
                continue
            admit.append(seq)
            budget -= len(seq.tokens)  # a prefill costs about its prompt tokens (plus the padding)
        return admit

    def _groups(self, admit: list[Sequence]) -> list[list[Sequence]]:
        """Prefills to run together: all of them if the graph takes rows of different lengths, else one by one."""
        admit = [seq for seq in admit if not seq.cancelled]
        if self.model.per_row:
            return [admit] if admit else []
        return [[seq] for seq in admit]

    def _prefill(self, group: list[Sequence]) -> None:
        """Prompts into the next free cache rows; each gets its first token. Those that start with cached
        blocks are restored and run from there one by one (ONNX Runtime takes no batch of several rows
        that have a past and more than one new token); the rest run together, right-padded."""
        fresh = []
        for seq in group:
            adapter = self.model.stack.ids[seq.adapter]
            blocks = self.prefix.lookup(seq.tokens, adapter)
            if not blocks:
                fresh.append(seq)
                continue
            row = len(self._active)
            self.model.reserve(len(seq.tokens))
            done = self.prefix.restore(blocks, self.model.cache, row)
            self._run_prefill([seq], done)
            self.prefix.store(seq.tokens, adapter, self.model.cache, row)
        if fresh:
            start = len(self._active)
            self._run_prefill(fresh, 0)
            for row, seq in enumerate(fresh, start):
                self.prefix.store(seq.tokens, self.model.stack.ids[seq.adapter], self.model.cache, row)

    def _run_prefill(self, group: list[Sequence], done: int) -> None:
        """Prompts from position `done` on, into the next free rows, right-padded to the longest."""
        start, width = len(self._active), max(len(seq.tokens) for seq in group) - done
        tokens = np.zeros((len(group), width), dtype=np.int64)
        for row, seq in enumerate(group):
            tokens[row, : len(seq.tokens) - done] = seq.tokens[done:]
        lengths = [len(seq.tokens) for seq in group]
        adapters = [seq.adapter for seq in group]
        if tokens.size == 1 and start + 1 < self.model.slots:  # one row of one token: see _decode
            tokens, lengths, adapters = np.asarray([[tokens[0, 0]], [0]]), lengths + [1], adapters + [None]
        began = time.perf_counter()
        logits = self.model.run(start, tokens, lengths, adapters, fed=[n - done for n in lengths])
        self._observe_step("prefill", began, int(tokens.size))
        for seq, row in zip(group, logits):
            seq.length = len(seq.tokens)
            self._active.append(seq)
            if seq.cancelled:  # while it was prefilled: its row goes at the end of this turn
                seq.finish = "cancelled"
                continue
            self._accept(seq, row)

    def _decode(self) -> None:
        rows = self._active
        lengths = [seq.length + 1 for seq in rows]
        tokens = [[seq.last] for seq in rows]
        adapters = [seq.adapter for seq in rows]
        if len(rows) == 1 and self.model.slots > 1:
            # ONNX Runtime's fp32 MatMul rounds one row differently from two or more, and int8
            # activations carry that to the answer: a lone row runs with a dummy one (in a free
            # row of the cache), so a request gets the same greedy answer alone or in a batch.
            lengths, tokens, adapters = lengths + [1], tokens + [[0]], adapters + [None]
        began = time.perf_counter()
        logits = self.model.run(0, np.asarray(tokens), lengths, adapters)
        self._observe_step("decode", began, len(rows))
        for seq, length, row in zip(rows, lengths, logits):
            seq.length = length
            if seq.finish is None and not seq.cancelled:
                self._accept(seq, row)

    def _observe_step(self, kind: str, began: float, rows: int) -> None:
        self.observe(f"{kind}_seconds", time.perf_counter() - began)
        self.observe(f"{kind}_rows", rows)  # tokens fed, for a prefill

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        token = pick(logits, seq.sampling, seq.rng)
        now = time.perf_counter()
        if seq.first is None:
            seq.first = now
            self.observe("ttft", now - seq.submitted)
        else:
            self.observe("inter_token", now - (seq.previous or now))
        seq.previous = now
        before = len(seq.text.tokens)
        piece = seq.text.add(token)
        if len(seq.text.tokens) > before:
            self.observe("generated", 1)
        seq.last = token
        if piece:
            self._send(seq, Event("token", piece))
        if seq.text.finish:
            self._finish(seq, "stop")
        elif len(seq.text.tokens) >= seq.limit:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish = reason
        text = seq.text
        self._send(
            seq,
            Event(
                "done",
                completion=Completion(
                    text.text,
                    len(seq.tokens),
                    len(text.tokens),
                    reason,
                    time.perf_counter() - seq.submitted,
                    (seq.first or 0.0) - seq.submitted,
                    list(text.tokens),
                ),
            ),
        )

    def _retire(self) -> None:
        """Drop finished and cancelled rows; the last row moves into each gap."""
        rows, i = self._active, 0
        while i < len(rows):
            seq = rows[i]
            if seq.finish is None and not seq.cancelled:
                i += 1
                continue
            last = rows.pop()
            if last is not seq:
                self.model.move(len(rows), i, last.length)
                rows[i] = last


def pick(logits: np.ndarray, sampling: Sampling, rng: Optional[np.random.Generator]) -> int:
    """Greedy (temperature 0) or sampled with temperature, top-k and top-p."""
    if sampling.temperature == 0 or rng is None:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled)[: sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    keep = min(len(probs), int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1)  # the fewest reaching top_p
    probs = probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(keep, p=probs)])
