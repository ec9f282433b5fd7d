"""The Canary encoder-decoder as one MLX module, plus batched transcription."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .audio import (
    MIN_AUDIO_SECONDS,
    SAMPLE_RATE,
    AudioSource,
    check_samples,
    load_audio,
    pad_batch,
    pad_to_min_duration,
)
from .batch_decoder import check_prompt_length
from .boosting import DEFAULT_ALPHA, BoostingTree, TreeCache
from .config import ModelConfig
from .conformer import ConformerEncoder, drain
from .decoder import TransformerDecoder, causal_mask, cross_attention_mask
from .decoding import beam_decode, greedy_decode
from .errors import CanaryError, NonFiniteError
from .features import Preprocessor
from .prompt import PromptSpec, build_prompt, language_slot_prefix, supported_languages
from .timestamps import TimedSegment, TimestampSource, Word, parse_timestamps, timestamp_source
from .tokenizer import AggregateTokenizer, CanaryTokenizer

log = logging.getLogger("canary.model")


class Head(nn.Module):
    """TokenClassifier: its weight is tied to the decoder token embedding, only the bias is its own."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.bias = mx.zeros((vocab,))


@dataclass
class Transcription:
    text: str
    tokens: list[int]
    source_lang: str
    target_lang: str
    duration: float  # seconds of input audio (before any padding)
    raw_text: str = field(default="", repr=False)  # NeMo's hypothesis text (leading space kept)
    finished: bool = True  # False when decoding stopped at the length limit
    logprobs: list[float] = field(default_factory=list, repr=False)  # per generated token (when recorded)
    pieces: list[str] = field(default_factory=list, repr=False)  # per generated token, its text ('▁' -> ' ')
    words: list[Word] = field(default_factory=list)  # with timestamps=True (else empty)
    segments: list[TimedSegment] = field(default_factory=list)  # sentences, split as NeMo does


class Canary(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: CanaryTokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessor = Preprocessor(config.preprocessor)
        self.encoder = ConformerEncoder(config.encoder)
        if config.enc_dec_proj:
            self.encoder_decoder_proj = nn.Linear(config.encoder.d_model, config.decoder.hidden_size)
        self.decoder = TransformerDecoder(config.decoder)
        self.head = Head(config.decoder.vocab_size)
        self.timestamps_model = None  # canary-1b-v2's CTC aligner (model/ctc.py), attached by model.load
        self._trees = TreeCache()  # keyword boosting trees by content

    # ---- network pieces -------------------------------------------------------------------------------
    @property
    def dtype(self) -> mx.Dtype:
        emb = self.decoder.embedding.token_embedding  # nn.Embedding, or PackedEmbedding in the CPU layout
        return (emb.weight_p if "weight_p" in emb else emb.weight).dtype

    @property
    def guards_overflow(self) -> bool:
        """float16/bfloat16 models check their encoder output and logits for inf/NaN (NonFiniteError,
        `Sequence.overflowed`); float32 ones skip the checks (nothing to fall back to)."""
        return self.dtype != mx.float32

    def float32(self) -> Canary:
        """This model computing in float32: itself if it does, else a float32 copy, loaded once from the directory
        `model.load` read (what an overflow of float16/bfloat16 activations is recomputed with)."""
        if not self.guards_overflow:
            return self
        twin = self.__dict__.get("_float32")
        if twin is None:
            loader: Callable[[mx.Dtype], Canary] | None = self.__dict__.get("_loader")
            if loader is None:
                raise NonFiniteError("no float32 weights to recompute with: the model was not loaded by model.load")
            twin = self.__dict__["_float32"] = loader(mx.float32)
        return twin

    @property
    def fell_back_to_float32(self) -> bool:
        """True once a batch overflowed: from then on this model's work runs on `float32()`."""
        return self.__dict__.get("_float32") is not None

    def encode(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """audio (B, L) float32, lengths (B,) -> decoder-ready encoder states (B, T', H), lengths (B,)."""
        return drain(self.encode_stages(audio, lengths, stages=0))

    def encode_stages(self, audio: mx.array, lengths: mx.array, stages: int) -> Generator[mx.array, None, tuple]:
        """`encode` in about `stages` + 1 pieces of similar cost (the subsampling, then groups of layers; 0: one
        piece): yields arrays to evaluate between pieces and returns what `encode` returns. The continuous batcher
        evaluates one piece per step, so a long batch being encoded can be paused for a short request."""
        feats, valid = self.preprocessor(audio, lengths)
        per_stage = -(-self.config.encoder.n_layers // stages) if stages > 0 else None
        enc, enc_lengths = yield from self.encoder.stages(feats.astype(self.dtype), valid, per_stage)
        if self.config.enc_dec_proj:
            enc = self.encoder_decoder_proj(enc)
        if self.guards_overflow and not mx.all(mx.isfinite(enc)).item():  # one reduction (and sync) per batch
            raise NonFiniteError.overflow("the encoder output", self.dtype)
        return enc, enc_lengths

    def logits(self, hidden: mx.array) -> mx.array:
        """Tied output projection: hidden (..., H) -> logits (..., V), float32."""
        out = self.decoder.embedding.token_embedding.as_linear(hidden)
        return out.astype(mx.float32) + self.head.bias

    def language_log_probs(self, enc: mx.array, enc_lengths: mx.array) -> mx.array:
        """Log-probabilities (B, len(self.languages)) of the language tokens at the prompt's source-language slot,
        over the full vocabulary, from encoder states (B, T, H) already computed (`encode`): one decoder pass
        over the few prompt tokens before that slot, batched (NeMo: teacher-forced `transf_decoder` log-probs)."""
        prefix = language_slot_prefix(self.tokenizer, self.config.prompt_format)
        lang_ids = mx.array([self.tokenizer.special_id(f"<|{lang}|>") for lang in self.languages])
        ids = mx.broadcast_to(mx.array(prefix, dtype=mx.int32)[None], (enc.shape[0], len(prefix)))  # (B, P)
        cross = self.decoder.cross_kv(enc)
        cross_mask = cross_attention_mask(enc_lengths, enc.shape[1], enc.dtype)
        hidden = self.decoder(ids, mx.arange(len(prefix)), cross, cross_mask, None, causal_mask(len(prefix), enc.dtype))
        return self.log_probs(hidden[:, -1])[:, lang_ids]  # (B, L)

    def use_cpu_layout(self) -> None:
        """Linear weights laid out for MLX's CPU backend (model/cpu_layout.py): the encoder's and the
        encoder-decoder projection's packed for the CPU kernel's matmul (AVX-512 or AVX2), else transposed; the
        decoder's packed too where the CPU has AVX-512 (as fast as sgemv for a batch-1 step, faster from 4 rows),
        else left in nn.Linear's layout, which OpenBLAS's sgemv reads fastest (canary_server/_gemv_forward.c;
        bench/decoder_step.py)."""
        from . import cpu_kernels
        from .cpu_layout import lay_out_linears, pack_linears, wrap_quantized

        lay_out_linears(self, skip=("decoder",))  # the encoder's, and the model's own encoder-decoder projection
        if cpu_kernels.packed_isa() == "avx512":
            pack_linears(self.decoder)
        wrap_quantized(self.decoder)  # 8-bit decoder weights: the step's matmuls read bytes (cpu_kernels.qmatmul8)
        mx.eval(self.parameters())

    def release_memory(self) -> None:
        """Hand freed buffers back to the system (the engine calls it when its work runs out; model/memory.py)."""
        from .memory import release_memory

        release_memory()

    def log_probs(self, hidden: mx.array) -> mx.array:
        logits = self.logits(hidden)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    # ---- user API -----------------------------------------------------------------------------------------
    @property
    def languages(self) -> list[str]:
        """Languages the prompt can name, restricted to the trained ones where config.json lists them."""
        known = supported_languages(self.tokenizer)
        trained = self.config.languages
        return [lang for lang in known if lang in trained] if trained else known

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def timestamp_source(self) -> TimestampSource | None:
        source = timestamp_source(self.config, self.tokenizer)
        return None if source == "ctc" and self.timestamps_model is None else source

    @property
    def supports_timestamps(self) -> bool:
        """Word/segment times available: the flash models' timestamp tokens, or canary-1b-v2's CTC aligner
        (both in `transcribe(timestamps=True)` and in the server's batcher)."""
        return self.timestamp_source is not None

    def add_timestamps(self, result: Transcription) -> Transcription:
        """For a `<|timestamp|>` decode: NeMo's text (timestamp tokens removed), words and segments."""
        stride = self.config.preprocessor.hop_length / self.sample_rate  # NeMo's window_stride (0.01)
        ts = parse_timestamps(result.raw_text, stride, self.config.encoder.subsampling_factor)
        # No <|s|>...<|e|> pair: NeMo keeps the raw text as it is, a stray frame token included; ours has none.
        text = result.text if ts.text == result.raw_text.strip() else ts.text
        return dataclasses.replace(result, text=text, words=ts.words, segments=ts.segments)

    def token_pieces(self, ids: list[int]) -> list[str]:
        """The text of each token ('▁' shown as a space), as `include[]=logprobs` reports them."""
        return [p.replace("▁", " ") for p in self.tokenizer.ids_to_tokens(ids)]

    def add_ctc_timestamps(self, waves: list[np.ndarray], results: list[Transcription]) -> list[Transcription]:
        """canary-1b-v2: word/segment times of each result's text by CTC forced alignment with the bundled model,
        on the (min-duration padded) audio the encoder saw, one batch as NeMo does; the text is unchanged."""
        stamps = self.timestamps_model.timestamps(waves, [r.raw_text for r in results])
        pairs = zip(results, stamps, strict=True)
        return [dataclasses.replace(r, words=s.words, segments=s.segments) for r, s in pairs]

    def prompt_ids(self, spec: PromptSpec) -> list[int]:
        spec = self.decode_spec(spec)
        return build_prompt(self.tokenizer, self.config.prompt_format, spec, self.config.prompt_defaults)

    def decode_spec(self, spec: PromptSpec) -> PromptSpec:
        """The prompt actually decoded for `spec`: with a CTC aligner (canary-1b-v2) NeMo keeps <|notimestamp|>
        and times the plain transcript afterwards."""
        if spec.timestamps and self.timestamp_source == "ctc":
            return dataclasses.replace(spec, timestamps=False)
        return spec

    def result(
        self,
        ids: list[int],
        spec: PromptSpec,
        num_samples: int,
        finished: bool = True,
        logprobs: list[float] | None = None,
    ) -> Transcription:
        """The Transcription of generated `ids` (for `<|timestamp|>` decodes: NeMo's text, words, segments).
        CTC timestamps need the audio: `add_ctc_timestamps`."""
        # NeMo's hypothesis text, but only up to a control token the model emitted (the README's "Clean text")
        raw = self.tokenizer.ids_to_text(self.tokenizer.transcript_ids(ids))
        res = Transcription(
            self.tokenizer.transcript(ids),
            list(ids),
            spec.source_lang,
            spec.target_lang,
            num_samples / self.sample_rate,
            raw,
            finished,
            list(logprobs or []),
            pieces=self.token_pieces(ids),
        )
        return self.add_timestamps(res) if self.decode_spec(spec).timestamps else res

    def generate(
        self,
        audio: AudioSource | np.ndarray | list,
        source_lang: str | None = None,
        target_lang: str | None = None,
        pnc: bool = True,
        context: str | None = None,
        batch_size: int = 8,
        beam_size: int | None = None,
        timestamps: bool = False,
        keywords: list[str] | None = None,
        keywords_alpha: float = DEFAULT_ALPHA,
    ) -> Transcription | list[Transcription]:
        """NeMo's `transcribe()` on whole inputs: each one decoded in a single pass, batches formed in input order
        (the decoder length limit depends on the longest item of a batch), exactly as NeMo 3.0.0 does.

        No cutting of long audio: that is the pipeline's job (`canary_server.load(...).transcribe()`), which this
        low-level method is the parity reference for. Inputs are paths, bytes, or float32 arrays at 16 kHz mono;
        target_lang None or == source_lang is transcription, a different one translation. `beam_size` defaults to
        the converted config's. `timestamps=True` (only when `supports_timestamps`) fills `words` and `segments`.
        `keywords`: phrases boosted as NeMo's boosting tree with `boosting_tree_alpha` = `keywords_alpha` (decoded
        by beam search, beam_size 1 included, as NeMo does; an empty list is no boosting)."""
        single = not isinstance(audio, list)
        items = [audio] if single else audio
        source_lang = source_lang or self.config.prompt_defaults.get("source_lang", "en")
        if timestamps and not self.supports_timestamps:
            raise CanaryError("this model does not produce timestamps (flash timestamp tokens or v2's CTC aligner)")
        spec = PromptSpec(
            source_lang, target_lang or source_lang, pnc=pnc, context=context or "", timestamps=timestamps
        )
        prompt = self.prompt_ids(spec)
        check_prompt_length(len(prompt), self.config.decoder.max_sequence_length)
        waves = [_as_waveform(x) for x in items]
        files = [not isinstance(x, np.ndarray) for x in items]  # NeMo pads short files and arrays differently
        beam = beam_size or self.config.decoding.beam_size
        boost = (self.keyword_tree(keywords, source_lang), keywords_alpha) if keywords else None
        results: list[Transcription] = []
        for start in range(0, len(waves), batch_size):
            end = start + batch_size
            results += self._generate_batch(waves[start:end], files[start:end], prompt, spec, beam, boost)
        return results[0] if single else results

    def keyword_tree(self, phrases: list[str] | tuple[str, ...], lang: str | None) -> BoostingTree:
        """The boosting tree of a phrase list (aggregate tokenizers: `lang`'s sub-tokenizer), built once per
        content (a small LRU: a server-wide list is built once). Raises UnspellablePhrase naming the phrase."""
        lang = lang if isinstance(self.tokenizer, AggregateTokenizer) else None  # unified: one tree for all
        return self._trees.get(self.tokenizer, tuple(phrases), lang, self.config.decoder.vocab_size)

    def _generate_batch(
        self,
        waves: list[np.ndarray],
        files: list[bool],
        prompt: list[int],
        spec: PromptSpec,
        beam_size: int = 1,
        boost: tuple[BoostingTree, float] | None = None,
    ) -> list[Transcription]:
        """One NeMo batch; if it overflows float16/bfloat16, recomputed in float32, as is all later work."""
        if self.fell_back_to_float32:
            return self.float32()._generate_batch(waves, files, prompt, spec, beam_size, boost)
        try:
            return self._decode_batch(waves, files, prompt, spec, beam_size, boost)
        except NonFiniteError as exc:
            warn_overflow(self, exc)
            return self.float32()._generate_batch(waves, files, prompt, spec, beam_size, boost)

    def _decode_batch(
        self,
        waves: list[np.ndarray],
        files: list[bool],
        prompt: list[int],
        spec: PromptSpec,
        beam_size: int,
        boost: tuple[BoostingTree, float] | None = None,
    ) -> list[Transcription]:
        min_samples = int(MIN_AUDIO_SECONDS * SAMPLE_RATE)
        padded = [pad_to_min_duration(w, min_samples, f) for w, f in zip(waves, files, strict=True)]
        audio, lengths = pad_batch(padded)
        enc, enc_lengths = self.encode(audio, lengths)
        tok = self.tokenizer
        if beam_size > 1 or boost:  # NeMo boosts in beam search only (beam_size 1 is its greedy with fusion)
            tree, alpha = boost or (None, 0.0)
            penalty = self.config.decoding.length_penalty
            decoded = beam_decode(self, enc, enc_lengths, prompt, beam_size, penalty, tree, alpha)
        else:
            prompts = mx.array([prompt] * len(waves), dtype=mx.int32)
            decoded = greedy_decode(self, enc, enc_lengths, prompts, tok.eos_id, tok.pad_id)
        out = [
            self.result(ids, spec, wave.shape[0], finished)
            for wave, ids, finished in zip(waves, decoded.tokens, decoded.finished, strict=True)
        ]
        if spec.timestamps and self.timestamp_source == "ctc":
            out = self.add_ctc_timestamps(padded, out)
        return out


def warn_overflow(model: Canary, exc: NonFiniteError) -> None:
    if not model.fell_back_to_float32:
        log.warning("%s: recomputing in float32, and computing in float32 from now on (use dtype float32)", exc)


def _as_waveform(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        if x.ndim != 1:
            raise ValueError(f"audio arrays must be 1-D float32 at 16 kHz, got shape {x.shape}")
        x = x.astype(np.float32, copy=False)
        check_samples(x)
        return x
    if isinstance(x, str | Path | bytes | bytearray) or hasattr(x, "read"):
        return load_audio(x)
    raise TypeError(f"unsupported audio input of type {type(x).__name__}")
