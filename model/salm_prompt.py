"""The SALM's tokenizer (the LLM's own, `tokenizer.json`, plus the audio locator tag) and its prompt.

NeMo's `qwen` prompt format (`nemo/collections/common/prompts/qwen.py`, not the HF chat template): one user turn and
the assistant prefix, no system turn, no BOS, no `<think>` block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from .errors import ModelLoadError

INSTRUCTION = "Transcribe the following:"  # NeMo's canary-qwen-2.5b example prompt


class SalmTokenizer:
    def __init__(self, tok: Tokenizer, eos_token: str, pad_token: str | None, audio_locator_tag: str) -> None:
        tok.add_special_tokens([AddedToken(audio_locator_tag, special=True, normalized=False)])  # as NeMo does
        self.tok = tok
        self.audio_locator_tag = audio_locator_tag
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(pad_token) if pad_token else None
        self.audio_locator_id = self._id(audio_locator_tag)

    @classmethod
    def load(cls, directory: Path, cfg: dict[str, Any], audio_locator_tag: str) -> SalmTokenizer:
        path = Path(directory) / cfg.get("file", "tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ModelLoadError(f"{path}: not a readable tokenizer ({e})") from e
        return cls(tok, cfg["eos_token"], cfg.get("pad_token"), audio_locator_tag)

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ModelLoadError(f"tokenizer: no token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """HF `decode(skip_special_tokens=True)`: special tokens vanish, non-special added ones stay as text."""
        return self.tok.decode(ids, skip_special_tokens=True)

    def user_message(self, context: str | None) -> str:
        """The user turn's text: the instruction and the audio tag, after the caller's context text if any (the
        OpenAI `prompt`), on its own line."""
        message = f"{INSTRUCTION} {self.audio_locator_tag}"
        return message if not context else f"{context}\n{message}"

    def prompt_ids(self, context: str | None = None) -> list[int]:
        text = f"<|im_start|>user\n{self.user_message(context)}<|im_end|>\n<|im_start|>assistant\n"
        return self.encode(text)
