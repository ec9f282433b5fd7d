"""The request scheduler: which waiting audio is encoded next, and which decoding rows step aside.

Work items (a request, or a chunk of a long one) wait, are encoded in padded, masked batches, then decoded in the
model's batch decoder (a step machine that knows nothing of requests). Scheduling is a serving policy, so it
lives here, above the network: shortest request first, with aging, staged pausable encodes, and parking of much
longer requests' rows while short ones run (see ContinuousBatcher).
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx

from canary_server.model.audio import MIN_AUDIO_SECONDS, pad_to_min_duration
from canary_server.model.batch_decoder import BatchDecoder, Parked, Sequence
from canary_server.model.beam_decoder import BeamBatchDecoder
from canary_server.model.boosting import DEFAULT_ALPHA
from canary_server.model.conformer import drain
from canary_server.model.errors import NonFiniteError
from canary_server.pipeline.encoding import Encoding, WorkItem, begin_encoding, sequences
from canary_server.pipeline.fairness import DEFAULT_GRACE_SECONDS, DEFAULT_SHARE, FairShare

__all__ = ["AGING_PER_SECOND", "ENCODE_STAGES", "PARK_MARGIN_SECONDS", "PARK_RATIO", "ContinuousBatcher", "WorkItem"]

log = logging.getLogger("canary.scheduler")


# Waiting 1 s (without the request making progress) makes it compete like one 10 s of audio shorter.
AGING_PER_SECOND = 10.0
# Rows (and encodes) of a request this much longer than the shortest one in progress step aside until it is done.
PARK_RATIO, PARK_MARGIN_SECONDS = 3.0, 20.0
# An encoder batch runs in about this many + 1 pieces (subsampling, groups of layers), one per step, so that
# a short request arriving during a long batch's encoding waits for one piece, not the whole batch.
BOOSTED_GREEDY = 0  # decoder key: beam search with beam 1 for greedy requests with keywords
ENCODE_STAGES = 6


class ContinuousBatcher:
    """Encoder admission + the shared decoder loop. `step()` evaluates one stage of the encoder batch in progress
    (padded, masked, at most `encode_seconds` of audio; a new one is started from the waiting items while the
    decoders have room), then advances every active sequence by one token. Items of any language / task / prompt
    share one decoder batch per beam size (greedy, or NeMo's beam search with `WorkItem.beam_size`).

    Scheduling: shortest request first, by `WorkItem.priority` aged by waiting time. Longer work is not started
    while shorter requests decode; an encode in progress of a much longer request is paused for a short one (its
    stages resume afterwards), and greedy rows of much longer requests are parked while shorter work is encoding
    or decoding, so a short request runs at nearly its idle speed during a long file. `FairShare` bounds that:
    deferred work keeps at least `long_request_share` of the engine's time (pipeline/fairness.py)."""

    def __init__(
        self,
        model,
        max_batch: int = 16,
        encode_seconds: float = 30.0,
        compile: bool | None = None,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        encode_stages: int = ENCODE_STAGES,
        long_request_share: float = DEFAULT_SHARE,
        fair_grace_seconds: float = DEFAULT_GRACE_SECONDS,
        clock=time.monotonic,
        keywords_alpha: float = DEFAULT_ALPHA,
    ):
        self.model = model
        self.max_batch = max_batch
        self.encode_seconds = encode_seconds
        self.encode_stages = encode_stages
        self.beam_size = beam_size
        self.length_penalty = length_penalty
        self.keywords_alpha = keywords_alpha
        self._compile = compile
        self.decoders: dict[int, BatchDecoder] = {}
        self.waiting: list[WorkItem] = []
        self.encoding: list[Encoding] = []  # in progress; the last one runs, earlier ones were paused for it
        # Encoded batches that join the decoders together with the next one, encoded right after (`_encode_step`)
        self.encoded: list[tuple[list[WorkItem], list[Sequence | BaseException]]] = []
        self.parked: list[Parked] = []
        self.fair = FairShare(long_request_share, fair_grace_seconds)
        self.clock = clock
        self._wanted_defer = False  # the policy wanted to defer something in the current step
        self._overflowed: list[WorkItem] = []  # float16/bfloat16 overflow in this step: redone in float32
        self._order = 0  # FIFO tie-break among equal priorities

    # ---- decoders ---------------------------------------------------------------------------------------
    # Decoders are keyed by beam size; key BOOSTED_GREEDY is beam search with beam 1, which is how NeMo decodes
    # greedy requests that boost keywords (a greedy request without keywords stays in the greedy decoder).
    def _decoder(self, key: int) -> BatchDecoder:
        if key not in self.decoders:
            self.decoders[key] = (
                BeamBatchDecoder(self.model, max(key, 1), self.length_penalty)
                if key != 1
                else BatchDecoder(self.model, compile=self._compile)
            )
        return self.decoders[key]

    def _key(self, item: WorkItem) -> int:
        beam = self._beam(item)
        return BOOSTED_GREEDY if beam == 1 and item.spec.keywords else beam

    @property
    def decoder(self) -> BatchDecoder:
        """The decoder of the default beam size."""
        return self._decoder(self.beam_size)

    def _beam(self, item: WorkItem) -> int:
        return item.beam_size or self.beam_size

    def _active(self) -> list[Sequence]:
        """Sequences in a decoder (a beam sequence once, not once per hypothesis row)."""
        seqs: list[Sequence] = []
        for key, d in self.decoders.items():
            seqs += d.rows[:: max(key, 1)]
        return seqs

    def __len__(self) -> int:
        return len(self.waiting) + self._in_progress()

    def _in_progress(self) -> int:
        """Items taken up: encoding, encoded and waiting to join, decoding or parked."""
        decoding = sum(len(d) for d in self.decoders.values())
        return self._encoding_count() + decoding + self._parked_count()

    def _parked_count(self) -> int:
        return sum(len(p.seqs) for p in self.parked)

    def _encoded_items(self) -> list[WorkItem]:
        """The items of the batches encoded and waiting to join the decoders with the next one."""
        return [it for items, _ in self.encoded for it in items]

    def _encoding_count(self) -> int:
        return sum(len(e.items) for e in self.encoding) + len(self._encoded_items())

    def submit(self, items: list[WorkItem]) -> None:
        now = self.clock()
        for item in items:
            self._order += 1
            item._order, item._since = self._order, now  # type: ignore[attr-defined]
            self.waiting.append(item)

    def _urgency(self, item: WorkItem, now: float) -> float:
        """Lower is more urgent: the item's priority, aged by its waiting time so that nothing starves."""
        return item.priority - AGING_PER_SECOND * (now - item._since)  # type: ignore[attr-defined]

    def _waiting_again(self, items: list[WorkItem], now: float) -> None:
        """Paused or parked items wait (and age) from now."""
        for item in items:
            item._since = now  # type: ignore[attr-defined]

    def cancel(self, items: list[WorkItem]) -> None:
        """Forget waiting items; encoding ones are dropped with their batch or leave the decoder at its first step,
        active ones at its next step."""
        drop = {id(it) for it in items}
        self.waiting = [it for it in self.waiting if id(it) not in drop]
        for it in items:
            it.cancelled = True
            if it._seq is not None:
                it._seq.cancelled = True
        self.encoding = [e for e in self.encoding if not all(it.cancelled for it in e.items)]
        self.encoded = [(its, seqs) for its, seqs in self.encoded if not all(it.cancelled for it in its)]

    def partial_text(self, item: WorkItem) -> str:
        """The text decoded so far for an item (final once it has a result; beam search: only final)."""
        if item.result is not None:
            return item.result.text
        seq = item._seq
        if seq is None or self._key(item) != 1 or not seq.tokens:
            return ""
        return self.model.tokenizer.transcript(seq.tokens)

    def step(self) -> list[WorkItem]:
        """One stage of the encoder batch in progress (starting one from the waiting items when the decoders
        have room); once no encode is left mid-way, one step of every decoder. Returns items that completed
        (result or error).

        The decoders wait while a batch is encoded, as they would for a one-piece encode: on a CPU, decoder steps
        between the stages would run at smaller batches and cost more steps in all. The stages only give the
        caller (the engine) a chance to submit a short request, which then pauses a longer encode."""
        started, self._wanted_defer = self.clock(), False
        done, encoding = self._encode_step()
        done += [self._finish(s) for s in self._rebalance()]
        if not encoding:
            for beam, decoder in list(self.decoders.items()):
                if len(decoder):
                    done += self._decoder_step(beam, decoder)
        if self._overflowed:
            done = self._fall_back(done)
        self.fair.record(self.clock() - started, self._wanted_defer)
        if not len(self):
            self.fair.reset()
        return done

    def _fall_back(self, done: list[WorkItem]) -> list[WorkItem]:
        """A float16/bfloat16 overflow (inf/NaN encoder output or logits): from now on the float32 model
        (`Canary.float32()`) does all the work. The items that overflowed, and every item in progress (encoding,
        decoding, parked), wait again and are encoded and decoded anew in float32. Returns `done` without them."""
        redo, self._overflowed = self._overflowed, []
        try:
            twin = self.model.float32()
        except NonFiniteError as exc:  # nothing to recompute with: those items fail
            for item in redo:
                item.error = exc
            listed = {id(it) for it in done}
            return done + [it for it in redo if id(it) not in listed]
        log.warning("float16/bfloat16 overflow: recomputing in float32, and computing in float32 from now on")
        again = {id(it): it for it in redo}
        in_progress = [s.tag for s in self._active()] + [s.tag for p in self.parked for s in p.seqs]
        encoding = [it for e in self.encoding for it in e.items] + self._encoded_items()
        for item in in_progress + encoding:
            again[id(item)] = item
        for item in again.values():
            item._seq = None
        self.model, self.decoders, self.parked, self.encoding, self.encoded = twin, {}, [], [], []
        self.waiting += again.values()
        return [it for it in done if id(it) not in again]

    def _decoder_step(self, beam: int, decoder: BatchDecoder) -> list[WorkItem]:
        try:
            return [self._finish(s) for s in decoder.step()]
        except Exception as exc:  # never seen in practice; fail that decoder's items, keep the engine alive
            log.exception("decoder step failed")
            failed = decoder.rows[:: max(beam, 1)]
            del self.decoders[beam]
            for seq in failed:
                seq.tag.error = exc
            return [s.tag for s in failed]

    # ---- scheduling -------------------------------------------------------------------------------------
    def _defer(self, wanted: bool) -> bool:
        """The policy wants to defer work for shorter requests: may it (FairShare), and note that it wanted to."""
        self._wanted_defer |= wanted
        return wanted and self.fair.allow_defer()

    def _shortest_in_progress(self) -> float | None:
        """The lowest priority among decoding rows, the batches encoded and waiting to join them, and the encode
        that is running (parked rows excluded)."""
        prios = [s.tag.priority for s in self._active()] + [it.priority for it in self._encoded_items()]
        if self.encoding:
            prios += [it.priority for it in self.encoding[-1].items]
        return min(prios, default=None)

    def _rebalance(self) -> list[Sequence]:
        """Park greedy sequences of much longer requests while shorter ones are encoding or decoding (each step
        of a big batch costs every row's compute on a CPU); put them back once the shorter ones are done, they
        have waited long enough, or it is the deferred work's turn. Returns sequences that finished in the
        flushed step."""
        greedy = self.decoders.get(1)
        if greedy is None:
            return []
        now, done = self.clock(), []
        shortest = self._shortest_in_progress()
        for group in list(self.parked):  # back when nothing much shorter is left, or cancelled, or aged
            keep = shortest is not None and not any(s.cancelled for s in group.seqs)
            if not self._defer(keep and self._parkable(group.seqs[0].tag, shortest, now)):
                self.parked.remove(group)
                greedy.unpark(group)
        if shortest is not None:
            long = [s for s in greedy.rows if self._defer(self._parkable(s.tag, shortest, now))]
            if long:
                group, done = greedy.park(long)
                if group is not None:
                    self._waiting_again([s.tag for s in group.seqs], now)
                    self.parked.append(group)
        return done

    def _parkable(self, item: WorkItem, shortest: float, now: float) -> bool:
        return self._urgency(item, now) > PARK_RATIO * shortest + PARK_MARGIN_SECONDS

    def _held_back(self, items: list[WorkItem], now: float) -> bool:
        """Encoding stalls every active sequence while it runs: don't stall shorter requests to encode longer
        work; it goes on once they are done, once it has waited long enough (aging), or on its turn (FairShare).
        Work no longer than what is decoding joins at once (continuous batching)."""
        active = self._active()
        if not active:
            return False
        shortest_active = min(seq.tag.priority for seq in active)
        return self._defer(min(self._urgency(it, now) for it in items) > shortest_active)

    def _encode_step(self) -> tuple[list[WorkItem], bool]:
        """Returns the items that completed and whether an encode was left mid-way (or follows at once)."""
        now = self.clock()
        done = self._maybe_start(now)
        if not self.encoding:
            return done + self._join_encoded(), False
        enc = self.encoding[-1]
        if self._held_back(enc.items, now):
            return done + self._join_encoded(), False
        try:
            mx.eval(next(enc.stages))
            return done, True
        except StopIteration as finished:
            self.encoding.pop()
            try:
                seqs = sequences(self.model, enc, finished.value, self.keywords_alpha)
            except Exception as exc:  # noqa: BLE001 - isolated below
                return done + self._isolate(enc.items, exc) + self._join_encoded(), False
            self.encoded.append((enc.items, seqs))
            if self._next_encode_follows(now):
                return done, True
            return done + self._join_encoded(), False
        except NonFiniteError:  # float16/bfloat16 overflow: the batch is redone in float32 (`_fall_back`)
            self.encoding.pop()
            self._overflowed += enc.items
            return done + self._join_encoded(), False
        except Exception as exc:  # noqa: BLE001 - a failing batch: find the culprit, the others still run
            self.encoding.pop()
            return done + self._isolate(enc.items, exc) + self._join_encoded(), False

    def _next_encode_follows(self, now: float) -> bool:
        """Whether the batches just encoded wait to join the decoders with the next one, which starts at the next
        step: they would wait for its encode anyway (the decoders do not step while a batch is encoded), and
        joined together they share one prefill and then finish together, not in staggered groups (16 clients
        sending 5 s clips at once at 180m dims on 2 cores: 122 -> 114 decoder steps per 96 clips, 3-8% more
        throughput). Not when a paused encode would run first, when a request in them or in the decoders streams
        its text (it starts at once; a decoding one keeps its step between two encodes), when the decoders have
        no room, or when the next waiting item is longer (less urgent) than they are: shortest first."""
        if self.encoding or not self.waiting:
            return False
        pending = self._encoded_items()
        if any(it.streams for it in pending) or any(s.tag.streams for s in self._active()):
            return False
        if self._in_progress() >= self.max_batch:
            return False
        return min(self._urgency(it, now) for it in self.waiting) <= min(it.priority for it in pending)

    def _join_encoded(self) -> list[WorkItem]:
        """Join the encoded batches waiting for the next one (`_next_encode_follows`) to the decoders, as one."""
        if not self.encoded:
            return []
        items = self._encoded_items()
        seqs = [s for _, batch in self.encoded for s in batch]
        self.encoded = []
        return self._join(items, seqs)

    def _maybe_start(self, now: float) -> list[WorkItem]:
        """Start encoding the most urgent waiting items when nothing is encoding, or pause the running encode for
        them when it belongs to a much longer request."""
        room = self.max_batch - self._in_progress()
        if room <= 0 or not self.waiting:
            return []
        self.waiting.sort(key=lambda it: (self._urgency(it, now), it._order))  # type: ignore[attr-defined]
        first = self.waiting[0]
        if self.encoding:
            running = self.encoding[-1].items
            if not self._defer(all(self._parkable(it, first.priority, now) for it in running)):
                return []
        if self._held_back([first], now):
            return []
        batch, seconds = [], 0.0
        sr = self.model.sample_rate
        while self.waiting and len(batch) < room:
            dur = self.waiting[0].audio.shape[0] / sr
            if batch and seconds + dur > self.encode_seconds:
                break
            batch.append(self.waiting.pop(0))
            seconds += dur
        if self.encoding:
            self._waiting_again(self.encoding[-1].items, now)
        started = {id(it.group) for it in batch if it.group is not None}
        self._waiting_again([it for it in self.waiting if it.group is not None and id(it.group) in started], now)
        try:
            self.encoding.append(begin_encoding(self.model, batch, self.encode_stages))
        except Exception as exc:  # noqa: BLE001
            return self._isolate(batch, exc)
        return []

    # ---- encoding ---------------------------------------------------------------------------------------
    def _encode(self, items: list[WorkItem]) -> list[Sequence | BaseException]:
        """Encode items as one padded batch, all stages at once."""
        encoding = begin_encoding(self.model, items, self.encode_stages)
        return sequences(self.model, encoding, drain(encoding.stages), self.keywords_alpha)

    def _isolate(self, items: list[WorkItem], exc: BaseException) -> list[WorkItem]:
        """A batch failed: fail it if it is one item, else encode the items one by one (the others still run)."""
        if len(items) == 1:
            items[0].error = exc
            return items
        return [d for it in items for d in self._start([it])]

    def _start(self, items: list[WorkItem]) -> list[WorkItem]:
        """Encode items as one padded batch at once and prefill them; a failing item fails alone."""
        try:
            seqs = self._encode(items)
        except NonFiniteError:  # redone in float32 (`_fall_back`)
            self._overflowed += items
            return []
        except Exception as exc:  # noqa: BLE001
            return self._isolate(items, exc)
        return self._join(items, seqs)

    def _join(self, items: list[WorkItem], seqs: list[Sequence | BaseException]) -> list[WorkItem]:
        """Prefill the encoded items into the decoder; items whose prompt failed fail alone."""
        failed = []
        for item, seq in zip(items, seqs, strict=True):
            if isinstance(seq, BaseException):
                item.error = seq
                failed.append(item)
        by_beam: dict[int, list[Sequence]] = {}
        for s in seqs:
            if isinstance(s, Sequence):
                by_beam.setdefault(self._key(s.tag), []).append(s)
        return failed + [self._finish(s) for beam, group in by_beam.items() for s in self._decoder(beam).add(group)]

    def _finish(self, seq: Sequence) -> WorkItem:
        item: WorkItem = seq.tag
        if seq.overflowed:  # its logits were inf/NaN: redone in float32 at the end of this step (`_fall_back`)
            self._overflowed.append(item)
            return item
        model = self.model
        item.result = model.result(seq.tokens, item.spec, item.audio.shape[0], seq.finished, seq.logprobs)
        if item.spec.timestamps and model.timestamp_source == "ctc":
            wave = pad_to_min_duration(item.audio, int(MIN_AUDIO_SECONDS * model.sample_rate))
            item.result = model.add_ctc_timestamps([wave], [item.result])[0]
        return item
