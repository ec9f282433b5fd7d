"""The streaming decoder's per-token log-probabilities (Realtime's `include: ["item.input_audio_transcription.
logprobs"]`): the log-softmax of each committed token, from the very logits its greedy step took it from.

A token committed in an early chunk was chosen from a partial window (and the decoder's self-attention cache keeps
what earlier windows gave it, as NeMo's does), so its log-prob is not the offline one; where everything was
decoded in one pass over the whole clip it must be, within the log-prob tolerance."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_streaming import CASES, _audio, _case_id, _config, _run

from canary_server.model.decoder import causal_mask, cross_attention_mask
from canary_server.model.streaming import StreamingDecoder

LOGPROB_TOL = 1e-3
# Short clips on alignatt with 10 s of left context: nothing is committed before the last chunk, whose window is the
# whole clip, and the prompt is fed again then (no step committed): one offline pass
ONE_PASS = ["v1_agg-audio_2-c1_l10_r0.5-alignatt", "v2_unified-audio_2-c1_l10_r0.5-alignatt"]
MANY_STEPS = [c for c in CASES if c["context"] == "c0.5_l1_r0.5"]  # the most chunks per clip, both policies


def _stream(m, case: dict):
    decoder = StreamingDecoder(m, _config(case))
    s = decoder.open(case["prompt"])
    s.append(_audio(case))
    s.end()
    (steps,) = _run(decoder, [s])
    return s, steps


def _teacher_forced(m, audio: np.ndarray, ids: list[int]) -> np.ndarray:
    """Offline: the whole clip encoded once, `ids` fed at once; log-probs (len(ids), V)."""
    enc, enc_len = m.encode(mx.array(audio[None]), mx.array([len(audio)]))
    dec, n = m.decoder, len(ids)
    hidden = dec(mx.array([ids]), mx.arange(n), dec.cross_kv(enc), cross_attention_mask(enc_len, enc.shape[1]), None,
                 causal_mask(n))  # fmt: skip
    return np.array(m.log_probs(hidden)[0])


@pytest.mark.parametrize("case", [c for c in CASES if _case_id(c) in ONE_PASS], ids=_case_id)
def test_one_pass_stream_log_probs_equal_offline_teacher_forced(streaming_models, case):
    m = streaming_models(case["model"])
    s, steps = _stream(m, case)
    assert s.tokens == case["tokens"] and len(s.tokens) > 3  # token parity unchanged by the log-probs
    assert all(not step for step in steps[:-1])  # the precondition: nothing committed before the last chunk
    full = _teacher_forced(m, _audio(case), s.prompt + s.tokens)
    p = len(s.prompt)
    offline = [full[p - 1 + i, t] for i, t in enumerate(s.tokens)]
    assert len(s.logprobs) == len(s.tokens)
    np.testing.assert_allclose(s.logprobs, offline, rtol=0, atol=LOGPROB_TOL)


@pytest.mark.parametrize("case", MANY_STEPS, ids=_case_id)
def test_each_committed_log_prob_is_the_log_softmax_of_its_steps_logits(streaming_models, case, monkeypatch):
    """Every decoder step's logits are recorded; the committed (token, log-prob) pairs are, in order, among the
    steps' (argmax, log-softmax at the argmax), computed here independently in float64."""
    m = streaming_models(case["model"])
    picked: list[tuple[int, float]] = []
    logits_fn = m.logits

    def recording(hidden):
        out = logits_fn(hidden)
        x = np.array(out, dtype=np.float64)[0]  # one stream: batch row 0
        top = int(np.argmax(x))
        picked.append((top, float(x[top] - x.max() - np.log(np.exp(x - x.max()).sum()))))
        return out

    monkeypatch.setattr(m, "logits", recording)
    s, _ = _stream(m, case)
    assert s.tokens == case["tokens"]
    assert len(s.logprobs) == len(s.tokens) and all(np.isfinite(s.logprobs)) and max(s.logprobs, default=0) <= 0
    it = iter(picked)
    for token, lp in zip(s.tokens, s.logprobs, strict=True):
        # the next recorded step that chose this token with this log-prob (rejected steps are skipped)
        assert any(t == token and abs(lp - ref) < 1e-4 for t, ref in it), (token, lp)
