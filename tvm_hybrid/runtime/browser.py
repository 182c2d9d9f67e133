"""Run an artifact through the JavaScript runtime (runtime/web/tvm-hybrid.js) in headless Chromium.

``tvm-hybrid run ARTIFACT --browser`` uses this: the artifact, the runtime and a runner page
(web/run.html) are served on a loopback port; Chromium opens the page with WebGPU enabled; the
page loads the artifact as any web app would (checksums and signature checked in the browser),
runs it, and posts the outputs (.npy) and the trace back here. No browser driver is involved,
only the browser binary, so what runs is exactly what a web page gets.

Standard library and numpy only (the runtime side: no compiler, no onnx).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from ..errors import ArtifactError, RuntimeFailure, UsageError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
#: Names tried for ``--browser chromium`` (Debian's package, then Google's builds).
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = ("install Chromium (Debian/Ubuntu: apt-get install chromium; scripts/setup.sh does it) "
                "or pass --browser /path/to/chrome")  # fmt: skip
#: Flags for a headless run on a machine with no network but loopback: WebGPU on, nothing that
#: phones home (its lookups are refused on closed machines, many at a time).
FLAGS = (
    "--headless", "--enable-unsafe-webgpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
    "--disable-features=MediaRouter,OptimizationHints,Translate",
)  # fmt: skip
_KIND_ERRORS = {"artifact": ArtifactError, "usage": UsageError}


def find_browser(spec: str | None = None) -> str:
    """The browser binary for ``--browser [chromium|PATH]``; RuntimeFailure (exit 5) when none is found."""
    if spec and spec not in ("chromium", "chrome"):
        p = shutil.which(spec) or (spec if Path(spec).is_file() and os.access(spec, os.X_OK) else None)
        if p is None:
            raise RuntimeFailure(f"browser {spec} not found or not executable; {INSTALL_HINT}")
        return p
    for name in CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    raise RuntimeFailure(f"no Chromium found (looked for {', '.join(CANDIDATES)} on PATH); {INSTALL_HINT}")


def browser_flags(user_data_dir: str) -> list[str]:
    """Chromium's command-line flags for a headless WebGPU run in a fresh profile."""
    flags = [*FLAGS, f"--user-data-dir={user_data_dir}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return flags


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".html": "text/html", ".json": "application/json", ".css": "text/css",
          ".png": "image/png", ".jpg": "image/jpeg", ".svg": "image/svg+xml", ".ts": "text/plain"}  # fmt: skip


def content_type(path: str) -> str:
    return _TYPES.get(Path(path).suffix, "application/octet-stream")


def under(root: Path, rel: str) -> Path | None:
    """``root/rel`` if it is a file inside ``root`` (no ``..``, no links out), else None."""
    p = (root / rel).resolve()
    return p if p.is_file() and p.is_relative_to(root.resolve()) else None


class Page:
    """A page run once in headless Chromium, served from memory on a loopback port.

    ``files``: URL path -> bytes; ``roots``: URL prefix -> a directory whose files are served
    under it; ``headers``: sent with every response (``Cross-Origin-Opener-Policy`` and
    ``-Embedder-Policy`` give a page threads, as onnxruntime-web's wasm wants). The page ends
    the run by POSTing JSON to ``done``; whatever else it POSTs is kept in ``posted``.
    """

    def __init__(self, files: dict[str, bytes], roots: dict[str, Path] | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        self.files = files
        self.roots = {k: Path(v).resolve() for k, v in (roots or {}).items()}
        self.headers = headers or {}
        self.posted: dict[str, bytes] = {}
        self.result: dict[str, Any] | None = None
        self._done = threading.Event()

    def run(self, page: str, *, browser: str | None = None, wait: float = 300.0) -> dict[str, Any]:
        """Open ``page`` (a path in ``files``) in a fresh headless Chromium; the JSON it posts to
        ``done``. RuntimeFailure when the browser is missing, exits early, or the page takes
        longer than ``wait`` seconds."""
        binary = find_browser(browser)
        server = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=server.serve_forever, name="tvm-hybrid-browser-http", daemon=True).start()
        profile = tempfile.mkdtemp(prefix="tvm-hybrid-chromium-")
        url = f"http://127.0.0.1:{server.server_address[1]}/{page}"
        errlog = tempfile.TemporaryFile()
        proc = None
        try:
            try:
                proc = subprocess.Popen([binary, *browser_flags(profile), url], stdout=subprocess.DEVNULL,
                                        stderr=errlog, start_new_session=True)  # fmt: skip
            except OSError as e:
                raise RuntimeFailure(f"cannot start {binary}: {e.strerror or e}; {INSTALL_HINT}") from e
            deadline = time.monotonic() + wait
            while not self._done.wait(0.1):
                if proc.poll() is not None:
                    raise RuntimeFailure(f"{Path(binary).name} exited ({proc.returncode}) before the page finished: "
                                         f"{_last_error(errlog)}")  # fmt: skip
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"the page did not finish within {wait:.0f} s in {Path(binary).name}")
            return self.result or {}
        finally:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            server.shutdown()
            server.server_close()
            errlog.close()
            shutil.rmtree(profile, ignore_errors=True)

    def _get(self, path: str) -> tuple[bytes, str] | None:
        if path in self.files:
            return self.files[path], content_type(path)
        for prefix, root in self.roots.items():
            if path.startswith(prefix) and (p := under(root, path[len(prefix):])) is not None:
                return p.read_bytes(), content_type(p.name)
        return None

    def _post(self, path: str, body: bytes) -> None:
        if path == "done" and not self._done.is_set():
            try:
                self.result = json.loads(body)
            except ValueError:
                self.result = {"ok": False, "kind": "runtime", "error": "the page sent a malformed result"}
            self._done.set()
        else:
            self.posted[path] = body


def _handler(page: Page):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # the browser's requests, for --verbose
            log.debug("browser: " + fmt, *args)

        def _send(self, status: int, body: bytes, ctype: str = "application/octet-stream") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in page.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            found = page._get(unquote(urlsplit(self.path).path).lstrip("/"))
            if found is None:
                return self._send(404, b"not found", "text/plain")
            self._send(200, *found)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            page._post(urlsplit(self.path).path.lstrip("/"), body)
            self._send(200, b"{}", "application/json")

    return Handler


def input_specs(artifact: str | Path) -> list[dict[str, Any]]:
    """The model inputs an artifact's manifest lists (read, not verified: the browser verifies)."""
    path = Path(artifact)
    try:
        if path.is_dir():
            data = (path / "manifest.json").read_bytes()
        else:
            root, tmp = _unpacked(path)
            try:
                data = (root / "manifest.json").read_bytes()
            finally:
                if tmp is not None:
                    tmp.cleanup()
        return list(json.loads(data)["inputs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"cannot read the manifest of {artifact}: {getattr(e, 'strerror', None) or e}") from e


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the browser closing a connection as it exits
        log.debug("browser connection: %s", client_address, exc_info=True)


def _unpacked(path: Path) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The artifact's directory: ``path`` itself, or a .tar unpacked (checked by the browser, not here)."""
    from .artifact import _is_tar, safe_extract

    if path.is_dir():
        return path, None
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist; compile one with `tvm-hybrid compile MODEL -o DIR`")
    if not (path.is_file() and _is_tar(path)):
        raise ArtifactError(f"{path} is neither an artifact directory nor a .tar of one")
    tmp = tempfile.TemporaryDirectory(prefix="tvm-hybrid-web-")
    root = Path(tmp.name)
    safe_extract(path, root)
    entries = list(root.iterdir())
    if not (root / "manifest.json").exists() and len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
    return root, tmp


def run_in_browser(artifact: str | Path, feeds: dict[str, np.ndarray], *, browser: str | None = None,
                   cloud_url: str | None = None, token: str | None = None, fallback: str = "auto",
                   timeout: float = 30.0, verify_key: str | Path | None = None, repeat: int = 1,
                   wait: float = 300.0, profile: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run ``artifact`` on ``feeds`` in headless Chromium through tvm-hybrid.js (``profile``: also
    each kernel timed alone, under ``"profile"``).

    Returns ``{"outputs": {name: array}, "trace": [...], "times_ms": [...], "adapter": {...},
    "browser": user agent}``. ``timeout`` bounds each cloud call, ``wait`` the whole run
    (loading, compiling the pipelines, every repeat). Errors the page reports keep their kind:
    ArtifactError (exit 4: a checksum or the signature failed), UsageError (2), RuntimeFailure (5:
    no WebGPU and no cloud to fall back on, the cloud unreachable, the browser missing or hung).
    """
    options: dict[str, Any] = {"fallback": fallback, "timeoutMs": int(timeout * 1000)}
    if cloud_url:
        options["cloudUrl"] = cloud_url
    if token:
        options["token"] = token
    if verify_key:
        try:
            options["publicKey"] = Path(verify_key).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the public key {verify_key}: {getattr(e, 'strerror', None) or e}") from e
    find_browser(browser)  # before unpacking anything
    root, tmp = _unpacked(Path(artifact))
    names = list(feeds)
    job = {"options": options, "repeat": repeat, "profile": profile,
           "inputs": [{"name": n, "url": f"inputs/{i}.npy"} for i, n in enumerate(names)]}  # fmt: skip
    files = {"run.html": (WEB_DIR / "run.html").read_bytes(), "tvm-hybrid.js": (WEB_DIR / "tvm-hybrid.js").read_bytes(),
             "job.json": json.dumps(job).encode(), **{f"inputs/{i}.npy": _npy(feeds[n]) for i, n in enumerate(names)}}  # fmt: skip
    page = Page(files, {"artifact/": root})
    try:
        res = page.run("run.html", browser=browser, wait=wait)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not res.get("ok"):
        cls = _KIND_ERRORS.get(res.get("kind"), RuntimeFailure)
        raise cls(f"in the browser: {res.get('error', 'no result')}")
    outs = {name: np.load(io.BytesIO(page.posted[f"output/{i}"]), allow_pickle=False)
            for i, name in enumerate(res["outputs"])}  # fmt: skip
    return {"outputs": outs, "trace": res.get("trace", []), "times_ms": res.get("times", []),
            "adapter": res.get("adapter"), "placements": res.get("placements"), "profile": res.get("profile"),
            "signed_by": res.get("signed_by"), "browser": res.get("user_agent")}  # fmt: skip


def _last_error(f) -> str:
    f.seek(0)
    lines = [ln for ln in f.read().decode(errors="replace").splitlines() if "ERROR" in ln or "FATAL" in ln]
    return lines[-1][-300:] if lines else "no error printed"
