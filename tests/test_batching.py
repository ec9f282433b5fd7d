"""Continuous batching: sequences joining and leaving a shared decode loop decode exactly as they do alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ESPEAK_CLIPS
from model.audio import load_audio
from model.batching import BatchDecoder, Sequence, encoder_frames, single_item_max_new_tokens
from model.canary import pad_batch
from model.prompt import PromptSpec


def _sequence(m, wave: np.ndarray, tag) -> Sequence:
    audio, lengths = pad_batch([wave])
    enc, enc_len = m.encode(audio, lengths)
    prompt = m.prompt_ids(PromptSpec("en", "en"))
    return Sequence(enc[0], int(enc_len[0].item()), prompt, single_item_max_new_tokens(m, wave.size, len(prompt)), tag)


def _drain(bd: BatchDecoder, pending: list[Sequence], join_every: int, join_count: int) -> dict:
    out, step = {}, 0
    while pending or len(bd):
        if pending and step % join_every == 0:
            out.update({s.tag: s for s in bd.add(pending[:join_count])})
            pending = pending[join_count:]
        out.update({s.tag: s for s in bd.step()})
        step += 1
    return out


@pytest.mark.parametrize(("join_every", "join_count"), [(1, 1), (2, 3), (5, 12)])
def test_staggered_joins_decode_each_clip_exactly_as_alone(
    espeak_model, espeak_nemo_transcripts, join_every, join_count
):
    names = sorted(espeak_nemo_transcripts)
    waves = [load_audio(ESPEAK_CLIPS / n) for n in names]
    alone = [espeak_model.transcribe(w).tokens for w in waves]
    out = _drain(
        BatchDecoder(espeak_model), [_sequence(espeak_model, w, i) for i, w in enumerate(waves)], join_every, join_count
    )
    assert [out[i].tokens for i in range(len(names))] == alone
    assert all(out[i].finished for i in range(len(names)))
    texts = [espeak_model.tokenizer.ids_to_text(out[i].tokens) for i in range(len(names))]
    assert texts == [espeak_nemo_transcripts[n] for n in names]


def test_a_sequence_stops_at_its_own_length_limit(espeak_model):
    wave = load_audio(ESPEAK_CLIPS / "clip00.wav")
    seq = _sequence(espeak_model, wave, "x")
    seq.max_new_tokens = 3
    out = _drain(BatchDecoder(espeak_model), [seq], 1, 1)
    assert out["x"].tokens == espeak_model.transcribe(wave).tokens[:3]
    assert not out["x"].finished


def test_cancelled_rows_leave_and_the_others_are_unaffected(espeak_model):
    waves = [load_audio(ESPEAK_CLIPS / n) for n in ("clip00.wav", "clip01.wav")]
    bd = BatchDecoder(espeak_model)
    a, b = (_sequence(espeak_model, w, i) for i, w in enumerate(waves))
    bd.add([a, b])
    bd.step()
    a.cancelled = True
    left = bd.step()
    assert left == [a] and len(bd) == 1
    out = _drain(bd, [], 1, 1)
    assert out[1].tokens == espeak_model.transcribe(waves[1]).tokens


def test_log_probs_are_recorded_per_token(espeak_model):
    wave = load_audio(ESPEAK_CLIPS / "clip03.wav")
    out = _drain(BatchDecoder(espeak_model), [_sequence(espeak_model, wave, 0)], 1, 1)
    assert len(out[0].logprobs) == len(out[0].tokens)
    assert all(lp <= 0.0 for lp in out[0].logprobs)


def test_encoder_frames_matches_the_encoder_tensor_length(espeak_model):
    for n in (16000, 16159, 16160, 47999, 76621):
        audio, lengths = pad_batch([np.zeros(n, np.float32)])
        enc, _ = espeak_model.encode(audio, lengths)
        assert enc.shape[1] == encoder_frames(n, 160, 3)


def test_longer_work_waits_while_shorter_requests_decode_and_then_runs(espeak_model):
    """Admitting a long file's chunk would stall every active sequence for the whole encode: it waits for the
    shorter request to finish (or for aging to make it as urgent)."""
    from model.batching import WorkItem

    short = WorkItem(load_audio(ESPEAK_CLIPS / "clip03.wav"), PromptSpec("en", "en"), tag="short", priority=2.8)
    long = [
        WorkItem(load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav"), PromptSpec("en", "en"), tag=i, priority=36.4)
        for i in range(4)
    ]
    batcher = espeak_model.batcher(max_batch=8, encode_seconds=1.0)  # one clip per admission
    batcher.submit([short, *long])
    batcher.step()  # admits the short request only
    assert [s.tag.tag for s in batcher.decoder.rows] == ["short"]
    steps = 1
    while short.result is None:
        batcher.step()
        steps += 1
        assert [s.tag.tag for s in batcher.decoder.rows] in (["short"], [])
    assert steps == len(short.result.tokens)  # prefill + one token per step (the last emits EOS): no stalls
    while len(batcher):
        batcher.step()
    assert all(it.result.tokens == espeak_model.transcribe(it.audio).tokens for it in long)


def test_requests_of_equal_length_arriving_later_join_the_running_batch(espeak_model):
    from model.batching import WorkItem

    wave = load_audio(ESPEAK_CLIPS / "clip02.wav")
    batcher = espeak_model.batcher(max_batch=8)
    first = WorkItem(wave, PromptSpec("en", "en"), tag="first", priority=4.6)
    batcher.submit([first])
    batcher.step()
    later = WorkItem(wave, PromptSpec("en", "en"), tag="later", priority=4.6)
    batcher.submit([later])
    batcher.step()
    assert sorted(s.tag.tag for s in batcher.decoder.rows) == ["first", "later"]


def test_long_rows_step_out_while_a_much_shorter_request_decodes_and_finish_unchanged(espeak_model):
    from model.batching import WorkItem

    long = [
        WorkItem(load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav"), PromptSpec("en", "en"), tag=i, priority=300.0)
        for i in (0, 1, 2)
    ]
    short = WorkItem(load_audio(ESPEAK_CLIPS / "clip07.wav"), PromptSpec("en", "en"), tag="short", priority=2.0)
    batcher = espeak_model.batcher(max_batch=8)
    batcher.submit(long)
    for _ in range(3):
        batcher.step()
    assert len(batcher.decoder.rows) == 3
    batcher.submit([short])
    batcher.step()
    assert [s.tag.tag for s in batcher.decoder.rows] == ["short"]  # the long rows are parked
    assert sorted(s.tag.tag for g in batcher.parked for s in g.seqs) == [0, 1, 2]
    while short.result is None:
        batcher.step()
    while len(batcher):
        batcher.step()
    assert not batcher.parked
    for it in [*long, short]:
        assert it.result.tokens == espeak_model.transcribe(it.audio).tokens, it.tag
