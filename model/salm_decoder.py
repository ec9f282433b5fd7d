"""The SALM's LLM as a greedy step machine over a changing set of rows (continuous batching).

Each row has its own prompt length and KV cache row: mlx-lm's `BatchKVCache` keeps rows left-padded (positions
start at 0 at each row's first real input, as HF derives them from the attention mask in NeMo's batched
`generate`). Rows join with `add` (prefilled together, then merged into the running cache) and leave with `keep`."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from . import cpu_kernels


class SalmBatchDecoder:
    def __init__(self, llm, eos_id: int) -> None:
        self.llm = llm
        self.eos_id = eos_id
        self.cache: list[BatchKVCache] | None = None
        self.last: mx.array | None = None  # (B,) each row's last token
        self.last_logprobs: list[float] = []  # the log-probability of each row's last token (full vocabulary)
        # float16/bfloat16 weights can overflow: a row whose logits are not finite gets NaN as its log-probability
        # (float32 rows never do), so the caller can fail that row instead of emitting garbage tokens.

    @property
    def size(self) -> int:
        return 0 if self.last is None else self.last.shape[0]

    def add(self, rows: Sequence[mx.array]) -> list[int]:
        """Prefill rows of input embeddings ((L_i, H) each) together; returns each row's first token."""
        longest = max(r.shape[0] for r in rows)
        pads = [longest - r.shape[0] for r in rows]
        x = mx.stack([mx.pad(r, [(p, 0), (0, 0)]) for r, p in zip(rows, pads, strict=True)])  # (B, L, H), left-padded
        cache = [BatchKVCache(pads) for _ in self.llm.layers]
        logits = self.llm(None, cache=cache, input_embeddings=x)[:, -1]  # (B, V)
        first, lps = _greedy(logits)
        self.last_logprobs = lps.tolist()
        if self.cache is None:
            self.cache, self.last = cache, first
        else:
            for mine, new in zip(self.cache, cache, strict=True):
                mine.extend(new)
            self.last = mx.concatenate([self.last, first])
        return first.tolist()

    def step(self) -> list[int]:
        """One token for every row (finished rows included: NeMo fills them with pad, the caller ignores them)."""
        logits = self.llm(self.last[:, None], cache=self.cache)[:, -1]
        self.last, lps = _greedy(logits)
        self.last_logprobs = lps.tolist()
        return self.last.tolist()

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these rows (in this order); the others leave."""
        if not indices:
            self.cache, self.last = None, None
            return
        idx = mx.array(list(indices), dtype=mx.int32)
        for c in self.cache:
            c.filter(idx)
        self.last = self.last[idx]


def _greedy(logits: mx.array) -> tuple[mx.array, mx.array]:
    """logits (B, V) -> argmax ids (B,) and their log-probabilities (B,), in float32 (NaN where a row's logits are
    not all finite)."""
    if logits.dtype == mx.float32:
        return cpu_kernels.pick(logits)  # argmax and logsumexp, one fused pass on the CPU paths (vocab 151 936)
    finite = mx.all(mx.isfinite(logits), axis=-1)
    logits = logits.astype(mx.float32)
    ids = mx.argmax(logits, axis=-1)
    chosen = mx.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    lps = chosen - mx.logsumexp(logits, axis=-1)
    return ids, mx.where(finite, lps, mx.nan)
