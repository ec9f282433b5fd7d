"""Progress of the long first-use steps (Hugging Face download, .nemo conversion) on the command line.

On a terminal: tqdm bars on stderr. Otherwise (docker logs, systemd, a pipe): one log line on the `canary.progress`
logger at the start, every `LogLines.interval` seconds and at the end, instead of a bar redrawn with carriage
returns. Both are tqdm classes, so the same object serves as huggingface_hub's `tqdm_class` and as the converter's
progress factory (`canary_server.convert.progress.ProgressFactory`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger("canary.progress")


class _Discard:
    """A file that drops what tqdm writes (LogLines reports through logging instead)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LogLines(tqdm):
    """tqdm's counting and rates, reported as log lines: at the start, at most every `interval` s, and at the end."""

    interval = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(file=_Discard(), mininterval=self.interval, leave=True, disable=False)
        kwargs.pop("name", None)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line: nothing was drawn
            return True
        log.info("%s", describe(self.format_dict))
        return True


def describe(d: dict[str, Any]) -> str:
    """A line like `converting x.nemo: 1.2 GB of 3.5 GB (34%), 120 MB/s, about 19 s left` from tqdm's state."""
    n, total, unit = d.get("n") or 0, d.get("total") or 0, d.get("unit") or "it"
    scale = bool(d.get("unit_scale"))

    def amount(x: float) -> str:
        if unit == "B" and scale:
            return size(x)
        return f"{x:g} {unit}" if unit != "it" else f"{x:g}"

    parts = [f"{amount(n)} of {amount(total)} ({100 * n / total:.0f}%)" if total else amount(n)]
    rate = d.get("rate")
    elapsed = d.get("elapsed") or 0.0
    if rate is None and elapsed > 0:
        rate = n / elapsed
    if rate:
        parts.append(f"{amount(rate)}/s")
        if total and n < total:
            parts.append(f"about {tqdm.format_interval((total - n) / rate)} left")
    desc = (d.get("prefix") or "").rstrip(": ")
    return f"{desc}: {', '.join(parts)}" if desc else ", ".join(parts)


def size(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units, as download sizes are given)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Silent(tqdm):
    """A bar that shows nothing (`--quiet`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def progress_class(quiet: bool = False, stream: TextIO | None = None) -> type[tqdm]:
    """The progress factory for this process: bars on a terminal, log lines otherwise, nothing when quiet."""
    if quiet:
        return Silent
    stream = stream if stream is not None else sys.stderr
    return tqdm if stream.isatty() else LogLines
