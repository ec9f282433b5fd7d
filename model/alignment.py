"""Word and segment times by CTC forced alignment (canary-1b-v2's bundled timestamps model), as NeMo 3.0.0 does.

`get_forced_aligned_timestamps_with_external_model` (nemo/collections/asr/parts/utils/timestamp_utils.py) aligns
the main model's text with the CTC log-probs: `get_utt_obj` (aligner_utils.py) splits the text into segments (at
. ? ! followed by a space) and words (at spaces), tokenizes each word on its own, and interleaves blanks;
`viterbi_decoding` finds the best path (batched, quirks included: padded frames of a shorter item may still move
its final state); `add_t_start_end_to_utt_obj` turns frames into seconds; `process_timestamps` rounds them and
pulls the end of a word/segment ending in punctuation back to the previous token's end. Ported literally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm

from .timestamps import TimedSegment, Timestamps, Word

PADDING_VALUE = -3.4e38  # aligner_utils.viterbi_decoding / get_batch_variables
SEGMENT_SEPARATORS = (".", "?", "!", "...")  # only single characters can match, as in NeMo's per-letter scan
WORD_SEPARATOR = " "
SUPPORTED_PUNCTUATION = frozenset({",", ".", "!", "?"})


@dataclass
class _Token:
    text: str
    s: int  # index into the token sequence with blanks
    t_start: float = -1
    t_end: float = -1


@dataclass
class _Span:  # a word or a segment: a range of that sequence
    text: str
    s_start: int
    s_end: int
    t_start: float = -1
    t_end: float = -1
    tokens: list[_Token] = field(default_factory=list)  # words: their non-blank tokens
    words: list[_Span] = field(default_factory=list)  # segments: their words


@dataclass
class Utterance:
    token_ids_with_blanks: list[int]
    segments: list[_Span]


def split_segments(text: str) -> list[str]:
    """get_utt_obj: cut after a separator letter followed by a space ("a.m." stays whole unless a space follows)."""
    segments, last = [], -1
    for i, letter in enumerate(text):
        following = text[i + 1] if i + 1 < len(text) else ""
        if letter in SEGMENT_SEPARATORS and following == " ":
            segments.append(text[last + 1 : i + 1].strip())
            last = i + 1
    if last < len(text):
        segments.append(text[last + 1 :].strip())
    return [s for s in segments if s]


def build_utterance(text: str, sp: spm.SentencePieceProcessor, num_frames: int, blank_id: int) -> Utterance:
    """get_utt_obj for a SentencePiece tokenizer. An empty text, or one with more tokens than frames, is not
    aligned (no segments)."""
    text = " ".join(text.split())  # get_batch_variables normalises whitespace first
    unk_id = sp.unk_id()
    unk_word, unk_piece = sp.decode_ids([unk_id]).strip(), sp.id_to_piece(unk_id)
    utt = Utterance([blank_id], [])
    if not text or len(sp.encode_as_ids(text)) > num_frames:
        return utt
    seg_ptr = word_ptr = 1  # s = 0 is the leading blank
    for segment in split_segments(text):
        n_seg_tokens = 0
        subs = segment.split(unk_word)
        for i, sub in enumerate(subs):
            n_seg_tokens += len(sp.encode_as_pieces(sub.strip())) + (i < len(subs) - 1)
        seg = _Span(segment, seg_ptr, seg_ptr + n_seg_tokens * 2 - 2)
        seg_ptr = seg.s_end + 2
        for word in segment.split(WORD_SEPARATOR):
            pieces, ids = _word_tokens(word, sp, unk_word, unk_piece, unk_id)
            w = _Span(word, word_ptr, word_ptr + len(pieces) * 2 - 2)
            word_ptr = w.s_end + 2
            for piece, token_id in zip(pieces, ids, strict=False):
                utt.token_ids_with_blanks += [token_id, blank_id]
                w.tokens.append(_Token(piece, len(utt.token_ids_with_blanks) - 2))
            seg.words.append(w)
        utt.segments.append(seg)
    return utt


def _word_tokens(word: str, sp, unk_word: str, unk_piece: str, unk_id: int) -> tuple[list[str], list[int]]:
    if word == unk_word:
        return [unk_piece], [unk_id]
    if unk_word in word:
        pieces, ids = [], []
        for sub in word.split(unk_word):
            pieces += list(sp.encode_as_pieces(sub)) + [unk_piece]
            ids += list(sp.encode_as_ids(sub)) + [unk_id]
        return pieces[:-1], ids[:-1]
    return list(sp.encode_as_pieces(word)), list(sp.encode_as_ids(word))


def viterbi(log_probs: list[np.ndarray], ys: list[list[int]], num_classes: int) -> list[list[int]]:
    """aligner_utils.viterbi_decoding on a batch: log_probs[b] (T_b, num_classes) float32, ys[b] the token ids with
    blanks. Returns, per item, the index into ys[b] that the best path occupies at each of its T_b frames."""
    b_size = len(log_probs)
    t_lens = np.array([lp.shape[0] for lp in log_probs])
    u_lens = np.array([len(y) for y in ys])
    t_max, u_max = int(t_lens.max()), int(u_lens.max())
    # (B, T_max, V + 1): the extra last class, always PADDING_VALUE, is what padded y positions point to
    padded = np.full((b_size, t_max, num_classes + 1), PADDING_VALUE, dtype=np.float32)
    y = np.full((b_size, u_max), num_classes, dtype=np.int64)
    for b in range(b_size):
        padded[b, : t_lens[b], :num_classes] = log_probs[b]
        y[b, : u_lens[b]] = ys[b]
    rows = np.arange(b_size)[:, None]
    repeat = y == np.roll(y, 2, axis=1)  # blank->blank or token->same token: no skip over the middle one
    repeat[:, :2] = False
    u = np.arange(u_max)[None]
    can_be_final = (u == u_lens[:, None]) | (u == u_lens[:, None] - 1)
    v_prev = np.full((b_size, u_max), PADDING_VALUE, dtype=np.float32)
    v_prev[:, :2] = padded[rows, 0, y[:, :2]]
    backpointers = np.full((b_size, t_max, u_max), -99, dtype=np.int8)
    with np.errstate(over="ignore"):  # PADDING_VALUE + PADDING_VALUE overflows to -inf in float32, as in torch
        for t in range(1, t_max):
            e = padded[rows, t, y]  # (B, U_max)
            e = e * ~((t >= t_lens)[:, None] & can_be_final)  # past an item's end its final states stay free
            shift1 = np.roll(v_prev, 1, axis=1)
            shift1[:, 0] = PADDING_VALUE
            shift2 = np.roll(v_prev, 2, axis=1)
            shift2[:, :2] = PADDING_VALUE
            shift2[repeat] = PADDING_VALUE
            candidates = np.stack([v_prev, shift1, shift2], axis=2) + e[:, :, None]  # (B, U_max, 3)
            backpointers[:, t] = np.argmax(candidates, axis=2)  # first maximum, as torch.max
            v_prev = candidates.max(axis=2)
    alignments = []
    for b in range(b_size):
        u_b = int(u_lens[b])
        current = 0 if u_b == 1 else int(np.argmax(v_prev[b, u_b - 2 : u_b])) + u_b - 2
        path = [current]
        for t in range(t_max - 1, 0, -1):
            current -= int(backpointers[b, t, current])
            path.append(current)
        alignments.append(path[::-1][: t_lens[b]])
    return alignments


def add_times(utt: Utterance, alignment: list[int], frame_seconds: float) -> None:
    """add_t_start_end_to_utt_obj: start = first frame on s_start, end = (last frame on s_end + 1), in seconds."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    prev = -1
    for t, s in enumerate(alignment):
        if s > prev:
            first[s] = t
            if prev >= 0:
                last[prev] = t - 1
        prev = s
    last[prev] = len(alignment) - 1

    def start(s: int) -> float:
        return first[s] * frame_seconds if s in first else -1

    def end(s: int) -> float:
        return (last[s] + 1) * frame_seconds if s in last else -1

    for seg in utt.segments:
        seg.t_start, seg.t_end = start(seg.s_start), end(seg.s_end)
        for w in seg.words:
            w.t_start, w.t_end = start(w.s_start), end(w.s_end)
            for tok in w.tokens:
                tok.t_start, tok.t_end = start(tok.s), end(tok.s)


def _offset(seconds: float, frame_seconds: float) -> int:
    return int(seconds / frame_seconds) if seconds != -1 else -1


def collect(utt: Utterance, frame_seconds: float) -> tuple[list[Word], list[TimedSegment]]:
    """process_timestamps (word + segment): times rounded to 10 ms; a punctuation token moves to the end of the
    previous token, and so does the end of a word / segment that ends with it."""
    words: list[dict] = []
    segments: list[dict] = []
    for seg in utt.segments:
        segments.append(_entry(seg, frame_seconds))
        for w in seg.words:
            words.append(_entry(w, frame_seconds))
            for i, tok in enumerate(w.tokens):
                if tok.text not in SUPPORTED_PUNCTUATION:
                    continue
                prev_end = round(w.tokens[i - 1].t_end, 2) if i > 0 else round(tok.t_start, 2)
                if seg.t_end == w.t_end:
                    segments[-1].update(end=prev_end, end_offset=_offset(prev_end, frame_seconds))
                if w.t_end == tok.t_end:
                    words[-1].update(end=prev_end, end_offset=_offset(prev_end, frame_seconds))
                tok.t_start = tok.t_end = prev_end
    return [Word(**d) for d in words], [TimedSegment(**{"text": d.pop("word"), **d}) for d in segments]


def _entry(span: _Span, frame_seconds: float) -> dict:
    return {
        "word": span.text,
        "start": round(span.t_start, 2),
        "end": round(span.t_end, 2),
        "start_offset": _offset(span.t_start, frame_seconds),
        "end_offset": _offset(span.t_end, frame_seconds),
    }


def align(
    texts: list[str],
    log_probs: list[np.ndarray],
    sp: spm.SentencePieceProcessor,
    blank_id: int,
    frame_seconds: float,
) -> list[Timestamps]:
    """Word and segment times for each text, given the CTC log-probs (T_b, vocab + 1) of its audio: one Viterbi
    batch, as NeMo aligns one transcribe batch."""
    utts = [build_utterance(text, sp, lp.shape[0], blank_id) for text, lp in zip(texts, log_probs, strict=True)]
    paths = viterbi(log_probs, [u.token_ids_with_blanks for u in utts], log_probs[0].shape[1])
    out = []
    for text, utt, path in zip(texts, utts, paths, strict=True):
        add_times(utt, path, frame_seconds)
        words, segments = collect(utt, frame_seconds)
        out.append(Timestamps(text, words, segments))
    return out
