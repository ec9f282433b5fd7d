"""The pipeline between the model and the front doors: audio in -> limits -> cutting at pauses -> the continuous
batcher and its engine thread -> text, tokens, log-probs, words/segments with file offsets, streaming deltas."""

from canary_server.pipeline.errors import AudioTooLong, EngineBusy, EngineNotReady, InvalidAudio
from canary_server.pipeline.options import PipelineConfig, TranscribeOptions
from canary_server.pipeline.pipeline import AudioInput, Pipeline, PreparedAudio, TextDelta
from canary_server.pipeline.results import Segment, TokenLogprob, TranscriptResult, Word
from canary_server.pipeline.sync import Transcriber, load

__all__ = [
    "AudioInput",
    "AudioTooLong",
    "EngineBusy",
    "EngineNotReady",
    "InvalidAudio",
    "Pipeline",
    "PipelineConfig",
    "PreparedAudio",
    "Segment",
    "TextDelta",
    "TokenLogprob",
    "TranscribeOptions",
    "TranscriptResult",
    "Transcriber",
    "Word",
    "load",
]
