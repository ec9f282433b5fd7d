"""What an encoded audio file is, read from its first bytes before any decoder sees it.

FFmpeg probes every input against all of its demuxers, including ones that open other files or sockets (`ffconcat`
reads the paths it names, `sdp` binds UDP ports, `hls` fetches playlists). An upload is untrusted, so it is
identified here by its magic bytes against an allow-list of audio containers (the formats the README lists), and
the decoders are told that one format: libsndfile reads only memory, and PyAV gets `format=` plus a demuxer
whitelist of that one name, no protocols, and a codec allow-list. Anything else is refused before it is opened."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AudioDecodeError

# What the refusal names; the API's `file` field documents the same list (OpenAI's, plus aac).
ACCEPTED = "aac, flac, m4a, mp3, mp4, mpeg, mpga, ogg, wav, webm"
# Audio decoders PyAV may open (FFmpeg decoder names). Everything speech apps and browsers record with.
AUDIO_CODECS = frozenset({"aac", "ac3", "alac", "eac3", "flac", "mp1", "mp2", "mp3", "opus", "vorbis"})
AUDIO_CODEC_PREFIXES = ("pcm_", "adpcm_")  # plain and ADPCM samples (WAV, CAF-style payloads in mp4/mov)


@dataclass(frozen=True)
class Container:
    """An allowed container: its name for messages, FFmpeg's demuxer, and whether libsndfile reads it too."""

    name: str
    demuxer: str
    soundfile: bool = False


WAV = Container("wav", "wav", soundfile=True)
FLAC = Container("flac", "flac", soundfile=True)
OGG = Container("ogg", "ogg", soundfile=True)
MP3 = Container("mp3", "mp3", soundfile=True)
AAC = Container("aac", "aac")
MP4 = Container("mp4", "mov")  # mp4, m4a, mov: FFmpeg's one ISO-BMFF demuxer
WEBM = Container("webm", "matroska")  # webm is a Matroska profile
MPEG = Container("mpeg", "mpeg")  # MPEG program stream (.mpeg, .mpg)

_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")  # boxes an ISO-BMFF file starts with


def sniff(data: bytes) -> Container:
    """The container `data` is, from its magic bytes; AudioDecodeError naming the accepted formats otherwise."""
    head = data[:16]
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return WAV
    if head[:4] == b"fLaC":
        return FLAC
    if head[:4] == b"OggS":
        return OGG
    if head[4:8] in _MP4_BOXES:
        return MP4
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return WEBM
    if head[:4] == b"\x00\x00\x01\xba":  # MPEG-PS pack header
        return MPEG
    if head[:3] == b"ID3":  # an ID3v2 tag, then the audio (mp3, rarely aac or flac)
        return _after_id3(data)
    found = _mpeg_audio(head)
    if found is not None:
        return found
    raise AudioDecodeError(f"the file is not audio in a supported format; send one of: {ACCEPTED}")


def _after_id3(data: bytes) -> Container:
    size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))  # syncsafe integer
    if len(data) > 5 and data[5] & 0x10:  # a footer follows the tag
        size += 10
    rest = data[size : size + 16]
    if rest[:4] == b"fLaC":
        return FLAC
    return _mpeg_audio(rest) or MP3  # FFmpeg's mp3 demuxer resyncs past padding after the tag


def _mpeg_audio(head: bytes) -> Container | None:
    """An MPEG audio frame (mp1/2/3) or an ADTS AAC frame at the start."""
    if len(head) < 2 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    layer = (head[1] >> 1) & 3
    if layer:
        return MP3
    return AAC if head[1] & 0xF6 == 0xF0 else None


def check_codec(name: str) -> None:
    """Refuse a stream whose decoder is not an audio codec on the allow-list."""
    if name in AUDIO_CODECS or name.startswith(AUDIO_CODEC_PREFIXES):
        return
    raise AudioDecodeError(f"the file's audio is encoded as {name!r}, which this server does not decode")


def av_options(container: Container) -> dict[str, str]:
    """avformat options that keep FFmpeg to this one demuxer and away from every file, socket and URL."""
    return {"format_whitelist": container.demuxer, "protocol_whitelist": ""}
