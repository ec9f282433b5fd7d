"""Word and segment times from the decoder's own timestamp tokens (canary-1b-flash, canary-180m-flash).

With the `<|timestamp|>` prompt slot these models write `<|s|> word <|e|>`, s and e being encoder-frame indices.
`parse_timestamps` mirrors NeMo 3.0.0 `process_aed_timestamp_outputs` (and the `get_segment_offsets` it calls) in
nemo/collections/asr/parts/utils/timestamp_utils.py, quirks included: text outside a `<|s|>...<|e|>` pair is
dropped, an empty pair consumes its two timestamps, and a text without any pair is returned stripped, untimed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TimestampSource = Literal["tokens", "ctc"]

# timestamp_utils.py: a pair of frame tokens around a word, and the sentence ends that close a segment
_ANY_PAIR = re.compile(r"<\|\d+\|>.*?<\|\d+\|>")
_PAIR = re.compile(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>")
SEGMENT_DELIMITERS = (".", "?", "!")
NUM_TIMESTAMP_TOKENS = 900  # canary2 spl_tokens <|0|>..<|899|>


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds
    end: float
    start_offset: int  # encoder frames
    end_offset: int


@dataclass(frozen=True)
class TimedSegment:
    text: str  # the segment's words joined by spaces
    start: float
    end: float
    start_offset: int
    end_offset: int


@dataclass(frozen=True)
class Timestamps:
    text: str  # NeMo's hypothesis text after timestamp processing
    words: list[Word]
    segments: list[TimedSegment]


def has_timestamp_tokens(tokenizer) -> bool:
    try:
        tokenizer.special_id("<|0|>")
        tokenizer.special_id(f"<|{NUM_TIMESTAMP_TOKENS - 1}|>")
    except (KeyError, ValueError):
        return False
    return True


def timestamp_source(config, tokenizer) -> TimestampSource | None:
    """Where word times come from: "tokens" (flash models), "ctc" (canary-1b-v2's bundled CTC aligner), None.

    A converted model that carries the aligner sets `timestamps_ctc` in its config, and its timestamps must then
    never come from the `<|timestamp|>` prompt (NeMo forces `<|notimestamp|>` for it). Timestamp tokens are the
    flash models' (aggregate tokenizer); canary-1b-v2's unified vocabulary may hold them too, but that model was not
    trained to emit them (prompted with <|timestamp|> it ends at once, a third party reports), so a v2 converted
    without its aligner has no word times."""
    if getattr(config, "timestamps_ctc", None):
        return "ctc"
    aggregate = getattr(getattr(config, "tokenizer", None), "type", "aggregate") == "aggregate"
    if config.prompt_format == "canary2" and aggregate and has_timestamp_tokens(tokenizer):
        return "tokens"
    return None


def parse_timestamps(raw_text: str, window_stride: float = 0.01, subsampling_factor: int = 8) -> Timestamps:
    """`raw_text`: the decoded hypothesis with its timestamp tokens (`tokenizer.ids_to_text`).

    Times are `offset * window_stride * subsampling_factor`, multiplied in that order as NeMo does (80 ms frames)."""
    stride, factor = window_stride, subsampling_factor
    text = raw_text.strip()  # "training data artifact" (NeMo)
    if not _ANY_PAIR.search(text):
        return Timestamps(text, [], [])
    words = []
    for m in _PAIR.finditer(text):
        content = m.group(2).strip()
        if content:
            s, e = int(m.group(1)), int(m.group(3))
            words.append(Word(content, s * stride * factor, e * stride * factor, s, e))
    segments = [
        TimedSegment(" ".join(w.word for w in group), group[0].start, group[-1].end, group[0].start_offset,
                     group[-1].end_offset)
        for group in _sentences(words)
    ]  # fmt: skip
    return Timestamps(" ".join(w.word for w in words), words, segments)


def _sentences(words: list[Word]) -> list[list[Word]]:
    """get_segment_offsets without a gap threshold: a segment ends at a word ending in (or being) . ? !"""
    groups, current = [], []
    for w in words:
        current.append(w)
        if w.word[-1] in SEGMENT_DELIMITERS or w.word in SEGMENT_DELIMITERS:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups
