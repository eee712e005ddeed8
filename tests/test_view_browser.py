"""``clipes view``'s page in a real browser: headless Chromium, driven over the DevTools protocol.

The test talks to Chromium through ``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on
file descriptors 3 and 4), with the standard library alone: no driver package, no download, and the same
protocol every browser-automation tool speaks. CI installs Debian's ``chromium`` (``.ci/run``); where no
Chromium can be found the test skips and says why.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipes.cli import app

runner = CliRunner()
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip(f"no Chromium found on PATH (looked for {', '.join(BROWSERS)}); CI installs Debian's chromium")
    return found


class DevTools:
    """A headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # the child's fd 3 reads our commands, fd 4 writes the replies
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        args = [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", f"--user-data-dir={profile}",
                "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            seen = next((e for e in self.events if e.get("method") == method), None)
            if seen is not None:
                self.events.remove(seen)
                return seen
            self.events.append(self._read(deadline))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries (failed loads among them)."""
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def close(self) -> None:
        try:
            self.session = None
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self._to_chrome)
            os.close(self._from_chrome)


@pytest.fixture(scope="module")
def page(tmp_path_factory, golden) -> Path:
    """A labelled run of four golden photos (three with ground truth), its CAMs saved, viewed with --gt."""
    _browser()  # skip before labelling when there is no browser
    tmp = tmp_path_factory.mktemp("view")
    images, gt = tmp / "images", tmp / "gt"
    images.mkdir(), gt.mkdir()
    for stem in ("2007_000033", "2009_000573", "2010_001069", "chelsea"):
        shutil.copy(golden / "images" / f"{stem}.png", images)
        if (golden / "gt" / f"{stem}.png").is_file():
            shutil.copy(golden / "gt" / f"{stem}.png", gt)
    labels = {k: v for k, v in json.loads((golden / "labels.json").read_text()).items()
              if Path(k).stem in {p.stem for p in images.iterdir()}}
    (tmp / "labels.json").write_text(json.dumps(labels))
    out = tmp / "run"
    res = runner.invoke(app, ["label", str(images), "--labels", str(tmp / "labels.json"), "--out", str(out),
                              "--model", str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu",
                              "--max-side", "160", "--save-cams", "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["view", str(out), "--gt", str(gt)])
    assert res.exit_code == 0, res.output
    return out / "view" / "index.html"


_ROWS = """Array.from(document.querySelectorAll("#runs tbody tr")).map(r => Array.from(r.cells).map(
    c => c.dataset.v !== undefined ? c.dataset.v : c.innerText.trim()))"""


def _ordered(values: list, numeric: bool, descending: bool) -> bool:
    """As the page documents: ascending (descending on a second click); rows without a value last."""
    if numeric:
        numbers = [float(v) for v in values]
        present = [v for v in numbers if not math.isnan(v)]
        if any(math.isnan(v) for v in numbers[: len(present)]):
            return False
        return present == sorted(present, reverse=descending)
    return values == sorted(values, reverse=descending)


def test_view_page_in_a_browser(page, tmp_path):
    browser = DevTools(_browser(), tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=page.as_uri())
        browser.wait_for("Page.loadEventFired")
        images = browser.evaluate("""Promise.all(Array.from(document.images).map(i => i.complete ? i :
            new Promise(done => { i.onload = i.onerror = () => done(i); }))).then(all => all.map(
            i => [i.getAttribute("src"), i.naturalWidth > 0 && i.naturalHeight > 0]))""")
        assert len(images) >= 4 * 3 + 3  # photo, mask, CAMs per row, ground truth on three
        assert [src for src, ok in images if not ok] == []

        headers = browser.evaluate('Array.from(document.querySelectorAll("#runs th")).map(h => '
                                   '[h.innerText, h.dataset.type || ""])')
        names = [h for h, _ in headers]
        assert names == ["image", "IoU", "labels", "source", "photo", "pseudo mask", "ground truth", "CAMs (refined)"]
        assert all(kind in ("num", "text") for _, kind in headers), headers  # every column sorts

        rows = browser.evaluate(_ROWS)
        assert len(rows) == 4
        assert _ordered([r[1] for r in rows], True, False)  # opened sorted by IoU, worst first
        assert rows[-1][0] == "chelsea" and math.isnan(float(rows[-1][1]))  # no ground truth: last
        assert [r[0] for r in rows] != sorted(r[0] for r in rows)  # IoU order is not the name order

        for col, (name, kind) in enumerate(headers):
            for descending in (False, True):
                browser.evaluate(f'document.querySelectorAll("#runs th")[{col}].click()')
                values = [r[col] for r in browser.evaluate(_ROWS)]
                assert _ordered(values, kind == "num", descending), (name, descending, values)
                if kind == "num" and any(math.isnan(float(v)) for v in values):
                    assert math.isnan(float(values[-1])), (name, values)
        assert browser.errors() == []
    finally:
        browser.close()
