"""How the converter and the hub download report progress: through a tqdm-like factory the caller passes.

`progress(total=..., desc=..., unit="B", unit_scale=True)` returns a bar with `update(n)` and `close()`; a tqdm
class fits (and huggingface_hub takes the same class as `tqdm_class`). The converter never draws anything itself:
the command line picks bars on a terminal or log lines otherwise (`canary_server.cli.progress`); None reports nothing.
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> None: ...


class ProgressFactory(Protocol):
    def __call__(self, *, total: int, desc: str, unit: str = ..., unit_scale: bool = ...) -> ProgressBar: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bytes_bar(progress: ProgressFactory | None, total: int, desc: str) -> ProgressBar:
    """A byte-counting bar from `progress`, or one that reports nothing."""
    if progress is None:
        return _NoBar()
    return progress(total=total, desc=desc, unit="B", unit_scale=True)
