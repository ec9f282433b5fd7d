"""Continuous batching: sequences joining and leaving a shared decode loop decode exactly as they do alone."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from canary_server.model.audio import load_audio, pad_batch
from canary_server.model.batch_decoder import BatchDecoder, Sequence
from canary_server.model.decoding import encoder_frames, single_item_max_new_tokens
from canary_server.model.prompt import PromptSpec
from canary_server.pipeline.scheduler import ContinuousBatcher
from conftest import ESPEAK_CLIPS


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
    alone = [espeak_model.generate(w).tokens for w in waves]
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
    assert out["x"].tokens == espeak_model.generate(wave).tokens[:3]
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
    assert out[1].tokens == espeak_model.generate(waves[1]).tokens


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


def _item(clip: int, priority: float, tag=None, group=None, streams: bool = False):
    from canary_server.pipeline.scheduler import WorkItem

    wave = load_audio(ESPEAK_CLIPS / f"clip{clip:02d}.wav")
    tag = clip if tag is None else tag
    return WorkItem(wave, PromptSpec("en", "en"), tag=tag, priority=priority, group=group, streams=streams)


def _rows(batcher) -> list:
    return [s.tag.tag for s in batcher.decoder.rows]


def _step_until(batcher, done, limit: int = 100) -> int:
    """Step until `done()`; returns the number of steps."""
    for n in range(1, limit + 1):
        batcher.step()
        if done():
            return n
    raise AssertionError("condition never reached")


def _run_all(batcher) -> None:
    while len(batcher):
        batcher.step()


def test_staged_encoding_equals_encoding_at_once(espeak_model):
    from canary_server.model.conformer import drain

    audio, lengths = pad_batch([load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav") for i in (0, 3)])
    whole, whole_lens = espeak_model.encode(audio, lengths)
    stages = espeak_model.encode_stages(audio, lengths, stages=espeak_model.config.encoder.n_layers)
    pieces = 0
    while True:
        try:
            mx.eval(next(stages))
            pieces += 1
        except StopIteration as finished:
            staged, staged_lens = finished.value
            break
    assert pieces == espeak_model.config.encoder.n_layers  # after the subsampling and each layer but the last
    assert np.array_equal(np.array(staged), np.array(whole))
    assert np.array_equal(np.array(staged_lens), np.array(whole_lens))
    assert np.array_equal(np.array(drain(espeak_model.encode_stages(audio, lengths, 0))[0]), np.array(whole))


def test_longer_work_waits_while_shorter_requests_decode_and_then_runs(espeak_model):
    """Encoding a long file's chunk would stall every active sequence: it waits for the shorter request to finish
    (or for aging to make it as urgent)."""
    short = _item(3, 2.8, tag="short")
    long = [_item(i, 36.4) for i in range(4)]
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_seconds=1.0)  # one clip per encoder batch
    batcher.submit([short, *long])
    _step_until(batcher, lambda: batcher.decoder.rows)  # the short request's encode, in stages
    assert _rows(batcher) == ["short"]
    steps = 1
    while short.result is None:
        assert not batcher.encoding  # nothing longer is started meanwhile
        batcher.step()
        steps += 1
        assert _rows(batcher) in (["short"], [])
    assert steps == len(short.result.tokens)  # prefill + one token per step (the last emits EOS): no stalls
    _run_all(batcher)
    assert all(it.result.tokens == espeak_model.generate(it.audio).tokens for it in long)


def test_requests_of_equal_length_arriving_later_join_the_running_batch(espeak_model):
    batcher = ContinuousBatcher(espeak_model, max_batch=8)
    first = _item(2, 4.6, tag="first")
    batcher.submit([first])
    _step_until(batcher, lambda: batcher.decoder.rows)
    later = _item(2, 4.6, tag="later")
    batcher.submit([later])
    _step_until(batcher, lambda: "later" in _rows(batcher))
    assert sorted(_rows(batcher)) == ["first", "later"]
    assert first.result is None


def test_long_rows_step_out_while_a_much_shorter_request_runs_and_finish_unchanged(espeak_model):
    long = [_item(i, 300.0) for i in (0, 1, 2)]
    short = _item(7, 2.0, tag="short")
    batcher = ContinuousBatcher(espeak_model, max_batch=8)
    batcher.submit(long)
    _step_until(batcher, lambda: len(batcher.decoder.rows) == 3)
    batcher.submit([short])
    batcher.step()
    assert [it.tag for it in batcher.encoding[-1].items] == ["short"]
    assert _rows(batcher) == []  # parked while the short request is encoded ...
    assert sorted(s.tag.tag for g in batcher.parked for s in g.seqs) == [0, 1, 2]
    _step_until(batcher, lambda: batcher.decoder.rows)
    assert _rows(batcher) == ["short"]  # ... and while it decodes
    _step_until(batcher, lambda: short.result is not None)
    _run_all(batcher)
    assert not batcher.parked
    for it in [*long, short]:
        assert it.result.tokens == espeak_model.generate(it.audio).tokens, it.tag


def test_a_long_encode_in_progress_pauses_for_a_short_request_and_resumes(espeak_model):
    n_layers = espeak_model.config.encoder.n_layers
    long, short = _item(0, 300.0, tag="long"), _item(7, 2.0, tag="short")
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_stages=n_layers)
    batcher.submit([long])
    batcher.step()
    assert [e.items for e in batcher.encoding] == [[long]]  # one stage of several done
    batcher.submit([short])
    batcher.step()
    assert [e.items for e in batcher.encoding] == [[long], [short]]  # paused under the short one
    _step_until(batcher, lambda: short.result is not None)
    assert long._seq is None  # not a single stage more while the short request ran
    _run_all(batcher)
    for it in (long, short):
        assert it.result.tokens == espeak_model.generate(it.audio).tokens, it.tag


def test_a_request_that_makes_progress_does_not_age(espeak_model):
    from canary_server.pipeline import scheduler

    clock = [1000.0]
    job = object()
    chunks = [_item(i, 90.0, group=job) for i in (0, 1)]
    other = _item(2, 90.0)
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_seconds=1.0, clock=lambda: clock[0])
    batcher.submit([*chunks, other])
    clock[0] += 5.0  # all three have waited 5 s
    batcher.step()  # the first chunk starts: its job is making progress
    assert batcher.encoding[-1].items == [chunks[0]]
    assert batcher._urgency(chunks[1], clock[0]) == 90.0
    assert batcher._urgency(other, clock[0]) == 90.0 - 5.0 * scheduler.AGING_PER_SECOND


def test_cancelling_an_item_being_encoded_drops_its_batch(espeak_model):
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_stages=espeak_model.config.encoder.n_layers)
    item = _item(0, 3.0)
    batcher.submit([item])
    batcher.step()
    assert batcher.encoding
    batcher.cancel([item])
    assert not batcher.encoding and len(batcher) == 0
    assert batcher.step() == []


def test_batches_encoded_back_to_back_join_the_decoders_together(espeak_model):
    """Four equal requests, one per encoder batch: each batch waits for the next one (the decoders would wait for
    its encode anyway) and all four join at once, so they share one prefill and step together to the end."""
    items = [_item(i, 4.0) for i in range(4)]
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_seconds=1.0)  # one clip per encoder batch
    batcher.submit(items)
    _step_until(batcher, lambda: batcher.decoder.rows)
    assert sorted(_rows(batcher)) == [0, 1, 2, 3]
    _run_all(batcher)
    for it in items:
        assert it.result.tokens == espeak_model.generate(it.audio).tokens, it.tag


def test_a_streaming_request_joins_as_soon_as_it_is_encoded(espeak_model):
    """A request that streams its text starts decoding after its own encode, not after the next batch's."""
    first, second = _item(0, 4.0, tag="streams", streams=True), _item(1, 4.0, tag="later")
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_seconds=1.0)
    batcher.submit([first, second])
    _step_until(batcher, lambda: batcher.decoder.rows)
    assert _rows(batcher) == ["streams"]
    _run_all(batcher)
    for it in (first, second):
        assert it.result.tokens == espeak_model.generate(it.audio).tokens, it.tag


def test_while_a_streaming_request_decodes_encoded_batches_join_at_once(espeak_model):
    """A streaming request decoding keeps its step between two encodes: batches do not wait for each other."""
    streaming = _item(2, 4.0, tag="streams", streams=True)
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_seconds=1.0)
    batcher.submit([streaming])
    _step_until(batcher, lambda: batcher.decoder.rows)
    later = [_item(0, 4.0, tag="b"), _item(1, 4.0, tag="c")]
    batcher.submit(later)
    _step_until(batcher, lambda: "b" in _rows(batcher))
    assert "c" not in _rows(batcher)
    _run_all(batcher)
    for it in [streaming, *later]:
        assert it.result.tokens == espeak_model.generate(it.audio).tokens, it.tag


def test_no_room_in_the_decoders_means_no_wait_for_the_next_batch(espeak_model):
    """The next batch could not join anyway (the decoders are full): the encoded one joins at once."""
    items = [_item(i, 4.0) for i in range(3)]
    batcher = ContinuousBatcher(espeak_model, max_batch=1, encode_seconds=1.0)
    batcher.submit(items)
    _step_until(batcher, lambda: batcher.decoder.rows)
    assert len(_rows(batcher)) == 1 and not batcher.encoded
    _run_all(batcher)
    assert all(it.result.tokens == espeak_model.generate(it.audio).tokens for it in items)


def test_cancelling_an_encoded_item_waiting_for_the_next_batch_drops_it(espeak_model):
    first, second = _item(0, 4.0, tag="first"), _item(1, 4.0, tag="second")
    batcher = ContinuousBatcher(espeak_model, max_batch=8, encode_seconds=1.0)
    batcher.submit([first, second])
    _step_until(batcher, lambda: batcher.encoded)
    assert [its for its, _ in batcher.encoded] == [[first]] and len(batcher) == 2
    batcher.cancel([first])
    assert not batcher.encoded and len(batcher) == 1
    _run_all(batcher)
    assert first.result is None and second.result.tokens == espeak_model.generate(second.audio).tokens


@pytest.mark.parametrize("streams", [False, True])
def test_a_streaming_requests_pieces_are_marked_as_streaming(streams):
    """The engine's job book tells the scheduler which pieces stream (they join the decoders at once)."""
    import asyncio

    from canary_server.pipeline.jobs import Job, JobBook, Stream

    class Collect:
        def submit(self, items):
            self.items = items

    loop = asyncio.new_event_loop()
    try:
        job = Job([np.zeros(16000, np.float32)] * 2, PromptSpec("en", "en"), loop, loop.create_future())
        job.stream = Stream(asyncio.Queue()) if streams else None
        JobBook({}).submit(Collect(), job)
    finally:
        loop.close()
    assert [it.streams for it in job.items] == [streams, streams]
