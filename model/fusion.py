"""Per-row phrase-boosting state of a beam decoder: NeMo's shallow fusion (BeamSearchSequenceGeneratorWithFusionModels,
transformer_generators.py) with a different boosting tree (or none) on every row.

The trees in use are laid end to end in one table ("forest"; state 0 is a null state that scores 0 for every label),
each row holds its global state, so one gather + one scatter per step give every row its own (R, V) scores, whatever
mix of keyword lists and plain requests shares the batch. The forest is rebuilt only when a row brings a tree that is
not in it (and then holds only the trees of rows present), so a server-wide list costs one build.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .boosting import BoostingTree


class RowBoosts:
    """Rows' tree states, weights and the forest tables. Not thread-safe: owned by the decoder."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab = vocab_size
        self.trees: list[BoostingTree | None] = []  # host: each row's tree
        self.state = mx.zeros((0,), mx.int32)  # (R,) global state in the forest
        self.alpha = mx.zeros((0,), mx.float32)  # (R,) each row's boosting_tree_alpha (0: none)
        self._offsets: dict[int, int] = {}  # id(tree) -> first state in the forest
        self._build([])

    @property
    def active(self) -> bool:
        """Some row boosts: only then do steps pay for the scores."""
        return any(t is not None for t in self.trees)

    # ---- rows ---------------------------------------------------------------------------------------------
    def starts(self, trees: list[BoostingTree | None]) -> mx.array:
        """The start (root) states of sequences about to join; the forest takes in their trees first."""
        missing = [t for t in trees if t is not None and id(t) not in self._offsets]
        if missing:
            self._rebuild(missing)
        return mx.array([self._offsets.get(id(t), 0) for t in trees], dtype=mx.int32)

    def append(self, trees: list[BoostingTree | None], alphas: list[float], states: mx.array) -> None:
        self.trees += trees
        self.alpha = mx.concatenate([self.alpha, mx.array(alphas, dtype=mx.float32)])
        self.state = mx.concatenate([self.state, states.astype(mx.int32)])

    def keep(self, keep: list[int]) -> None:
        idx = mx.array(keep, dtype=mx.int32)
        self.trees = [self.trees[i] for i in keep]
        self.state, self.alpha = self.state[idx], self.alpha[idx]

    def reset(self) -> None:
        self.__init__(self.vocab)

    # ---- scores -------------------------------------------------------------------------------------------
    def fuse(self, logp: mx.array, states: mx.array, alpha: mx.array) -> mx.array:
        """NeMo: log_probs += alpha * fusion_scores (float32), for (n, V) log-probs at `states`."""
        base = self.base[states]  # (n,)
        dense = mx.broadcast_to(base[:, None], (base.shape[0], self.vocab + 1))  # +1: the dummy column
        dense = mx.put_along_axis(dense, self.labels[states], self.weights[states], axis=-1)
        return logp + alpha[:, None] * dense[:, : logp.shape[-1]]

    def next_states(self, states: mx.array, tokens: mx.array) -> mx.array:
        """(n,) states, (n, k) candidate tokens -> (n, k) next states (a label no chain state has: the root)."""
        labels = self.labels[states]  # (n, K)
        match = labels[:, None, :] == tokens[:, :, None]  # (n, k, K): at most one hit per candidate
        slot = mx.argmax(match, axis=-1)  # (n, k)
        hit = mx.take_along_axis(match, slot[..., None], axis=-1)[..., 0]
        nxt = mx.take_along_axis(self.nexts[states], slot, axis=-1)
        return mx.where(hit, nxt, self.roots[states][:, None])

    # ---- the forest ---------------------------------------------------------------------------------------
    def _rebuild(self, new: list[BoostingTree]) -> None:
        """Forest = the trees of present rows + `new`; present rows' states move with their trees."""
        present = {id(t): t for t in self.trees if t is not None}
        for t in new:
            present.setdefault(id(t), t)
        old = dict(self._offsets)
        self._build(list(present.values()))
        if self.trees:
            delta = [self._offsets[id(t)] - old[id(t)] if t is not None else 0 for t in self.trees]
            self.state = self.state + mx.array(delta, dtype=mx.int32)

    def _build(self, trees: list[BoostingTree]) -> None:
        k = max([t.labels.shape[1] for t in trees], default=1)
        base, labels, weights, nexts, roots = [np.zeros(1, np.float32)], [], [], [], [np.zeros(1, np.int32)]
        labels.append(np.full((1, k), self.vocab, np.int32))
        weights.append(np.zeros((1, k), np.float32))
        nexts.append(np.zeros((1, k), np.int32))
        self._offsets, offset = {}, 1
        for t in trees:
            s, pad = t.num_states, ((0, 0), (0, k - t.labels.shape[1]))
            self._offsets[id(t)] = offset
            base.append(t.base)
            labels.append(np.pad(t.labels, pad, constant_values=self.vocab))
            weights.append(np.pad(t.weights, pad))
            nexts.append(np.pad(t.nexts, pad) + offset)
            roots.append(np.full(s, offset, np.int32))
            offset += s
        self.base = mx.array(np.concatenate(base))  # (S,)
        self.labels = mx.array(np.concatenate(labels))  # (S, K)
        self.weights = mx.array(np.concatenate(weights))
        self.nexts = mx.array(np.concatenate(nexts))
        self.roots = mx.array(np.concatenate(roots))  # (S,) the root of each state's tree
