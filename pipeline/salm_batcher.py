"""The engine's batcher for canary-qwen-2.5b (`model.salm.SALM`): continuous batching of LLM rows.

The same contract as `ContinuousBatcher` (pipeline/jobs.py `BatcherLike`), a simpler policy: waiting pieces, shortest
request first (aged as there), are encoded together (at most `encode_seconds` of audio, up to `max_batch` rows),
prefilled into the LLM and join the rows already decoding; every other step advances every row by one greedy token,
and a row leaves as soon as it ends. Each row has its own prompt, length and KV cache row (model/salm_decoder.py),
so its tokens equal decoding it alone."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from canary_server.model.audio import pad_batch
from canary_server.model.errors import NonFiniteError
from canary_server.pipeline.encoding import WorkItem
from canary_server.pipeline.scheduler import AGING_PER_SECOND

log = logging.getLogger("canary.scheduler")


GREEDY_ONLY = "canary-qwen-2.5b decodes greedily only (as NeMo's SALM.generate)"


@dataclass(eq=False)
class _Row:
    item: WorkItem
    limit: int  # new tokens this row may generate
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return len(self.tokens) >= self.limit

    @property
    def overflowed(self) -> bool:
        return math.isnan(self.logprobs[-1])


class SalmBatcher:
    def __init__(
        self, model, max_batch: int = 16, encode_seconds: float = 30.0, beam_size: int = 1, clock=time.monotonic, **_
    ):
        if beam_size > 1:
            raise ValueError(f"beam_size {beam_size}: {GREEDY_ONLY}; unset the beam_size setting")
        self.model = model
        self.max_batch = max_batch
        self.encode_seconds = encode_seconds
        self.clock = clock
        self.decoder = model.decoder()
        self.rows: list[_Row] = []  # the decoder's rows, in its order
        self.waiting: list[WorkItem] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.rows)

    def submit(self, items: list[WorkItem]) -> None:
        now = self.clock()
        for item in items:
            item._since = now  # type: ignore[attr-defined]
        self.waiting += items

    def cancel(self, items: list[WorkItem]) -> None:
        for item in items:
            item.cancelled = True
        self.waiting = [it for it in self.waiting if not it.cancelled]

    def partial_text(self, item: WorkItem) -> str:
        if item.result is not None:
            return item.result.text
        row = item._seq
        return partial_text(self.model.tokenizer, row.tokens) if isinstance(row, _Row) else ""

    def step(self) -> list[WorkItem]:
        """Admit waiting pieces while there is room (encode + prefill), else one token for every row."""
        self._drop_cancelled()
        if self.waiting and len(self.rows) < self.max_batch:
            return self._admit()
        return self._decode() if self.rows else []

    # ---- admission ----------------------------------------------------------------------------------------
    def _next_batch(self) -> list[WorkItem]:
        now = self.clock()
        order = sorted(self.waiting, key=lambda it: it.priority - AGING_PER_SECOND * (now - it._since))
        batch, seconds = [], 0.0
        for item in order[: self.max_batch - len(self.rows)]:
            s = item.audio.shape[0] / self.model.sample_rate
            if batch and seconds + s > self.encode_seconds:
                break
            batch.append(item)
            seconds += s
        return batch

    def _admit(self) -> list[WorkItem]:
        batch = self._next_batch()
        self.waiting = [it for it in self.waiting if it not in batch]
        failed, ready = [], []
        for item in batch:
            try:
                if (item.beam_size or 1) > 1:
                    raise ValueError(f"beam_size {item.beam_size}: {GREEDY_ONLY}")
                ready.append((item, self.model.tokenizer.prompt_ids(_context(item, self.model.tokenizer))))
            except ValueError as exc:  # a prompt that cannot be built fails its piece alone
                item.error = exc
                failed.append(item)
        if not ready:
            return failed
        audio, lengths = pad_batch([it.audio for it, _ in ready])
        frames, frame_lengths = self.model.encode(audio, lengths)
        rows = []
        for i, ((item, prompt), n) in enumerate(zip(ready, frame_lengths.tolist(), strict=True)):
            rows.append(self.model.input_embeddings(prompt, frames[i, :n]))
            item._seq = _Row(item, _limit(self.model, item.audio.shape[0], n))
        new = [it._seq for it, _ in ready]
        for row, token, lp in zip(new, self.decoder.add(rows), self.decoder.last_logprobs, strict=True):
            row.tokens.append(token)
            row.logprobs.append(lp)
        self.rows += new
        return failed + self._leave()

    # ---- decoding -------------------------------------------------------------------------------------------
    def _decode(self) -> list[WorkItem]:
        tokens = self.decoder.step()
        for row, token, lp in zip(self.rows, tokens, self.decoder.last_logprobs, strict=True):
            row.tokens.append(token)
            row.logprobs.append(lp)
        return self._leave()

    def _leave(self) -> list[WorkItem]:
        """Rows that ended (EOS or their limit) leave the decoder with their result; a row whose float16/bfloat16
        logits overflowed leaves with a NonFiniteError (no garbage text)."""
        eos = self.decoder.eos_id
        keep = [i for i, r in enumerate(self.rows) if r.tokens[-1] != eos and not r.ended and not r.overflowed]
        if len(keep) == len(self.rows):
            return []
        done = [r for i, r in enumerate(self.rows) if i not in set(keep)]
        self._keep(keep)
        for row in done:
            item = row.item
            if row.overflowed:
                item.error = NonFiniteError(
                    f"canary-qwen's LLM overflowed {self.model.dtype} on this audio; serve it with dtype float32"
                )
            else:
                item.result = self.model.result(row.tokens, item.audio.shape[0] / self.model.sample_rate, row.logprobs)
            item._seq = None
        return [r.item for r in done]

    def _drop_cancelled(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.item.cancelled]
        if len(keep) < len(self.rows):
            for i, r in enumerate(self.rows):
                if i not in keep:
                    r.item._seq = None
            self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        self.decoder.keep(indices)
        self.rows = [self.rows[i] for i in indices]


def _context(item: WorkItem, tokenizer) -> str | None:
    """The request's prompt text, cut to its last `max_context_tokens` tokens (the engine's max_prompt_tokens)."""
    text = item.spec.context or None
    most = item.spec.max_context_tokens
    if text is None or most is None:
        return text
    ids = tokenizer.encode(text)
    return text if len(ids) <= most else tokenizer.decode(ids[-most:]).lstrip()


def _limit(model, num_samples: int, frames: int) -> int:
    return max_new_tokens(model, num_samples, frames)  # looked up at call time: the bench may replace it


def max_new_tokens(model, num_samples: int, frames: int) -> int:
    """A piece's token limit. NeMo's generate() defaults to 128 new tokens; a server piece may hold up to 40 s of
    speech, so it gets as many tokens as it has LLM audio positions (12.5 per second), never fewer than 128.
    (bench/serve_capped.py replaces this function to force the decode length of random-weight models.)"""
    return max(model.config.max_new_tokens, frames)


def partial_text(tokenizer, tokens: list[int]) -> str:
    """The text of a row still decoding, as far as it is final: byte-level BPE tokens can end inside a UTF-8
    sequence, which decodes to U+FFFD until its next token completes it, so a trailing U+FFFD is held back (a
    streamed delta is never taken back). The finished result keeps one that nothing completed, as NeMo's text does."""
    return tokenizer.decode(tokens).rstrip("\ufffd").strip()
