"""Split long audio into pieces the model can decode, cutting at low-energy points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cuts are searched in the last SEARCH_SECONDS of each window (at most half the window).
SEARCH_SECONDS = 5.0
FRAME_SECONDS = 0.02  # RMS frame length; hop is half of it


@dataclass(frozen=True)
class Chunk:
    start: float  # seconds from the start of the file
    end: float
    audio: np.ndarray


def _quietest_point(region: np.ndarray, frame: int) -> int:
    """Index into `region` at the centre of its lowest-RMS frame, or its end if nothing is quieter."""
    hop = max(frame // 2, 1)
    if len(region) <= frame:
        return len(region) // 2
    n = 1 + (len(region) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]  # (n, frame)
    energy = np.mean(np.square(region[idx], dtype=np.float64), axis=1)
    if energy.min() > 0.5 * np.median(energy):  # no real pause here: use the whole window
        return len(region)
    # Among equally quiet frames (e.g. digital silence) take the middle one of the first quiet run.
    quiet = np.flatnonzero(energy <= energy.min() + 1e-12)
    runs = np.split(quiet, np.flatnonzero(np.diff(quiet) > 1) + 1)
    best = runs[0][len(runs[0]) // 2]
    return int(best * hop + frame // 2)


def split_audio(audio: np.ndarray, sample_rate: int, max_seconds: float) -> list[Chunk]:
    """Chunks of at most `max_seconds` covering all of `audio`, in order, without gaps or overlap."""
    max_len = max(int(max_seconds * sample_rate), 1)
    search = min(int(SEARCH_SECONDS * sample_rate), max_len // 2)
    frame = max(int(FRAME_SECONDS * sample_rate), 1)
    bounds, pos = [], 0
    while len(audio) - pos > max_len:
        lo = pos + max_len - search
        cut = lo + _quietest_point(audio[lo : pos + max_len], frame)
        bounds.append((pos, cut))
        pos = cut
    bounds.append((pos, len(audio)))
    return [Chunk(a / sample_rate, b / sample_rate, audio[a:b]) for a, b in bounds]
