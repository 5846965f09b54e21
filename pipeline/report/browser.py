"""Does the report render? Open it in headless Chromium and check that every image in it decoded."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write, file_sha256

__all__ = ["RenderCheck", "RenderError", "find_chromium", "check_render"]


class RenderError(OSError):
    """Chromium failed, timed out, or left no trace of the page it was given."""


@dataclass
class RenderCheck:
    """What headless Chromium saw: how many images the page has, which failed to decode, and a screenshot."""

    images: int
    broken: list[str]
    height: int
    screenshot: Path | None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.images > 0 and not self.broken


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


_PROBE = ("<script>addEventListener('load',()=>{const im=[...document.images];document.body.setAttribute('data-render-check',"
          "JSON.stringify({images:im.length,broken:im.filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.alt),"
          "height:document.body.scrollHeight}))})</script>")


def _run(command: list[str], page: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RenderError(f"chromium did not finish rendering {page} within {timeout:g} s") from None


def check_render(page: str | os.PathLike, *, chromium: str | None = None, screenshot: str | os.PathLike | None = None,
                 timeout: float = 120, record: str | os.PathLike | None = None) -> RenderCheck:
    """Open ``page`` in headless Chromium and report whether every image decoded.

    A copy of the page with a small probe script is loaded (the report itself carries no script); Chromium dumps
    the DOM after the load event, where the probe has recorded each image's state.

    Args:
        page: the HTML file.
        chromium: the browser's executable; None looks for one on PATH.
        screenshot: where to save a full-page PNG; None for none.
        timeout: seconds each Chromium run may take.
        record: a JSON file keeping the result with the page's sha256. A passed check recorded there for these
            very bytes (and its screenshot, where one is asked for) is returned with ``reused`` set, without
            starting Chromium (a few seconds); a new result is written there.

    Raises:
        FileNotFoundError: no Chromium on PATH, or no ``page``.
        RenderError: Chromium failed or timed out, its output carries no probe result, or it wrote no screenshot.
    """
    digest = file_sha256(page) if record is not None else None
    if record is not None:
        old = _recorded(Path(record), digest, screenshot)
        if old is not None:
            return old
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium); the render check needs it")
    page = Path(page).resolve()
    text = page.read_text()
    with tempfile.TemporaryDirectory(prefix="pipeline-render-") as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(text.replace("</body>", _PROBE + "</body>"))
        base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--hide-scrollbars", f"--user-data-dir={tmp}/profile", "--virtual-time-budget=15000"]
        run = _run([*base, "--dump-dom", probe.as_uri()], page, timeout)
        found = re.search(r'data-render-check="([^"]*)"', run.stdout)
        if run.returncode != 0 or not found:
            raise RenderError(f"chromium could not render {page} (exit {run.returncode}): {run.stderr.strip()[-500:] or 'no message'}")
        seen = json.loads(html.unescape(found.group(1)))
        shot = None
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            height = min(max(int(seen["height"]), 800), 16000)
            _run([*base, f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri()], page, timeout)
            if not shot.is_file():
                raise RenderError(f"chromium wrote no screenshot of {page} to {shot}")
    result = RenderCheck(int(seen["images"]), list(seen["broken"]), int(seen["height"]), shot)
    if record is not None:
        fields = {"page_sha256": digest, "images": result.images, "broken": result.broken, "height": result.height,
                  "screenshot": None if shot is None else str(shot)}
        atomic_write(Path(record), lambda f: f.write(json.dumps(fields, indent=1).encode()))
    return result


def _recorded(record: Path, digest: str, screenshot: str | os.PathLike | None) -> RenderCheck | None:
    """The passed check recorded for the page with this digest, or None (none, another page, a failure, no screenshot)."""
    try:
        seen = json.loads(record.read_text())
        check = RenderCheck(int(seen["images"]), list(seen["broken"]), int(seen["height"]),
                            None if seen["screenshot"] is None else Path(seen["screenshot"]), reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if seen.get("page_sha256") != digest or not check.ok:
        return None
    if screenshot is not None and (check.screenshot != Path(screenshot).resolve() or not check.screenshot.is_file()):
        return None
    return check
