"""Log-mel features exactly as NeMo >= 2.5 `AudioToMelSpectrogramPreprocessor` (FilterbankFeatures).

Reference §1.2: pre-emphasis masked to the true length, centred STFT with zero padding, power spectrum,
Slaney mel filterbank from the checkpoint, log with an additive guard, per-feature normalisation with the
unbiased std over valid frames (+1e-5 on the std), padded frames zeroed. Everything in float32.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import PreprocessorConfig

NORM_EPS = 1e-5  # nemo/collections/asr/parts/preprocessing/features.py CONSTANT


def feature_lengths(num_samples: mx.array, hop_length: int) -> mx.array:
    """Valid feature frames per item: floor(L / hop) (>= 2.5: no +1)."""
    return num_samples // hop_length


def log_mel(
    audio: mx.array, lengths: mx.array, fb: mx.array, window: mx.array, cfg: PreprocessorConfig
) -> tuple[mx.array, mx.array]:
    """audio (B, L) float32 right-padded, lengths (B,) -> features (B, T, F) with T = L // hop + 1, valid (B,)."""
    batch, num = audio.shape
    audio = audio.astype(mx.float32)
    sample_mask = mx.arange(num)[None, :] < lengths[:, None]  # (B, L)
    emphasized = mx.concatenate([audio[:, :1], audio[:, 1:] - cfg.preemph * audio[:, :-1]], axis=1)
    emphasized = mx.where(sample_mask, emphasized, 0.0)

    half = cfg.n_fft // 2
    padded = mx.pad(emphasized, [(0, 0), (half, half)])  # centre=True, pad_mode="constant"
    n_frames = num // cfg.hop_length + 1
    frames = mx.as_strided(
        padded, shape=(batch, n_frames, cfg.n_fft), strides=(num + 2 * half, cfg.hop_length, 1)
    )  # (B, T, n_fft)
    left = (cfg.n_fft - cfg.win_length) // 2  # torch.stft centres the shorter window inside n_fft
    win = mx.pad(window.astype(mx.float32), [(left, cfg.n_fft - cfg.win_length - left)])
    spec = mx.fft.rfft(frames * win, n=cfg.n_fft, axis=-1)  # (B, T, n_fft/2+1) complex64
    re, im = mx.real(spec), mx.imag(spec)
    magnitude = mx.sqrt(re * re + im * im)  # x * x, as torch computes x ** 2 (MLX's ** is a pow per element)
    if cfg.mag_power == 2.0:
        power = magnitude * magnitude
    else:
        power = magnitude**cfg.mag_power if cfg.mag_power != 1.0 else magnitude
    mel = power @ fb.astype(mx.float32).T  # (B, T, F)
    feats = mx.log(mel + cfg.log_zero_guard_value)

    valid = feature_lengths(lengths, cfg.hop_length)
    feats = _normalize_per_feature(feats, valid)
    frame_mask = (mx.arange(n_frames)[None, :] < valid[:, None])[..., None]  # (B, T, 1)
    feats = mx.where(frame_mask, feats, cfg.pad_value)
    if cfg.pad_to > 0 and n_frames % cfg.pad_to:
        feats = mx.pad(feats, [(0, 0), (0, cfg.pad_to - n_frames % cfg.pad_to), (0, 0)], cfg.pad_value)
    return feats, valid


def _normalize_per_feature(x: mx.array, valid: mx.array) -> mx.array:
    """(x - mean) / (std + eps) per mel bin over the first `valid` frames; std is unbiased (N-1)."""
    mask = (mx.arange(x.shape[1])[None, :] < valid[:, None])[..., None]  # (B, T, 1)
    n = valid.astype(mx.float32)[:, None, None]
    mean = mx.where(mask, x, 0.0).sum(axis=1, keepdims=True) / n
    dev = x - mean
    var = mx.where(mask, dev * dev, 0.0).sum(axis=1, keepdims=True) / (n - 1.0)
    std = mx.where(n > 1.0, mx.sqrt(var), 0.0)  # NeMo: NaN (one frame) -> 0
    return (x - mean) / (std + NORM_EPS)


class Preprocessor(nn.Module):
    """NeMo's AudioToMelSpectrogramPreprocessor: the window and mel filterbank come from the checkpoint."""

    def __init__(self, cfg: PreprocessorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = mx.zeros((cfg.win_length,))
        self.fb = mx.zeros((cfg.features, cfg.n_fft // 2 + 1))

    def __call__(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        return log_mel(audio, lengths, self.fb, self.window, self.cfg)
