"""Voice activity: Silero VAD v6 (16 kHz) in numpy, from the weights its `silero-vad` wheel ships.

Chosen by measurement (bench/vad_eval.py, BENCHMARKS.md "Voice activity"). The network is small (a learned STFT,
four convolutions, one LSTM cell, 1.2 MB of float32 weights), so it runs here without onnxruntime or torch: the
convolutions for all windows of a clip at once, the LSTM cell window by window. Probabilities match the wheel's
ONNX model run with onnxruntime (tests/test_vad.py checks stored reference values).

One window is 512 samples (32 ms at 16 kHz) seen with the 64 samples before it; the LSTM state carries from one
window to the next, so a stream fed in pieces gives the same probabilities as the whole clip (`VadStream`).
Weights: silero_vad/silero_vad_16k.safetensors from silero-vad 6.2.3 (MIT, silero_vad/LICENSE).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512  # samples per probability (32 ms)
CONTEXT = 64  # samples of the previous window each window sees
WEIGHTS = Path(__file__).parent / "silero_vad" / "silero_vad_16k.safetensors"


@cache
def _weights() -> dict[str, np.ndarray]:
    import mlx.core as mx  # the safetensors reader we already depend on

    return {k: np.array(v, dtype=np.float32) for k, v in mx.load(str(WEIGHTS)).items()}


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Conv1d with padding 1 and kernel 3 over (N, T, C_in) -> (N, T', C_out); w is torch's (C_out, C_in, 3)."""
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    t_out = (x.shape[1] - 1) // stride + 1
    taps = np.stack([xp[:, k : k + stride * (t_out - 1) + 1 : stride] for k in range(3)], axis=2)  # (N, T', 3, C_in)
    return np.einsum("ntki,oik->nto", taps, w) + b


def _features(windows: np.ndarray) -> np.ndarray:
    """(N, CONTEXT + WINDOW) audio -> (N, 128) LSTM inputs; windows are independent up to here."""
    w = _weights()
    x = np.pad(windows, ((0, 0), (0, 64)), mode="reflect")  # (N, 640), as the model's own reflect pad
    frames = np.stack([x[:, s : s + 256] for s in range(0, x.shape[1] - 255, 128)], axis=1)  # (N, 4, 256)
    spec = frames @ w["stft_conv.weight"][:, 0, :].T  # (N, 4, 258): 129 real then 129 imaginary
    x = np.sqrt(spec[..., :129] ** 2 + spec[..., 129:] ** 2)
    for name, stride in (("conv1", 1), ("conv2", 2), ("conv3", 2), ("conv4", 1)):
        x = np.maximum(_conv1d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride), 0)
    return x[:, 0, :]  # (N, 128): one time step left


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)) without exp's overflow far from 0


@dataclass
class VadState:
    """What carries from one window to the next: the LSTM cell's (h, c) and the last CONTEXT samples."""

    h: np.ndarray
    c: np.ndarray
    context: np.ndarray

    @classmethod
    def initial(cls) -> VadState:
        z = np.zeros(128, np.float32)
        return cls(z, z.copy(), np.zeros(CONTEXT, np.float32))


def window_probabilities(audio: np.ndarray, state: VadState) -> np.ndarray:
    """Speech probability of each whole WINDOW of `audio` (16 kHz mono float32; a length that is a multiple of
    WINDOW), continuing from `state`, which is updated."""
    n = len(audio) // WINDOW
    if n == 0:
        return np.zeros(0, np.float32)
    x = np.concatenate([state.context, audio[: n * WINDOW].astype(np.float32, copy=False)])
    starts = np.arange(n)[:, None] * WINDOW + np.arange(CONTEXT + WINDOW)[None, :]
    w = _weights()
    gates_in = _features(x[starts]) @ w["lstm_cell.weight_ih"].T + w["lstm_cell.bias_ih"] + w["lstm_cell.bias_hh"]
    w_hh, h, c = w["lstm_cell.weight_hh"].T, state.h, state.c
    hs = np.empty((n, 128), np.float32)
    for t in range(n):  # the one sequential part: 128-wide LSTM cell, gates in torch's order i, f, g, o
        i, f, g, o = np.split(gates_in[t] + h @ w_hh, 4)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        hs[t] = h
    state.h, state.c, state.context = h, c, x[-CONTEXT:].copy()
    logits = np.maximum(hs, 0) @ w["final_conv.weight"][0, :, 0] + w["final_conv.bias"][0]
    return _sigmoid(logits).astype(np.float32)


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """One probability per WINDOW of a whole clip; a last partial window is padded with zeros."""
    padded = np.pad(audio.astype(np.float32, copy=False), (0, -len(audio) % WINDOW))
    return window_probabilities(padded, VadState.initial())


class VadStream:
    """Probabilities for audio that arrives in pieces; the same values as `speech_probabilities` of the whole."""

    def __init__(self) -> None:
        self.state = VadState.initial()
        self._carry = np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities of the windows completed by `samples` (possibly none)."""
        audio = np.concatenate([self._carry, samples.astype(np.float32, copy=False)])
        whole = len(audio) - len(audio) % WINDOW
        self._carry = audio[whole:]
        return window_probabilities(audio[:whole], self.state)


def speech_regions(
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
    min_speech_s: float = 0.25,
    min_silence_s: float = 0.1,
    pad_s: float = 0.03,
) -> list[tuple[float, float]]:
    """(start, end) seconds of speech: windows above `threshold` enter speech, below `threshold - 0.15` leave it
    (Silero's own hysteresis); pauses under `min_silence_s` are bridged, speech under `min_speech_s` dropped,
    each region widened by `pad_s` (clamped to the audio)."""
    step = WINDOW / SAMPLE_RATE
    regions: list[list[float]] = []
    active = False
    for k, p in enumerate(probs):
        if not active and p >= threshold:
            active = True
            if regions and k * step - regions[-1][1] < min_silence_s:
                continue  # a short pause: the previous region goes on
            regions.append([k * step, (k + 1) * step])
        elif active and p < threshold - 0.15:
            active = False
        if active:
            regions[-1][1] = (k + 1) * step
    total = len(probs) * step
    return [(max(a - pad_s, 0.0), min(b + pad_s, total)) for a, b in regions if b - a >= min_speech_s]
