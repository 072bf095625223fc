"""Build the docs site once per test session and serve it on localhost."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def require(ok: bool, what: str) -> None:
    """Fail, naming the install step, when a docs tool is missing: the README's test command
    installs everything, so the only tests that may skip are the GPU ones."""
    if not ok:
        pytest.fail(f"{what} is missing: install it as the README's test command does")


@functools.cache
def build_site() -> Path:
    require(shutil.which("mkdocs") is not None or _has_module("mkdocs"), "mkdocs")
    # a directory of this process's own: pytest-xdist workers build side by side
    site = Path(tempfile.mkdtemp(prefix="momentum-contrast-site-"))
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return site


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on a free localhost port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
