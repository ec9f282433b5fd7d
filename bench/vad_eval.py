"""Which voice-activity detector: the current energy rule, Silero VAD (ONNX, onnxruntime) or WebRTC VAD, measured.

Test audio is espeak-ng speech (two utterances with pauses, 0.5-2 s of silence around them) mixed with generated
noise or music-like tones at several SNRs; the truth per 10 ms frame comes from the clean speech's envelope (a
frame is speech when its RMS is within 35 dB of the clip's loudest frame, and gaps under 0.2 s between speech
frames count as speech, as a pause between words does). Each VAD's decisions are mapped onto those 10 ms frames.
Prints frame accuracy, precision and recall of "speech" per condition, CPU seconds per audio second, install size.

Needs espeak-ng on PATH, and optionally `onnxruntime` and `webrtcvad-wheels`. Silero's ONNX file ships inside the
`silero-vad` wheel (whose package requires torch, so it is not installed: take the file out of the wheel):
    pip download --no-deps silero-vad -d /tmp/w && unzip -o /tmp/w/silero_vad-*.whl 'silero_vad/data/*' -d /tmp/w
    python bench/vad_eval.py --silero-onnx /tmp/w/silero_vad/data/silero_vad.onnx
"""

from __future__ import annotations

import argparse
import io
import subprocess
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

SR = 16000
HOP = 160  # 10 ms truth frames
SENTENCES = [
    "the weather is nice today and we walk to the park",
    "please call my brother after the meeting",
    "seven hundred and twelve people came to the show",
    "turn the kitchen light off before you go to bed",
    "she bought bread milk and coffee at the market",
    "how long does the train take to the city",
    "my computer is slow when it is hot",
    "we will start the game at four in the evening",
]
VOICES = ["en-us", "en-gb+f2", "en-gb-scotland+m3", "en-029+f4", "en-us+m1", "en-gb-x-rp+f2"]
NOISES = ("white", "pink", "babble", "music")
SNRS = (20, 10, 5, 0)


def espeak(text: str, voice: str) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    x = x.astype(np.float32) / 32768.0
    idx = np.arange(0, len(x) - 1, rate / SR)  # linear resampling is enough for a truth envelope
    y = np.interp(idx, np.arange(len(x)), x).astype(np.float32)
    return y / (np.abs(y).max() + 1e-9) * 0.5


def frame_rms(x: np.ndarray) -> np.ndarray:
    n = len(x) // HOP
    return np.sqrt(np.mean(np.square(x[: n * HOP].reshape(n, HOP), dtype=np.float32), axis=1) + 1e-12)


def truth(clean: np.ndarray) -> np.ndarray:
    r = frame_rms(clean)
    speech = r > r.max() * 10 ** (-35 / 20)
    idx = np.flatnonzero(speech)
    for a, b in zip(idx[:-1], idx[1:], strict=True):
        if 1 < b - a <= 20:  # a gap under 0.2 s inside speech is speech
            speech[a:b] = True
    return speech


def pink(rng: np.random.Generator, n: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float32)
    f[0] = 1.0
    return np.fft.irfft(spec / np.sqrt(f), n).astype(np.float32)


def music(rng: np.random.Generator, n: int) -> np.ndarray:
    """Chords of harmonic notes, a new one every 0.25-0.6 s with a pluck envelope: tonal, not speech."""
    out, pos = np.zeros(n, np.float32), 0
    while pos < n:
        length = min(int(rng.uniform(0.25, 0.6) * SR), n - pos)
        t = np.arange(length, dtype=np.float32) / SR
        env = np.exp(-t * rng.uniform(2, 8)).astype(np.float32)
        for midi in rng.choice(np.arange(48, 84), size=3, replace=False):
            f = 440.0 * 2 ** ((midi - 69) / 12)
            out[pos : pos + length] += env * sum(np.sin(2 * np.pi * f * k * t) / k**1.5 for k in (1, 2, 3))
        pos += length
    return out


def noise(rng: np.random.Generator, kind: str, n: int, pool: list[np.ndarray]) -> np.ndarray:
    if kind == "white":
        x = rng.standard_normal(n).astype(np.float32)
    elif kind == "pink":
        x = pink(rng, n)
    elif kind == "music":
        x = music(rng, n)
    else:  # babble-like: five time-reversed utterances (no intelligible words) at random offsets
        x = np.zeros(n, np.float32)
        for _ in range(5):
            u = np.tile(pool[rng.integers(len(pool))][::-1], 1 + n // 16000)[:n]
            x += np.roll(u, int(rng.integers(n)))
    return x / (x.std() + 1e-9)


def make_clips(n_clips: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(condition, mixed audio, truth per 10 ms frame) for clean audio and every noise x SNR."""
    rng = np.random.default_rng(seed)
    utts = [espeak(s, VOICES[i % len(VOICES)]) for i, s in enumerate(SENTENCES)]
    clips = []
    for c in range(n_clips):
        gap = lambda lo, hi: np.zeros(int(rng.uniform(lo, hi) * SR), np.float32)  # noqa: E731
        a, b = utts[c % len(utts)], utts[(c + 3) % len(utts)]
        clean = np.concatenate([gap(0.5, 2), a, gap(0.5, 2), b, gap(0.5, 2)])
        t, speech_rms = truth(clean), float(np.sqrt(np.mean(np.concatenate([a, b]) ** 2)))
        clips.append(("clean", clean, t))
        for kind in NOISES:
            for snr in SNRS:
                nz = noise(rng, kind, len(clean), utts) * speech_rms / 10 ** (snr / 20)
                clips.append((f"{kind} {snr} dB", np.clip(clean + nz, -1, 1), t))
    return clips


def to_frames(decisions: np.ndarray, step: int, n: int) -> np.ndarray:
    """Per-window decisions (each `step` samples) -> per 10 ms frame, by the window covering the frame's centre."""
    centre = np.arange(n) * HOP + HOP // 2
    return decisions[np.minimum(centre // step, len(decisions) - 1)] if len(decisions) else np.zeros(n, bool)


def energy_rule(x: np.ndarray) -> np.ndarray:
    """pipeline/chunking.py's pause rule as a detector: 20 ms RMS frames (10 ms hop) within 2x of the quietest
    frame of their 5 s search window are pause, the rest speech."""
    frame, hop, window = 320, 160, 5 * SR
    out = []
    for lo in range(0, len(x), window):
        region = x[lo : lo + window]
        n = max(1 + (len(region) - frame) // hop, 1)
        idx = np.minimum(np.arange(frame)[None, :] + hop * np.arange(n)[:, None], len(region) - 1)
        energy = np.mean(np.square(region[idx], dtype=np.float64), axis=1)
        out.append(energy > 2 * energy.min() + 1e-10)
    return to_frames(np.concatenate(out), hop, len(x) // HOP)


def silero(path: Path, threshold: float = 0.5) -> Callable[[np.ndarray], np.ndarray]:
    """Silero VAD v5/v6 ONNX: 512-sample windows with 64 samples of context, an LSTM state carried across."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        state, context, sr = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32), np.array(SR)
        probs = []
        for lo in range(0, len(x) - 511, 512):
            chunk = np.concatenate([context, x[None, lo : lo + 512]], axis=1)
            p, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
            context = chunk[:, -64:]
            probs.append(float(p[0, 0]))
        return to_frames(np.array(probs) > threshold, 512, len(x) // HOP)

    return run


def webrtc(mode: int) -> Callable[[np.ndarray], np.ndarray]:
    import webrtcvad

    vad = webrtcvad.Vad(mode)

    def run(x: np.ndarray) -> np.ndarray:
        pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes()
        step = 480  # 30 ms frames
        dec = [vad.is_speech(pcm[2 * lo : 2 * (lo + step)], SR) for lo in range(0, len(x) - step + 1, step)]
        return to_frames(np.array(dec, bool), step, len(x) // HOP)

    return run


def detectors(args: argparse.Namespace) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    found: dict[str, Callable[[np.ndarray], np.ndarray]] = {"energy rule (chunking.py)": energy_rule}
    if args.silero_onnx:
        found["silero v6 onnx (p>0.5)"] = silero(args.silero_onnx)
    try:
        from canary_server.pipeline import vad

        found["silero v6 numpy, pipeline/vad.py (p>0.5)"] = lambda x: to_frames(
            vad.speech_probabilities(x) > 0.5, vad.WINDOW, len(x) // HOP
        )
    except ImportError:
        print("canary_server not installed: pipeline/vad.py skipped")
    try:
        for mode in (1, 3):
            found[f"webrtcvad mode {mode}"] = webrtc(mode)
    except ImportError:
        print("webrtcvad not installed: skipped")
    return found


def scores(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(true positives, false positives, false negatives, true negatives) of speech frames."""
    n = min(len(pred), len(true))
    p, t = pred[:n], true[:n]
    return np.array([np.sum(p & t), np.sum(p & ~t), np.sum(~p & t), np.sum(~p & ~t)], np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--silero-onnx", type=Path, help="silero_vad.onnx taken out of the silero-vad wheel")
    ap.add_argument("--clips", type=int, default=6, help="speech clips per condition")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    clips = make_clips(args.clips, args.seed)
    conditions = list(dict.fromkeys(c for c, _, _ in clips))
    audio_s = sum(len(x) for _, x, _ in clips) / SR
    print(
        f"{len(clips)} clips, {audio_s:.0f} s of audio, {len(conditions)} conditions; speech share of frames "
        f"{np.mean(np.concatenate([t for _, _, t in clips])):.2f}\n"
    )
    groups = {"clean": ["clean"], **{k: [c for c in conditions if c.startswith(k)] for k in NOISES}}
    groups.update({f"{snr} dB": [f"{k} {snr} dB" for k in NOISES] for snr in SNRS})
    summary = []
    print("Frame accuracy per condition (noise kinds over all SNRs; SNRs over all noise kinds):\n")
    print(f"| detector | {' | '.join(groups)} |\n|---|{'---|' * len(groups)}")
    for name, run in detectors(args).items():
        cpu = time.process_time()
        preds = [run(x) for _, x, _ in clips]
        cost = (time.process_time() - cpu) / audio_s
        counts = {c: np.zeros(4, np.int64) for c in conditions}
        for (cond, _, t), p in zip(clips, preds, strict=True):
            counts[cond] += scores(p, t)
        cells = []
        for conds in groups.values():
            tp, fp, fn, tn = sum(counts[c] for c in conds)
            cells.append(f"{(tp + tn) / (tp + fp + fn + tn):.3f}")
        print(f"| {name} | {' | '.join(cells)} |")
        tp, fp, fn, tn = sum(counts.values())
        summary.append(
            (
                name,
                (tp + tn) / (tp + fp + fn + tn),
                tp / max(tp + fp, 1),
                tp / max(tp + fn, 1),
                fp / max(fp + tn, 1),
                cost,
            )
        )
    print("\nAll conditions together:\n")
    print("| detector | accuracy | precision | recall | non-speech frames called speech | CPU s per audio s |")
    print("|---|---|---|---|---|---|")
    for name, acc, prec, rec, fpr, cost in summary:
        print(f"| {name} | {acc:.3f} | {prec:.3f} | {rec:.3f} | {fpr:.3f} | {cost:.5f} |")


if __name__ == "__main__":
    main()
