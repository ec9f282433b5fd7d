"""canary-1b-v2's bundled timestamps model: a FastConformer-CTC (NeMo EncDecCTCModelBPE) used only to align the
main model's text with the audio (model/alignment.py). Same tokenizer as the main model; blank = last class."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import sentencepiece as spm

from .alignment import align
from .audio import pad_batch
from .config import CtcConfig
from .conformer import ConformerEncoder
from .features import Preprocessor
from .timestamps import Timestamps


class CtcTimestampsModel(nn.Module):
    def __init__(self, cfg: CtcConfig, sp: spm.SentencePieceProcessor | None = None, sample_rate: int = 16000):
        super().__init__()
        self.cfg = cfg
        self.sp = sp  # the main model's unified SentencePiece model
        self.sample_rate = sample_rate
        self.preprocessor = Preprocessor(cfg.preprocessor)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.decoder = nn.Linear(cfg.encoder.d_model, cfg.vocab_size + 1)  # ConvASRDecoder: Conv1d k=1

    @property
    def frame_seconds(self) -> float:
        """NeMo's output_timestep_duration: window_stride * subsampling_factor (0.08 s)."""
        return self.cfg.preprocessor.hop_length / self.sample_rate * self.cfg.encoder.subsampling_factor

    def __call__(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """audio (B, L) float32, lengths (B,) -> CTC log-probs (B, T', V + 1) float32, valid frames (B,)."""
        feats, valid = self.preprocessor(audio, lengths)
        enc, enc_lengths = self.encoder(feats.astype(self.decoder.weight.dtype), valid)
        logits = self.decoder(enc).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True), enc_lengths

    def log_probs(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """One batch, right-padded with lengths (as NeMo's CTC transcribe); each item cut to its own frames."""
        audio, lengths = pad_batch(waves)
        lp, lens = self(audio, lengths)
        lp, lens = np.array(lp), np.array(lens)
        return [lp[i, : lens[i]] for i in range(len(waves))]

    def timestamps(self, waves: list[np.ndarray], texts: list[str]) -> list[Timestamps]:
        """Word and segment times of each text in its audio (the main model's padded input), as NeMo aligns one
        transcribe batch with `get_forced_aligned_timestamps_with_external_model`."""
        return align(texts, self.log_probs(waves), self.sp, self.cfg.blank_id, self.frame_seconds)
