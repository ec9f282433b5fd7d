"""NeMo's beam search as a step machine over a changing set of sequences (each `beam_size` consecutive rows)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .batch_decoder import BatchDecoder, Sequence, pad_axis, round_up
from .decoder import NEG_INF
from .fusion import RowBoosts


class BeamBatchDecoder(BatchDecoder):
    """Beam search over a changing set of sequences, each holding `beam_size` consecutive rows.

    Mirrors NeMo's BeamSearchSequenceGenerator (transformer_generators.py) step for step: top-k of the first
    step, then per step top-k per hypothesis, finished hypotheses extended only by <pad> at +0 (their other
    candidates pushed down by NEG_INF), top-k of k^2 by score / ((5 + len) / 6) ** length_penalty, and the
    final argmax of the penalised scores. NeMo ignores the configured `len_pen` (it reads `length_penalty`),
    so the effective penalty of the released configs is 0.

    Rows whose sequence has `keywords` (a boosting tree) search with NeMo's shallow fusion
    (BeamSearchSequenceGeneratorWithFusionModels): alpha x the tree's scores are added to the log-probs before
    every top-k, and the tree state follows each hypothesis. With beam_size 1 that is NeMo's greedy with boosting.
    Rows without keywords are not changed by it (their scores are +0)."""

    def __init__(self, model, beam_size: int, length_penalty: float = 0.0) -> None:
        self.boosts = RowBoosts(model.decoder.cfg.vocab_size)
        super().__init__(model, compile=False)
        self.k = beam_size
        self.length_penalty = length_penalty

    def __len__(self) -> int:
        return len(self.rows) // self.k

    def _reset(self) -> None:
        super()._reset()
        self.boosts.reset()
        self.scores: mx.array | None = None  # (R,) cumulative log-prob per hypothesis row
        self.hyps: list[list[int]] = []  # host: generated tokens per row
        self.hyp_lps: list[list[float]] = []  # host: their log-probabilities
        self.lengths: list[float] = []  # host: NeMo's prefixes_len per row
        self.steps: list[int] = []  # host: tokens generated so far per row (same within a sequence)

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        k, p = self.k, len(seqs[0].prompt)
        self_k, self_v, cross, cross_mask, logits = self._run_prompts(seqs)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (n, V)
        trees = [s.keywords for s in seqs]
        starts = self.boosts.starts(trees)
        alphas = [s.keywords_alpha if s.keywords is not None else 0.0 for s in seqs]
        boosted = any(t is not None for t in trees)
        fused = self.boosts.fuse(logp, starts, mx.array(alphas, dtype=mx.float32)) if boosted else logp
        order = mx.argsort(-fused, axis=-1)[:, :k]  # (n, k) best first, like torch.topk
        scores = mx.take_along_axis(fused, order, axis=-1)
        token_lps = mx.take_along_axis(logp, order, axis=-1)
        rep = mx.repeat(mx.arange(len(seqs)), k)  # every sequence's state copied to its k rows
        self.boosts.append(
            [t for t in trees for _ in range(k)],
            [a for a in alphas for _ in range(k)],
            self.boosts.next_states(starts, order).reshape(-1),
        )
        self._append_rows(
            [a[rep] for a in self_k],
            [a[rep] for a in self_v],
            [(a[rep], b[rep]) for a, b in cross],
            cross_mask[rep],
            p,
            order.reshape(-1),
        )
        self.scores = scores.reshape(-1) if self.scores is None else mx.concatenate([self.scores, scores.reshape(-1)])
        first = np.array(order).reshape(-1).tolist()
        first_lps = np.array(token_lps)  # (n, k)
        if self.guard:  # inf/NaN logits make the top log-probs non-finite: overflow
            for seq, lps in zip(seqs, first_lps, strict=True):
                seq.overflowed = seq.overflowed or not np.isfinite(lps).all()
        self.hyps += [[t] for t in first]
        self.hyp_lps += [[lp] for lp in first_lps.reshape(-1).tolist()]
        self.lengths += [float(p + 2)] * len(first)  # NeMo: prefixes.size(1) + 1 after the first step
        self.steps += [1] * len(first)
        self.rows += [s for s in seqs for _ in range(k)]
        return self._finish_done(first_step=True)

    def step(self) -> list[Sequence]:
        if not self.rows:
            return []
        need = max(self.positions) + 1
        if need > self.self_k[0].shape[2]:
            cap = round_up(need, self.cache_step)
            self.self_k = [pad_axis(a, 2, cap) for a in self.self_k]
            self.self_v = [pad_axis(a, 2, cap) for a in self.self_v]
        k, r = self.k, len(self.rows)
        # NeMo's pad_profile: a hypothesis that ended is only extended by <pad>. It starts as zeros, so one whose
        # FIRST token is <|endoftext|> is not finished and goes on like any other (transformer_generators.py).
        finished = mx.array([len(h) > 1 and h[-1] in (self.eos, self.pad) for h in self.hyps])
        logits, self.self_k, self.self_v = self._forward_logits(
            self.last, self.offsets, self.self_k, self.self_v, self.cross_k, self.cross_v, self.cross_mask
        )
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        logp = logits - lse
        boosted = self.boosts.active
        fused = self.boosts.fuse(logp, self.boosts.state, self.boosts.alpha) if boosted else logp
        order = mx.argsort(-fused, axis=-1)[:, :k]  # (R, k)
        cand_lp = mx.take_along_axis(fused, order, axis=-1)
        raw_lp = mx.take_along_axis(logp, order, axis=-1) if boosted else cand_lp
        cand_tok = mx.where(finished[:, None], self.pad, order)
        first_col = mx.arange(k)[None, :] == 0
        factor = mx.where(finished[:, None], mx.where(first_col, 0.0, 1.0 - NEG_INF), 1.0)
        penalty = ((5.0 + mx.array(self.lengths)) / 6.0) ** self.length_penalty  # (R,)
        cand = (self.scores[:, None] + cand_lp * factor) / penalty[:, None]  # (R, k)
        groups = r // k
        flat = cand.reshape(groups, k * k)
        top = mx.argsort(-flat, axis=-1)[:, :k]  # (G, k)
        new_scores = mx.take_along_axis(flat, top, axis=-1).reshape(-1) * penalty  # NeMo: rank order x row penalty
        parents = (top // k + mx.arange(groups)[:, None] * k).reshape(-1)  # global row index
        tokens = mx.take_along_axis(cand_tok.reshape(groups, k * k), top, axis=-1).reshape(-1)
        token_lps = mx.take_along_axis(raw_lp.reshape(groups, k * k), top, axis=-1).reshape(-1)
        if boosted:  # NeMo follows the candidates' tree states from the top-k tokens (before <pad> replaces them)
            cand_next = self.boosts.next_states(self.boosts.state, order).reshape(groups, k * k)
            self.boosts.state = mx.take_along_axis(cand_next, top, axis=-1).reshape(-1)
        self.self_k = [a[parents] for a in self.self_k]
        self.self_v = [a[parents] for a in self.self_v]
        self.scores, self.last, self.offsets = new_scores, tokens, self.offsets + 1
        self.positions = [q + 1 for q in self.positions]
        checks = [mx.isfinite(lse[:, 0])] if self.guard else []  # float16/bfloat16: inf/NaN logits, per row
        mx.eval(parents, tokens, token_lps, *checks)  # the step's one sync
        for finite in checks:
            for i in np.flatnonzero(~np.array(finite)).tolist():
                self.rows[i].overflowed = True
        parents_h, tokens_h, lps_h = (np.array(a).tolist() for a in (parents, tokens, token_lps))
        self.hyps = [self.hyps[pa] + [t] for pa, t in zip(parents_h, tokens_h, strict=True)]
        self.hyp_lps = [self.hyp_lps[pa] + [lp] for pa, lp in zip(parents_h, lps_h, strict=True)]
        # NeMo's prefixes_len: 1 + the prefix's tokens (prompt included) that are not <|endoftext|>/<pad>.
        self.lengths = [
            1.0 + len(self.rows[i].prompt) + sum(t not in (self.eos, self.pad) for t in h)
            for i, h in enumerate(self.hyps)
        ]
        self.steps = [s + 1 for s in self.steps]
        return self._finish_done()

    def _finish_done(self, first_step: bool = False) -> list[Sequence]:
        """Sequences whose k hypotheses all ended, that hit their length limit, or were cancelled. NeMo checks for
        ended hypotheses only after a loop step, never after the first (prefill) step."""
        k, done, rows_done = self.k, [], []
        penalty = None
        for g in range(len(self.rows) // k):
            seq, rows = self.rows[g * k], range(g * k, g * k + k)
            ended = not first_step and all(self.hyps[i][-1] in (self.eos, self.pad) for i in rows)
            if not (ended or seq.cancelled or seq.overflowed or self.steps[g * k] >= seq.max_new_tokens):
                continue
            if penalty is None:
                lengths = mx.array(self.lengths)
                penalty = np.array(self.scores / ((5.0 + lengths) / 6.0) ** self.length_penalty).tolist()
            best = max(rows, key=lambda i: (penalty[i], -i))  # torch.argmax: first of equal maxima
            hyp = list(self.hyps[best])
            end = len(hyp)
            while end and hyp[end - 1] in (self.eos, self.pad):  # NeMo strips trailing <pad>/<|endoftext|> only:
                end -= 1  # a first-step <|endoftext|> followed by words stays in the hypothesis, as in NeMo
            seq.tokens = hyp[:end]
            seq.logprobs = self.hyp_lps[best][:end]
            seq.finished = end < len(hyp)
            seq.score = penalty[best]
            done.append(seq)
            rows_done += list(rows)
        if rows_done:
            leaving = set(rows_done)
            keep = [i for i in range(len(self.rows)) if i not in leaving]
            self._keep_rows(keep)
        return done

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.rows = []
            self._reset()
            return
        idx = mx.array(keep)
        for name in ("rows", "positions", "hyps", "hyp_lps", "lengths", "steps"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        self.self_k = [a[idx] for a in self.self_k]
        self.self_v = [a[idx] for a in self.self_v]
        self.cross_k = [a[idx] for a in self.cross_k]
        self.cross_v = [a[idx] for a in self.cross_v]
        self.cross_mask, self.offsets, self.last = self.cross_mask[idx], self.offsets[idx], self.last[idx]
        self.scores = self.scores[idx]
        self.boosts.keep(keep)
