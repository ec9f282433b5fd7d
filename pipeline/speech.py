"""Where the speech is (Silero VAD, pipeline/vad.py), for every request: audio without speech is answered with
empty text without decoding, and long audio is cut in the pauses between speech regions.

Audio up to the chunk length is decoded whole (NeMo-exact) whenever it has speech; the VAD only decides whether it
has any. Longer audio is cut at the middle of the last pause of at least `silence_duration_ms` that ends a piece of
at most the chunk length, the next piece starting `prefix_padding_ms` before its speech; where a window has no
such pause the energy rule (chunking.py) picks the cut, as before. OpenAI's `chunking_strategy` (`auto`, or
`server_vad` with these fields) sets the parameters per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canary_server.pipeline import vad
from canary_server.pipeline.chunking import Chunk, split_audio

BLOCK_SECONDS = 30.0  # audio run through the VAD at once (its convolutions hold ~20x the block's samples)


@dataclass(frozen=True)
class VadParams:
    """OpenAI's `server_vad` fields. Defaults: OpenAI's threshold and silence; a prefix of 100 ms, not its 300:
    cutting long audio, 100 ms never cut into speech in noise where 30 ms did, and more silence in front of a piece
    only costs a model trained on trimmed clips words (BENCHMARKS.md "Cutting long audio")."""

    threshold: float = 0.5
    prefix_padding_ms: int = 100
    silence_duration_ms: int = 200


def speech_probabilities(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """One probability per 32 ms window (the VAD's 16 kHz; other rates are not cut by it)."""
    if sample_rate != vad.SAMPLE_RATE:
        raise ValueError(f"the VAD needs {vad.SAMPLE_RATE} Hz audio, not {sample_rate}")
    stream, block = vad.VadStream(), int(BLOCK_SECONDS * sample_rate)
    probs = [stream.feed(samples[i : i + block]) for i in range(0, len(samples), block)]
    tail = -len(samples) % vad.WINDOW  # a last partial window, padded with zeros as the whole-clip function does
    probs.append(stream.feed(np.zeros(tail, np.float32)))
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)


def has_speech(probs: np.ndarray, params: VadParams) -> bool:
    """Any window at or above the threshold: the model decides what was said (a gate, not a transcript)."""
    return bool(len(probs)) and float(probs.max()) >= params.threshold


def pauses(probs: np.ndarray, params: VadParams) -> list[tuple[float, float]]:
    """(start, end) seconds of the pauses between speech regions, at least `silence_duration_ms` long."""
    regions = vad.speech_regions(
        probs, threshold=params.threshold, min_speech_s=0.1, min_silence_s=params.silence_duration_ms / 1000, pad_s=0
    )
    return [(a[1], b[0]) for a, b in zip(regions, regions[1:], strict=False)]


def split_at_pauses(
    samples: np.ndarray, sample_rate: int, max_seconds: float, probs: np.ndarray, params: VadParams
) -> list[Chunk]:
    """Chunks of at most `max_seconds` covering all of `samples`, in order, without gaps or overlap: cut in the
    VAD's pauses, by the energy rule in a window without one."""
    total = len(samples) / sample_rate
    if total <= max_seconds:
        return [Chunk(0.0, total, samples)]
    gaps = pauses(probs, params)
    prefix = params.prefix_padding_ms / 1000
    bounds, pos = [], 0.0
    while total - pos > max_seconds:
        limit = pos + max_seconds
        # cut points: the middle of a pause, or `prefix` before its end when the pause is long; after 1 s of piece
        points = [max((a + b) / 2, b - prefix) for a, b in gaps if a >= pos + 1.0]
        cuts = [p for p in points if p <= limit]
        if cuts:
            cut = cuts[-1]
        else:  # no pause in this window: the energy rule's quietest point in its last SEARCH_SECONDS
            start = round(pos * sample_rate)
            window = samples[start : start + round(max_seconds * sample_rate) + 1]
            first = split_audio(window, sample_rate, max_seconds)[0]
            cut = pos + first.end
        bounds.append((pos, cut))
        pos = cut
    bounds.append((pos, total))
    out = []
    for a, b in bounds:
        i, j = round(a * sample_rate), round(b * sample_rate)
        out.append(Chunk(i / sample_rate, j / sample_rate, samples[i:j]))
    return out
