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

    def encode_plain(self, text: str) -> list[int]:
        """Untrusted text: special tokens written in it (`<|im_end|>`, the audio tag) are tokenized as the
        characters they are, never as the tokens, so a prompt cannot end the user turn or place the audio."""
        self.tok.encode_special_tokens = True
        try:
            return self.encode(text)
        finally:
            self.tok.encode_special_tokens = False

    def prompt_ids(self, context: str | None = None) -> list[int]:
        """`<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n` with message = the instruction and the
        audio tag, after the caller's context text (the OpenAI `prompt`, stripped) on its own line. Tokenized in
        pieces split at newlines, which the byte-level pre-tokenizer never merges across, so the ids are those of
        the whole string NeMo tokenizes."""
        tail = f"{INSTRUCTION} {self.audio_locator_tag}<|im_end|>\n<|im_start|>assistant\n"
        context = (context or "").strip()
        if not context:
            return self.encode(f"<|im_start|>user\n{tail}")
        return self.encode("<|im_start|>user\n") + self.encode_plain(context) + self.encode(f"\n{tail}")
