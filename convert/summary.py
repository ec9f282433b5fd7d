"""What a converted model is, in a few lines: `canary-server convert` prints them."""

from __future__ import annotations

import json
from pathlib import Path

from canary_server.model.config import ModelConfig, decoding_description, family
from canary_server.model.prompt import supported_languages
from canary_server.model.timestamps import timestamp_source
from canary_server.model.tokenizer import load_tokenizer


def summary(out_dir: Path) -> list[str]:
    raw = json.loads((Path(out_dir) / "config.json").read_text())
    if raw.get("model_type") == "salm":
        return salm_summary(raw)
    config = ModelConfig.from_dict(raw)
    tokenizer = load_tokenizer(Path(out_dir), config.tokenizer)
    e, d = config.encoder, config.decoder
    languages = supported_languages(tokenizer)
    source = timestamp_source(config, tokenizer)
    times = {
        "tokens": "word and segment times from the model's timestamp tokens",
        "ctc": "word and segment times from the bundled CTC aligner (forced alignment)",
    }.get(source, "none (segment times only)")
    checkpoint = config.decoding.strategy
    if checkpoint == "beam":
        checkpoint += f", beam_size {config.decoding.beam_size}"
    lines = [
        f"family: {family(config)} ({e.n_layers} x {e.d_model} encoder, {d.num_layers}-layer decoder, "
        f"{raw.get('dtype', 'float32')} weights"
        + (f", {config.quantization.bits}-bit linear layers" if config.quantization else "")
        + ")",
        f"prompt format: {config.prompt_format}; tokenizer: {config.tokenizer.type}, {d.vocab_size} tokens",
        f"languages ({len(languages)}): {', '.join(languages)}",
        f"decoding: {decoding_description(config.decoding)} (checkpoint: {checkpoint})",
        f"timestamps: {times}",
        "language detection: "
        + (
            "none: trained with its prompt masked (use_loss_mask_for_prompt: true), its language slot means "
            "nothing; requests must name their language"
            if config.prompt_loss_masked
            else "from the decoder's trained language slot (language auto, or none given)"
        ),
    ]
    return lines + [f"note: {note}" for note in raw.get("notes", [])]


def salm_summary(raw: dict) -> list[str]:
    """canary-qwen-2.5b (NeMo SALM): FastConformer + projection + Qwen3 (LoRA merged)."""
    e, llm, q = raw["encoder"], raw["llm"], raw.get("quantization")
    lora = raw.get("lora_merged")
    return [
        f"family: SALM ({e['n_layers']} x {e['d_model']} encoder, {llm['num_hidden_layers']}-layer "
        f"{llm['model_type']} LLM, {raw.get('dtype', 'float32')} weights"
        + (f", {q['bits']}-bit LLM linear layers" if q else "")
        + ")",
        f"LLM: {raw['source'].get('llm')}"
        + (f", LoRA (rank {lora['r']}) merged into {', '.join(lora['targets'])}" if lora else ""),
        f"prompt format: qwen (user turn 'Transcribe the following: {raw['audio_locator_tag']}')",
        "languages (1): en (speech recognition only: no translation)",
        "decoding: greedy",
        "timestamps: none (segment times only)",
    ]
