"""NeMo's streaming audio buffer for one live stream: chunk / left / right context, fed as audio arrives.

Mirrors `StreamingBatchedAudioBuffer` + the feeding loop of NeMo 3.0.0's
`examples/asr/asr_chunked_inference/aed/speech_to_text_aed_streaming_infer.py` for one row: the first step takes
C+R samples, every later one C (the last one what is left); the buffer keeps the newest L+C+R samples and is
re-encoded whole at every step (no encoder cache, per-feature normalisation over the buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StreamingConfig:
    """NeMo's `AEDStreamingDecodingConfig` plus the example script's context seconds (its defaults)."""

    chunk_secs: float = 2.0
    left_context_secs: float = 10.0
    right_context_secs: float = 2.0
    policy: str = "waitk"  # "waitk" or "alignatt"
    alignatt_thr: float = 8.0
    waitk_lagging: int = 2
    exclude_sink_frames: int = 8
    xatt_scores_layer: int = -2
    hallucinations_detector: bool = True

    def __post_init__(self) -> None:
        if self.policy not in ("waitk", "alignatt"):
            raise ValueError(f"streaming policy must be 'waitk' or 'alignatt', not {self.policy!r}")
        if self.chunk_secs <= 0 or self.left_context_secs < 0 or self.right_context_secs < 0:
            raise ValueError("chunk seconds must be > 0 and context seconds >= 0")

    @property
    def alignatt_budget(self) -> int:
        """Tokens per chunk before the last: the state's `10 * int(chunk + right)` (initialize_aed_model_state);
        NeMo's config value `max_tokens_per_alignatt_step` (30) is not what the computer uses."""
        return 10 * int(self.chunk_secs + self.right_context_secs)


@dataclass(frozen=True)
class ContextFrames:
    """Context sizes in encoder frames (NeMo: integer truncation of seconds * 100 / 8) and samples per frame."""

    left: int
    chunk: int
    right: int
    frame_samples: int  # one encoder frame in samples (1280 at 16 kHz, hop 160, subsampling 8)

    @classmethod
    def of(cls, cfg: StreamingConfig, sample_rate: int, hop: int, subsampling: int) -> ContextFrames:
        per_sec = sample_rate / hop  # 1 / window_stride
        feat_samples = (hop // subsampling) * subsampling  # make_divisible_by(int(sr * stride), subsampling)
        frames = [
            int(s * per_sec / subsampling) for s in (cfg.left_context_secs, cfg.chunk_secs, cfg.right_context_secs)
        ]
        if frames[1] < 1:
            raise ValueError(f"chunk_secs {cfg.chunk_secs} is shorter than one encoder frame")
        return cls(*frames, frame_samples=feat_samples * subsampling)

    def samples(self, frames: int) -> int:
        return frames * self.frame_samples

    @property
    def total_samples(self) -> int:
        return self.samples(self.left + self.chunk + self.right)


class AudioBuffer:
    """Samples received (`pending`) and the window last encoded (`samples`), with NeMo's per-row bookkeeping
    (`ContextSizeBatch.add_frames_` with is_last_chunk_batch all False, as the example script calls it)."""

    def __init__(self, ctx: ContextFrames) -> None:
        self.ctx = ctx
        self.pending = np.zeros(0, np.float32)
        self.samples = np.zeros(0, np.float32)
        self.left = self.chunk = self.right = 0  # in samples
        self.steps = 0  # chunks fed so far
        self.ended = False  # no more audio will come
        self.fed_last = False  # the chunk holding the final sample has been fed

    def append(self, audio: np.ndarray) -> None:
        if self.ended:
            raise ValueError("audio after the end of the stream")
        self.pending = np.concatenate([self.pending, np.asarray(audio, np.float32).reshape(-1)])

    def end(self) -> None:
        self.ended = True

    @property
    def need(self) -> int:
        """Samples the next step takes: C+R first, then C."""
        return self.ctx.samples(self.ctx.chunk + (self.ctx.right if self.steps == 0 else 0))

    @property
    def ready(self) -> bool:
        """A full chunk is waiting, or the stream ended and its last chunk has not been fed yet."""
        if self.fed_last:
            return False
        return len(self.pending) >= self.need or self.ended

    def feed(self) -> bool:
        """Move the next chunk into the window; returns whether it was the last one (NeMo's is_last_chunk).
        A stream that ends on an exact chunk boundary gets one more step with no new audio (NeMo, knowing the
        file length, would have marked the step before as last)."""
        take = min(self.need, len(self.pending))
        added, self.pending = self.pending[:take], self.pending[take:]
        last = self.ended and len(self.pending) == 0
        c = self.ctx.samples(self.ctx.chunk)
        self.left += self.chunk
        self.right += take
        self.chunk = c
        self.right -= c
        extra = max(self.left + self.chunk + self.right - self.ctx.total_samples, 0)
        self.left = max(self.left - extra, 0)
        self.samples = np.concatenate([self.samples, added])[-self.ctx.total_samples :]
        self.steps += 1
        self.fed_last = last
        return last

    @property
    def end_of_window(self) -> int:
        """The example script's `end_of_window_sample` for the chunk just fed."""
        return self.ctx.samples(self.ctx.chunk) * self.steps

    def encoder_length(self) -> int:
        """Frames cross-attention may see before the last chunk: left + chunk, never the right context."""
        e = self.ctx.frame_samples
        return self.left // e + self.chunk // e

    def encoder_shift(self) -> int:
        """NeMo's prev_encoder_shift: > 0 once audio has left the window."""
        return max(self.end_of_window // self.ctx.frame_samples - self.ctx.left - self.ctx.chunk, 0)
