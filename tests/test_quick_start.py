"""README's quick start works as written (issue 18): the files its commands name are in the repository, and its
curl commands, run from the repository's folder as the README says, get the answer it shows from a real
`canary-server serve` (on the espeak-trained test model instead of the default download; port 0 instead of 8000)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess

import httpx
import pytest

from conftest import REPO
from server_process import start_server, stop_server

README = REPO / "README.md"


def _code_blocks() -> list[list[str]]:
    lines = README.read_text().splitlines()
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    return [lines[a + 1 : b] for a, b in zip(fences[::2], fences[1::2], strict=True)]


def _curl_commands() -> list[tuple[list[str], str | None]]:
    """Each `curl` command of a code block (continuation lines joined) and the `# {...}` answer shown below it."""
    commands = []
    for block in _code_blocks():
        joined: list[str] = []
        for line in block:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1] + " " + line.strip()
            else:
                joined.append(line)
        for i, line in enumerate(joined):
            if line.startswith("curl "):
                answer = joined[i + 1][2:] if i + 1 < len(joined) and joined[i + 1].startswith("# {") else None
                commands.append((shlex.split(line, comments=True), answer))
    return commands


def test_every_file_the_readme_sends_is_in_the_repository():
    named = re.findall(r"""(?:file=@|open\(")([\w./-]+)""", README.read_text())
    assert "samples/hello.wav" in named
    assert [n for n in named if not (REPO / n).is_file()] == ["talk.wav"] * named.count("talk.wav")


@pytest.fixture(scope="module")
def server(espeak_dir):
    s = start_server(espeak_dir)
    yield s
    stop_server(s)


def _run_curl(argv: list[str], url: str) -> str:
    argv = [a.replace("http://localhost:8000", url) for a in argv]
    if shutil.which("curl"):
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
    # no curl binary: the same request with httpx (-F k=v fields, k=@path a file upload)
    fields = [argv[i + 1] for i, a in enumerate(argv) if a == "-F"]
    target = next(a for a in argv[1:] if a.startswith("http"))
    data = dict(f.split("=", 1) for f in fields if "=@" not in f)
    files = {k: open(REPO / v[1:], "rb") for k, v in (f.split("=", 1) for f in fields if "=@" in f)}  # noqa: SIM115
    try:
        return httpx.post(target, data=data, files=files, timeout=120).text if files else httpx.get(target).text
    finally:
        for f in files.values():
            f.close()


def test_the_quick_starts_curl_commands_get_the_answers_it_shows(server):
    commands = _curl_commands()
    assert any("file=@samples/hello.wav" in argv for argv, _ in commands)
    for argv, answer in commands:
        body = json.loads(_run_curl(argv, server.url))
        if "/v1/audio/transcriptions" in " ".join(argv):
            assert body["text"], body  # the toy model's words, not the sentence a real Canary hears
            assert body["usage"] == json.loads(answer)["usage"], (argv, body)
        else:
            assert body["status"] == "ok", body
