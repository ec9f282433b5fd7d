"""Split long audio into pieces the model can decode, cutting at low-energy points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cuts are searched in the last SEARCH_SECONDS of each window (at most half the window).
SEARCH_SECONDS = 5.0
FRAME_SECONDS = 0.02  # RMS frame length; hop is half of it
LEAD_SECONDS = 0.03  # pause kept before the speech that follows a cut
MIN_TAIL_SECONDS = 2.0  # a shorter last piece joins the one before it (when that fits): no one-word cue at the end


@dataclass(frozen=True)
class Chunk:
    start: float  # seconds from the start of the file
    end: float
    audio: np.ndarray


def _quietest_point(region: np.ndarray, frame: int, lead: int) -> int:
    """Index into `region` where to cut: in its longest pause, or at its end if nothing is quieter."""
    hop = max(frame // 2, 1)
    if len(region) <= frame:
        return len(region) // 2
    n = 1 + (len(region) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]  # (n, frame)
    energy = np.mean(np.square(region[idx], dtype=np.float64), axis=1)
    if energy.min() > 0.5 * np.median(energy):  # no real pause here: use the whole window
        return len(region)
    # Frames within 2x of the quietest form pauses; use the longest (a short gap between two words is as
    # quiet as a sentence break, but cutting there can clip a word). Cut shortly before the pause ends: the
    # next piece then starts near its speech onset (better cue times; models are trained on trimmed clips).
    quiet = np.flatnonzero(energy <= 2 * energy.min() + 1e-10)
    runs = np.split(quiet, np.flatnonzero(np.diff(quiet) > 1) + 1)
    longest = max(runs, key=len)
    pause_start, pause_end = int(longest[0] * hop), int(longest[-1] * hop + frame)
    return max((pause_start + pause_end) // 2, pause_end - lead)


def split_audio(audio: np.ndarray, sample_rate: int, max_seconds: float) -> list[Chunk]:
    """Chunks of at most `max_seconds` covering all of `audio`, in order, without gaps or overlap."""
    max_len = max(int(max_seconds * sample_rate), 1)
    search = min(int(SEARCH_SECONDS * sample_rate), max_len // 2)
    frame = max(int(FRAME_SECONDS * sample_rate), 1)
    bounds, pos = [], 0
    while len(audio) - pos > max_len:
        lo = pos + max_len - search
        cut = lo + _quietest_point(audio[lo : pos + max_len], frame, int(LEAD_SECONDS * sample_rate))
        bounds.append((pos, cut))
        pos = cut
    bounds.append((pos, len(audio)))
    return [Chunk(a / sample_rate, b / sample_rate, audio[a:b]) for a, b in bounds]


def merge_short_tail(chunks: list[Chunk], audio: np.ndarray, sample_rate: int, max_seconds: float) -> list[Chunk]:
    """`chunks` with a last piece shorter than MIN_TAIL_SECONDS joined to the one before, if that fits in
    `max_seconds` (short pieces are cut for subtitle cues; a fraction of a word decodes badly on its own)."""
    if len(chunks) < 2 or chunks[-1].end - chunks[-1].start >= MIN_TAIL_SECONDS:
        return chunks
    prev = chunks[-2]
    if chunks[-1].end - prev.start > max_seconds:
        return chunks
    start = round(prev.start * sample_rate)
    return [*chunks[:-2], Chunk(prev.start, chunks[-1].end, audio[start:])]
