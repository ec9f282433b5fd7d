"""Keyword lists (OpenAI's `keywords[]`, the server's `keywords` / `keywords_file`): limits, characters, spelling.

A list is boosted by NeMo's boosting tree (model/boosting.py) in beam search. A request's own list replaces the
server-wide one; an empty request list means no boosting. Checked here, before any work is queued: how many
phrases, how long, which characters, and that the model's tokenizer (aggregate: the request language's) can spell
each one; a phrase that fails is named in the error, never dropped silently.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from canary_server.model.boosting import UnspellablePhrase
from canary_server.model.errors import CanaryError

MAX_PHRASES = 100  # per request
MAX_SERVER_PHRASES = 1000  # the server-wide list (one tree, built once)
MAX_PHRASE_CHARS = 100


class InvalidKeywords(CanaryError):
    """A keyword list the server refuses (too many, too long, bad characters, or not spellable)."""

    def __init__(self, message: str, param: str = "keywords[]") -> None:
        super().__init__(message)
        self.param = param


def clean_keywords(
    phrases: Iterable[str], max_phrases: int = MAX_PHRASES, param: str = "keywords[]"
) -> tuple[str, ...]:
    """Phrases stripped (as NeMo strips a phrase file's lines), blanks skipped, duplicates once, limits checked."""
    out: list[str] = []
    for raw in phrases:
        phrase = raw.strip()
        if not phrase:
            continue
        if len(phrase) > MAX_PHRASE_CHARS:
            raise InvalidKeywords(f"keyword {phrase[:40]!r}... is longer than {MAX_PHRASE_CHARS} characters", param)
        if any(unicodedata.category(ch).startswith("C") for ch in phrase) or "<|" in phrase or "|>" in phrase:
            raise InvalidKeywords(f"keyword {phrase!r} has control characters or special-token markup", param)
        if phrase not in out:
            out.append(phrase)
    if len(out) > max_phrases:
        raise InvalidKeywords(f"{len(out)} keywords: at most {max_phrases} are accepted", param)
    return tuple(out)


def read_keywords_file(path: str | Path) -> tuple[str, ...]:
    """One phrase a line (UTF-8); blank lines skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return clean_keywords(text.splitlines(), MAX_SERVER_PHRASES, "keywords_file")


def check_spelling(
    phrases: tuple[str, ...], langs: Iterable[str], spell: Callable[[str, str], object] | None, param: str
) -> None:
    """Every phrase spellable in every language it may be decoded in (several when the language is detected)."""
    if spell is None:
        return
    for lang in langs:
        for phrase in phrases:
            try:
                spell(phrase, lang)
            except UnspellablePhrase as exc:
                raise InvalidKeywords(str(exc), param) from None
