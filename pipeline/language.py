"""Spoken-language detection: the policy around the model's language identification.

The model part is `Canary.language_log_probs`: the next-token distribution at the prompt's source-language slot,
computed from the encoder output the request needs anyway (NeMo trains Canary on its prompt tokens, so that slot
is a language-ID head). Here: which languages may be picked (the model's, narrowed by the `detect_languages`
setting and a request's `languages[]`), how sure the model must be (`detect_threshold`, a probability renormalised
over those candidates), what is decoded below it (a fixed `default_language`; with `default_language = "auto"` the
most probable candidate anyway: anything else would translate by accident), and which audio decides for a long
file: its first piece (at most `chunk_seconds`, 40 s by default; Whisper decides on its first 30 s window);
every piece of the request is then decoded in that language.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from canary_server.model.prompt import PromptSpec

AUTO = "auto"  # the `language` value that asks for detection (HTTP, Wyoming, the CLI)


@dataclass(frozen=True)
class LanguageDetection:
    """A request's detection policy (`TranscribeOptions.detect`)."""

    candidates: tuple[str, ...]  # languages it may pick, at least two
    fallback: str | None  # decoded when no candidate reaches `threshold` (None: the best one anyway)
    threshold: float  # minimum probability of the best candidate, renormalised over the candidates
    target: str | None = None  # translate into this language; None: transcribe in the detected one


@dataclass(frozen=True)
class DetectedLanguage:
    """What detection decided for a request."""

    language: str  # the source language decoded (the fallback when not `confident`)
    probability: float  # the best candidate's probability, renormalised over the candidates
    probabilities: dict[str, float]  # every candidate's, renormalised
    confident: bool  # the best candidate reached the threshold (else `language` is the fallback, if any)
    fell_back: bool = False  # not confident, and the policy's fallback was decoded instead of the best candidate

    @property
    def spoken(self) -> str:
        """The most probable candidate (whether or not it was confident enough to be used)."""
        return max(self.probabilities, key=self.probabilities.__getitem__)


def decide(policy: LanguageDetection, log_probs: Mapping[str, float]) -> DetectedLanguage:
    """The language to decode from the model's log-probabilities of its language tokens (any normalisation):
    restricted to the candidates, renormalised, the best one if it reaches the threshold, else the fallback."""
    scores = {lang: float(log_probs[lang]) for lang in policy.candidates}
    top = max(scores.values())
    weights = {lang: math.exp(s - top) for lang, s in scores.items()}
    total = sum(weights.values())
    probs = {lang: w / total for lang, w in weights.items()}
    best = max(probs, key=probs.__getitem__)
    confident = probs[best] >= policy.threshold
    fell_back = not confident and policy.fallback is not None
    language = policy.fallback if fell_back else best
    return DetectedLanguage(language, probs[best], probs, confident, fell_back)


@dataclass(eq=False)
class LanguageChoice:
    """One request's detection, shared by the work items of its pieces: decided once, on the first of its pieces
    that the scheduler encodes (the start of the file), then used for every piece."""

    policy: LanguageDetection
    result: DetectedLanguage | None = None

    @property
    def decided(self) -> bool:
        return self.result is not None

    def decide(self, log_probs: Mapping[str, float]) -> DetectedLanguage:
        self.result = decide(self.policy, log_probs)
        return self.result

    def apply(self, spec: PromptSpec) -> PromptSpec:
        """`spec` with the decided source language (and the same target, unless the policy translates)."""
        if self.result is None:
            raise RuntimeError("the language has not been decided yet")
        lang = self.result.language
        return dataclasses.replace(spec, source_lang=lang, target_lang=self.policy.target or lang)
