"""The bound on short-request-first scheduling (pipeline/fairness.py): work deferred for shorter requests keeps at
least `long_request_share` of the engine's time, while short requests still go first within that bound."""

from __future__ import annotations

import pytest

from canary_server.model.audio import load_audio
from canary_server.model.prompt import PromptSpec
from canary_server.pipeline.fairness import FairShare
from canary_server.pipeline.scheduler import ContinuousBatcher, WorkItem
from conftest import ESPEAK_CLIPS


def _simulate(fair: FairShare, steps: int, step_seconds: float = 0.1) -> float:
    """Every step is contended (something would be deferred); returns the share of steps that were not deferred."""
    served = 0
    for _ in range(steps):
        if not fair.allow_defer():
            served += 1
        fair.record(step_seconds, contended=True)
    return served / steps


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.75])
def test_deferred_work_gets_its_share_of_engine_time_after_the_burst_allowance(share):
    fair = FairShare(share, grace_seconds=3.0)
    assert _simulate(fair, 30) == 0.0  # the first 3 s of contention go to the short requests
    got = _simulate(FairShare(share, grace_seconds=3.0), 2000)
    assert share - 0.02 <= got <= share + 0.05


def test_share_zero_is_pure_short_first_and_one_never_defers():
    assert _simulate(FairShare(0.0), 1000) == 0.0
    assert _simulate(FairShare(1.0), 1000) == 1.0


def test_uncontended_steps_do_not_count_and_reset_starts_afresh():
    fair = FairShare(0.5, grace_seconds=1.0)
    for _ in range(100):
        fair.record(1.0, contended=False)
    assert fair.taken == fair.served == 0.0 and fair.allow_defer()
    fair.record(2.0, contended=True)
    assert not fair.allow_defer()  # 2 s taken > 1 s allowance: the deferred work's turn
    fair.reset()
    assert fair.allow_defer()


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="long_request_share"):
        FairShare(1.5)


def _long_progress_under_a_stream_of_short_requests(model, share: float, steps: int = 80) -> tuple[int, int]:
    """A long request (4 chunks, 300 s of priority) while one short request after another arrives. Returns the
    long request's decoded tokens and the short requests completed in `steps` engine steps. The clock advances
    10 ms per reading, so aging (10 s of priority per waited second) stays negligible: only FairShare can help."""
    now = [0.0]

    def clock() -> float:
        now[0] += 0.01
        return now[0]

    batcher = ContinuousBatcher(
        model, max_batch=8, long_request_share=share, fair_grace_seconds=0.2, clock=clock, encode_stages=0
    )
    job = object()
    long = [WorkItem(load_audio(ESPEAK_CLIPS / f"clip{i:02d}.wav"), PromptSpec("en", "en"), priority=300.0, group=job)
            for i in range(4)]  # fmt: skip
    short_audio = load_audio(ESPEAK_CLIPS / "clip07.wav")
    batcher.submit(long)
    shorts_done, short = 0, None
    for _ in range(steps):
        if short is None or short.result is not None:
            shorts_done += short is not None
            short = WorkItem(short_audio, PromptSpec("en", "en"), priority=2.0)
            batcher.submit([short])
        batcher.step()
    tokens = sum(len(it.result.tokens) if it.result else len(it._seq.tokens) if it._seq else 0 for it in long)
    return tokens, shorts_done


def test_a_long_request_starves_under_pure_short_first_but_keeps_its_share_with_fairness(espeak_model):
    starved, shorts_unbounded = _long_progress_under_a_stream_of_short_requests(espeak_model, share=0.0)
    fair, shorts_fair = _long_progress_under_a_stream_of_short_requests(espeak_model, share=0.5)
    assert starved <= 4  # the first token of each chunk (prefilled with the first short request), no more
    assert fair >= 20  # decoding beside the short requests for about half of the steps
    assert shorts_fair >= shorts_unbounded // 2  # short requests still complete, more slowly
