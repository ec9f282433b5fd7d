"""`canary_server.pipeline.formats.render` takes a format's name as well as a ResponseFormat, and refuses any other
name clearly (issue 18: any string used to give WebVTT)."""

from __future__ import annotations

import pytest

from canary_server.model.errors import CanaryError
from canary_server.pipeline.formats import ResponseFormat, render
from canary_server.pipeline.results import Segment, TranscriptResult

RESULT = TranscriptResult(
    text="hello world", language="en", duration=1.5, task="transcribe", segments=[Segment(0, 0.0, 1.5, "hello world")]
)


@pytest.mark.parametrize("fmt", list(ResponseFormat))
def test_a_format_name_renders_what_the_enum_renders(fmt):
    assert render(RESULT, fmt.value) == render(RESULT, fmt)


def test_json_by_name_is_the_json_body():
    assert render(RESULT, "json") == {"text": "hello world", "usage": {"type": "duration", "seconds": 1.5}}
    assert render(RESULT, "text") == "hello world\n"
    assert render(RESULT, "vtt").startswith("WEBVTT")


@pytest.mark.parametrize("name", ["xml", "JSON", "", "webvtt"])
def test_an_unknown_format_is_a_clear_error(name):
    with pytest.raises(CanaryError) as err:
        render(RESULT, name)
    assert str(err.value) == f"unknown response format {name!r}: use one of json, text, srt, vtt, verbose_json"
