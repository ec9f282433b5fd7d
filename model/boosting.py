"""Phrase boosting: NeMo's GPU-PB boosting tree (shallow fusion of keyword phrases into beam search).

Mirrors nemo/collections/asr/parts/context_biasing/{context_graph_universal,boosting_graph_batched}.py and the
batched advance of submodules/ngram_lm/ngram_lm_batched.py (NeMo 3.0.0) with Canary's settings (AEDBeamInferConfig:
depth_scaling 1.0; context_score 1.0, unk_score 0.0, final_eos_score 1.0, score_per_phrase 0.0, not uniform).

The tree is an Aho-Corasick trie over the phrases' token ids. NeMo's `advance(state, eos_id)` gives, for every
label v, a score and a next state: the first state on the back-off chain state -> fail -> ... -> root that has an arc
labelled v wins, its arc weight plus the back-off weights summed on the way (float32, in chain order); the root has
an arc for every label (unk_score, back to the root). At <|endoftext|> the score is max(0, the row's best score) plus
the state's final weight, and the state stays. Here that function is tabulated per state once, at build time:
`base` (the score of a label no state on the chain has), and up to K `labels` with their own `weights` and `nexts`
(including <|endoftext|>). A decoder step then needs one gather and one scatter per row, on the device.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import CanaryError
from .tokenizer import AggregateTokenizer

CONTEXT_SCORE = 1.0  # BoostingTreeModelConfig.context_score
DEPTH_SCALING = 1.0  # AEDBeamInferConfig: BoostingTreeModelConfig(depth_scaling=1.0) for Canary
UNK_SCORE = 0.0  # BoostingTreeModelConfig.unk_score
FINAL_EOS_SCORE = 1.0  # BoostingTreeModelConfig.final_eos_score
DEFAULT_ALPHA = 1.0  # boosting_tree_alpha when none is given (NeMo's default 0.0 would boost nothing); see README


class UnspellablePhrase(CanaryError):
    """A keyword phrase the model's tokenizer (for aggregate tokenizers: the language's) cannot spell."""

    def __init__(self, phrase: str, lang: str | None) -> None:
        where = f"the {lang!r} tokenizer" if lang else "the model's tokenizer"
        super().__init__(f"keyword {phrase!r} cannot be spelled with {where} (unknown or special pieces)")
        self.phrase = phrase


@dataclass(eq=False)
class _Node:
    level: int
    token_score: float = 0.0
    node_score: float = 0.0
    is_end: bool = False
    next: dict[int, _Node] = field(default_factory=dict)
    fail: _Node | None = None


@dataclass(frozen=True, eq=False)
class BoostingTree:
    """One phrase list, tabulated. State 0 is the root. Arrays: base (S,) float32; labels, nexts (S, K) int32 and
    weights (S, K) float32, unused slots labelled `vocab_size` (a dummy column)."""

    phrases: tuple[str, ...]
    vocab_size: int
    base: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    nexts: np.ndarray

    @property
    def num_states(self) -> int:
        return int(self.base.shape[0])


def phrase_ids(tokenizer, phrase: str, lang: str | None) -> list[int]:
    """The phrase's token ids (aggregate tokenizers: `lang`'s sub-tokenizer, as NeMo's from_config); refuses
    phrases with unknown pieces or special tokens (the unified tokenizer spells `<|...|>` as specials)."""
    ids = tokenizer.text_to_ids(phrase, lang)
    special = set(tokenizer.special_tokens.values())
    if not ids or any(i in special or i in tokenizer.unknown_ids for i in ids):
        raise UnspellablePhrase(phrase, lang if isinstance(tokenizer, AggregateTokenizer) else None)
    return ids


def build_tree(tokenizer, phrases: list[str] | tuple[str, ...], lang: str | None, vocab_size: int) -> BoostingTree:
    """The boosting tree of `phrases` over `vocab_size` labels (the model's head classes)."""
    unique = list(dict.fromkeys(phrases))  # NeMo keys its phrases by text: duplicates count once
    root = _trie([phrase_ids(tokenizer, p, lang) for p in unique])
    order = _fill_fail(root)
    return _tabulate(tuple(unique), root, order, vocab_size, tokenizer.eos_id)


def _trie(token_lists: list[list[int]]) -> _Node:
    """ContextGraph.build: a shared prefix keeps the larger token score (all equal with one context_score)."""
    root = _Node(level=0)
    for tokens in token_lists:
        node = root
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            child = node.next.get(token)
            if child is None:
                # float64 as in NeMo (np.log); cast to float32 when tabulated, like BoostingTreeStorage
                score = CONTEXT_SCORE * DEPTH_SCALING + float(np.log(i + 1)) if i > 0 else CONTEXT_SCORE
                child = node.next[token] = _Node(i + 1, score, node.node_score + score, last)
            else:
                child.token_score = max(CONTEXT_SCORE, child.token_score)
                child.node_score = node.node_score + child.token_score
                child.is_end = last or child.is_end
            node = child
    return root


def _fill_fail(root: _Node) -> list[_Node]:
    """ContextGraph._fill_fail_output's fail arcs, verbatim; returns the nodes in breadth-first order."""
    root.fail = root
    order, queue = [], deque()
    for node in root.next.values():
        node.fail = root
        queue.append(node)
    while queue:
        current = queue.popleft()
        order.append(current)
        for token, node in current.next.items():
            fail = current.fail
            if token in fail.next:
                fail = fail.next[token]
            else:
                fail = fail.fail
                while token not in fail.next:
                    fail = fail.fail
                    if fail is root:
                        break
                if token in fail.next:
                    fail = fail.next[token]
            node.fail = fail
            queue.append(node)
    return order


def _tabulate(phrases, root: _Node, nodes: list[_Node], vocab_size: int, eos: int) -> BoostingTree:
    """NeMo's advance for every state: walk the back-off chain accumulating float32 back-off weights; the first
    chain state with an arc for a label decides its score and next state."""
    all_nodes = [root, *nodes]
    index = {id(n): i for i, n in enumerate(all_nodes)}
    arcs = {  # per node: its arcs' labels, float32 weights (BoostingTreeStorage keeps float32) and target states
        id(n): (
            np.fromiter(n.next.keys(), np.int64, len(n.next)),
            np.array([c.token_score for c in n.next.values()], np.float32),
            np.array([index[id(c)] for c in n.next.values()], np.int64),
        )
        for n in all_nodes
    }
    rows, base = [], np.zeros(len(all_nodes), np.float32)
    for i, node in enumerate(all_nodes):
        labels, weights, nexts = [], [], []
        acc, cur = np.float32(0.0), node
        while True:
            lab, w, nxt = arcs[id(cur)]
            labels.append(lab)
            weights.append(acc + w)  # float32 + float32, as torch adds accumulated_backoff + arc weight
            nexts.append(nxt)
            if cur is root:
                break
            acc = np.float32(acc + _backoff_weight(cur))
            cur = cur.fail
        base[i] = np.float32(acc + np.float32(UNK_SCORE))  # the root's arcs for every other label
        lab, first = np.unique(np.concatenate(labels), return_index=True)  # nearest chain state wins
        w, nxt = np.concatenate(weights)[first], np.concatenate(nexts)[first]
        # <|endoftext|>: max(0, the row's best score) + the final weight; the state stays (GPUBoostingTreeModel.advance)
        best = max(w.max(initial=-np.inf), base[i]) if len(lab) < vocab_size else w.max()
        final = np.float32(FINAL_EOS_SCORE if node.is_end else 0.0)
        keep = lab != eos
        lab = np.append(lab[keep], eos)
        w = np.append(w[keep], np.float32(max(best, np.float32(0.0)) + final)).astype(np.float32)
        rows.append((lab, w, np.append(nxt[keep], i)))
    k = max(len(r[0]) for r in rows)
    labels = np.full((len(rows), k), vocab_size, np.int32)
    weights = np.zeros((len(rows), k), np.float32)
    nexts = np.zeros((len(rows), k), np.int32)
    for i, (lab, w, nxt) in enumerate(rows):
        labels[i, : len(lab)], weights[i, : len(lab)], nexts[i, : len(lab)] = lab, w, nxt
    return BoostingTree(phrases, vocab_size, base, labels, weights, nexts)


def _backoff_weight(node: _Node) -> np.float32:
    """BoostingTreeStorage: leaving a phrase's end costs nothing; elsewhere the score gained so far is taken back."""
    if node.is_end:
        return np.float32(0.0)
    return np.float32(node.fail.node_score - node.node_score)


class TreeCache:
    """Boosting trees by content (phrases, language), least recently used dropped past `size`: a server-wide list
    and a client's repeated list are built once. (A plain object, not a dict: it lives on an nn.Module.)"""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._trees: dict[tuple, BoostingTree] = {}

    def get(self, tokenizer, phrases: tuple[str, ...], lang: str | None, vocab_size: int) -> BoostingTree:
        key = (phrases, lang)
        tree = self._trees.pop(key, None)
        if tree is None:
            tree = build_tree(tokenizer, phrases, lang, vocab_size)
        self._trees[key] = tree  # most recently used last
        while len(self._trees) > self.size:
            del self._trees[next(iter(self._trees))]
        return tree
