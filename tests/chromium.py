"""Debian's headless Chromium driven over the Chrome DevTools Protocol, for the browser page's tests.

No Playwright (it downloads its own browser) and no WebSocket client: `--remote-debugging-pipe` speaks CDP over
two inherited pipes (Chromium reads commands from descriptor 3 and writes answers and events to descriptor 4,
each message JSON ending in a NUL byte), so no port is opened and nothing else can drive the browser."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process and one page (tab) in it. `call` sends a CDP command to the page and waits
    for its answer; `evaluate` runs JavaScript in the page (awaiting a promise it returns)."""

    def __init__(self, binary: str, profile: Path, flags: list[str]) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def descriptors() -> None:  # in the child: the pipes become its descriptors 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]  # may be 3 or 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        cmd = [
            binary,
            "--headless=new",
            "--no-sandbox",  # CI containers run as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--mute-audio",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            *flags,
            "about:blank",
        ]
        # Its log goes to a file: a pipe nobody reads would fill up and stall the browser.
        self._log = profile.with_name(profile.name + ".log")
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, preexec_fn=descriptors, close_fds=False, stdout=log, stderr=subprocess.STDOUT
            )  # close_fds=False keeps 3 and 4; Python's own descriptors are close-on-exec anyway
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self.session = self._open_page()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                with self._changed:
                    for raw in messages:
                        message = json.loads(raw)
                        if "id" in message:
                            self._answers[message["id"]] = message
                        else:
                            self.events.append(message)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _send(self, method: str, params: dict | None, session: str | None, timeout: float) -> dict:
        with self._changed:
            self._next_id += 1
            ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        with self._changed:
            if not self._changed.wait_for(lambda: ident in self._answers or not self._reader.is_alive(), timeout):
                raise TimeoutError(f"no answer to {method} in {timeout} s")
            if ident not in self._answers:
                raise CdpError(f"Chromium exited: {self.stderr()}")
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer["result"]

    def _open_page(self) -> str:
        target = self._send("Target.createTarget", {"url": "about:blank"}, None, 60)["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True}, None, 60)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self._send(f"{domain}.enable", {}, session, 60)
        return session

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self._send(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 60, gesture: bool = False):
        """The value of `expression` (a promise is awaited); a JavaScript exception raises CdpError."""
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": gesture}
        result = self.call("Runtime.evaluate", params, timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_until(self, condition: str, timeout: float) -> object:
        """Waits, inside the page, until the JavaScript expression `condition` is truthy (checked at every change
        of the document); returns its value. On timeout raises CdpError with the page's visible text."""
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{ const v = ({condition}); if (v) {{ observer.disconnect(); resolve(v); }} }};
            const observer = new MutationObserver(check);
            observer.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
            setTimeout(() => {{ observer.disconnect(); reject(new Error("timed out; the page shows: " +
                document.body.innerText)); }}, {int(timeout * 1000)});
            check();
        }})"""
        return self.evaluate(script, timeout)

    def goto(self, url: str, timeout: float = 60) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_until("document.readyState === 'complete'", timeout)

    def set_file(self, selector: str, path: Path) -> None:
        """Chooses `path` in the page's file input (as a user would; the page sees a change event)."""
        node = self.call("Runtime.evaluate", {"expression": f"document.querySelector({json.dumps(selector)})"})
        self.call("DOM.setFileInputFiles", {"files": [str(path)], "objectId": node["result"]["objectId"]})

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))

    def console(self) -> list[str]:
        """The page's console messages and exceptions so far (for failure messages)."""
        lines = []
        for event in list(self.events):
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                lines.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif event.get("method") == "Runtime.exceptionThrown":
                lines.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif event.get("method") == "Log.entryAdded":
                lines.append(f"{params['entry']['level']}: {params['entry']['text']}")
        return lines

    def stderr(self) -> str:
        """The end of the browser's own log."""
        return self._log.read_text(errors="replace")[-3000:] if self._log.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self._to_chrome)
        self._reader.join(10)


@contextmanager
def chromium(binary: str, profile: Path, flags: list[str]) -> Iterator[Chromium]:
    browser = Chromium(binary, profile, flags)
    try:
        yield browser
    finally:
        browser.close()
