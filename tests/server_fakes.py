"""Test doubles and helpers for the server tests: a fake Canary, a uvicorn runner, audio encoders."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx
import numpy as np
import soundfile as sf
import uvicorn

SR = 16000
WORDS = {"en": "hello world", "de": "hallo welt", "fr": "bonjour le monde", "es": "hola mundo"}
# The fake model "hears" a language in the pitch of a tone (FakeCanary.language_log_probs_of)
PITCH = {"en": 440.0, "de": 660.0, "fr": 880.0, "es": 1100.0}


@dataclass
class FakeTranscription:
    text: str
    tokens: list[int]
    source_lang: str
    target_lang: str
    duration: float
    words: list = field(default_factory=list)
    segments: list = field(default_factory=list)


def fake_timestamps(text: str) -> tuple[str, list, list]:
    """Word i at [0.5 i, 0.5 i + 0.4] s; a segment every two words. Returns text, words, segments."""
    from canary_server.model.timestamps import TimedSegment, Word

    words = [Word(w, 0.5 * i, 0.5 * i + 0.4, 0, 0) for i, w in enumerate(text.split())]
    groups = [words[i : i + 2] for i in range(0, len(words), 2)]
    segments = [TimedSegment(" ".join(w.word for w in g), g[0].start, g[-1].end, 0, 0) for g in groups]
    return text, words, segments


@dataclass
class FakeCanary:
    """Same interface as `model.Canary`. Text: the target language's words, the clip length, the context.

    A context of "explode" raises inside transcribe (to test failure isolation). With `supports_timestamps`,
    `timestamps=True` gives `fake_timestamps` words and segments (and "ts" appended to the text)."""

    languages: list[str] = field(default_factory=lambda: ["en", "de", "es", "fr"])
    sample_rate: int = SR
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(prompt_format="canary2"))
    calls: list[dict] = field(default_factory=list)
    supports_timestamps: bool = False

    def language_log_probs_of(self, audio) -> dict[str, float]:
        """Detection, faked: the language whose PITCH is nearest the tone's (log-prob 0, the others -5: 98% over
        four); a near-silent clip gives every language the same score (25%: below any sensible threshold)."""
        if np.max(np.abs(audio), initial=0.0) < 0.01:
            return dict.fromkeys(self.languages, -5.0)
        freq = np.argmax(np.abs(np.fft.rfft(audio))) * SR / len(audio)
        heard = min(PITCH, key=lambda lang: abs(PITCH[lang] - freq))
        return {lang: 0.0 if lang == heard else -5.0 for lang in self.languages}

    def transcribe(
        self, audio, source_lang=None, target_lang=None, pnc=True, context=None, batch_size=8, timestamps=False
    ):
        items = audio if isinstance(audio, list) else [audio]
        self.calls.append(
            {
                "n": len(items),
                "source": source_lang,
                "target": target_lang,
                "pnc": pnc,
                "context": context,
            }
            | ({"timestamps": True} if timestamps else {})  # only when asked: other tests compare whole dicts
        )
        if context == "explode":
            raise RuntimeError("the fake model exploded")
        target = target_lang or source_lang
        out = []
        for a in items:
            text = f"{WORDS[target]} {len(a) / SR:.2f}" + ("" if pnc else " nopnc") + (f" {context}" if context else "")
            res = FakeTranscription(text, [1, 2, 3], source_lang, target, len(a) / SR)
            if timestamps:
                if not self.supports_timestamps:
                    raise ValueError("this model does not produce timestamps")
                res.text, res.words, res.segments = fake_timestamps(text + " ts")
            out.append(res)
        return out if isinstance(audio, list) else out[0]


@dataclass
class FakeBatcher:
    """The engine's view of `pipeline.scheduler.ContinuousBatcher`: every waiting item completes at the next step.

    `gate` (an Event), when set on the fake model, holds each step until it is set: tests use it to keep
    requests in flight."""

    model: FakeCanary
    waiting: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # the items of every step

    def __len__(self) -> int:
        return len(self.waiting)

    def submit(self, items) -> None:
        self.waiting += items

    def cancel(self, items) -> None:
        self.cancelled += items
        self.waiting = [it for it in self.waiting if not any(it is c for c in items)]

    def partial_text(self, item) -> str:
        return item.result.text if item.result is not None else ""

    def step(self):
        gate = getattr(self.model, "gate", None)
        if gate is not None:
            gate.wait(30)
        items, self.waiting = self.waiting, []
        self.steps.append(items)
        for it in items:
            if it.language is not None:  # the scheduler's detection, on the fake model's scores
                if not it.language.decided:
                    it.language.decide(self.model.language_log_probs_of(it.audio))
                it.spec = it.language.apply(it.spec)
            s = it.spec
            try:
                it.result = self.model.transcribe(
                    it.audio,
                    source_lang=s.source_lang,
                    target_lang=s.target_lang,
                    pnc=s.pnc,
                    context=s.context or None,
                    timestamps=s.timestamps,
                )
            except Exception as exc:
                it.error = exc
        return items


def fake_batcher(model: FakeCanary, **settings) -> FakeBatcher:
    """The engine's batcher factory for a FakeCanary (remembered as `model.last_batcher`)."""
    model.last_batcher = FakeBatcher(model)
    return model.last_batcher


def fake_engine(fake: FakeCanary | None = None, **kwargs):
    """An Engine over `fake` (a new FakeCanary by default) driving a FakeBatcher."""
    from canary_server.pipeline.engine import Engine

    model = fake if fake is not None else FakeCanary()
    return Engine(lambda: model, batcher=fake_batcher, **kwargs)


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def wait_ready(base_url: str, timeout: float = 300) -> None:
    """Poll /health until 200 (the model loads on its own thread)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url) as client:
        while client.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready: {client.get('/health').text}")
            time.sleep(0.01)


def tone(seconds: float, sr: int = SR, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def wav_bytes(audio: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()
