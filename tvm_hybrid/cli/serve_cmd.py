"""`tvm-hybrid serve`: host cloud segments over KServe v2."""

from __future__ import annotations

import contextlib
import re
import signal
import sys

import click

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def read_token(path: str | None) -> str | None:
    """The bearer token in a file (surrounding whitespace ignored)."""
    if path is None:
        return None
    from ..errors import UsageError

    try:
        token = open(path).read().strip()
    except OSError as e:
        raise UsageError(f"cannot read token file {path}: {e.strerror or e}") from e
    if not token:
        raise UsageError(f"token file {path} is empty")
    return token


def _size(ctx, param, value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", value, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size like 64MiB, 500kB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@click.command("serve")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token-file", type=click.Path(dir_okay=False), help="Require `Authorization: Bearer <token>` (401 without).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Requests computed at once: TVM VMs per model and threads running them  [default: CPU cores].")
@click.option("--threads", type=int, default=None, metavar="N",
              help="CPU threads each worker computes a request with  [default: $TVM_NUM_THREADS, else the "
                   "usable cores split between the workers].")
@click.option("--max-request-size", default="64MiB", show_default=True, callback=_size,
              help="Larger request bodies are refused with 413.")
@click.option("--max-queue", type=click.IntRange(min=1), default=None,
              help="Inferences queued or running beyond which requests get 503  [default: 32 per worker].")
@click.option("--access-log", default="-", show_default=True, metavar="PATH",
              help="One JSON line per request: '-' for stderr, a file path, or 'off'.")
@click.option("--max-sequences", type=click.IntRange(min=1), default=16, show_default=True,
              help="Split decoders: sequences whose KV cache is kept at once (a new one beyond is refused, 429).")
@click.option("--sequence-timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Split decoders: seconds a sequence may stay idle before its cache is dropped.")
@click.option("--graceful-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds that in-flight requests get to finish.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (https://app.example.com, or '*') call the API from a browser "
                   "(repeatable): the tvm-hybrid.js runtime's cloud segments.")
@click.option("--web", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Serve a webgpu device artifact under /web/ with the JavaScript runtime and a demo page.")
def command(artifacts: tuple[str, ...], host: str, port: int, token_file: str | None, workers: int | None,
            threads: int | None, max_request_size: int, max_queue: int | None, access_log: str, max_sequences: int,
            sequence_timeout: float, graceful_timeout: float, cors_origins: tuple[str, ...],
            web: str | None) -> None:  # fmt: skip
    """Serve cloud artifacts' segments over the KServe v2 protocol (any v2 client works).

    \b
    tvm-hybrid serve dist/cloud-x86 --port 8000 --token-file token.txt
    curl localhost:8000/v2/health/ready
    curl -H "Authorization: Bearer $(cat token.txt)" localhost:8000/metrics
    """
    from ..runtime.threads import per_worker, usable_cores

    workers = workers or usable_cores()
    threads = per_worker(workers, threads, "--threads")

    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        from ..errors import UsageError

        raise UsageError(f"serve needs {e.name}: pip install 'tvm-hybrid[serve]'") from e

    from ..server.app import Registry, create_app

    token = read_token(token_file)
    if web is not None:
        _check_web(web)
    _setup_access_log(access_log)
    registry = Registry(list(artifacts), workers=workers, threads=threads, max_sequences=max_sequences,
                        sequence_timeout=sequence_timeout)  # fmt: skip
    app = create_app(registry, token, max_request_bytes=max_request_size, max_queue=max_queue,
                     cors_origins=cors_origins, web=web)  # fmt: skip
    names = ", ".join(f"{n}/{v}" for n, vs in sorted(registry.models.items()) for v in sorted(vs))
    click.echo(f"tvm-hybrid: serving {names} on http://{host}:{port} ({workers} workers x {threads} thread{'s' if threads > 1 else ''})", err=True)
    if web is not None:
        click.echo(f"tvm-hybrid: the demo page of {web} is http://{host}:{port}/web/", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http="h11",
                            timeout_graceful_shutdown=graceful_timeout)  # fmt: skip
    try:
        _server_class()(config).run()
    finally:
        registry.close()
    click.echo("tvm-hybrid: stopped", err=True)


def _check_web(web: str) -> None:
    """``--web DIR`` must be a device artifact a browser runs (wgsl-plan segments): exit 2 or 4 otherwise."""
    import json
    from pathlib import Path

    from ..errors import ArtifactError, UsageError

    path = Path(web)
    if not (path / "manifest.json").is_file():
        raise UsageError(f"--web {web}: not an artifact directory (no manifest.json); compile one with --target webgpu")
    try:
        m = json.loads((path / "manifest.json").read_text())
        formats = {s.get("format") for s in m["segments"] if s["placement"] == "device"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"--web {web}: cannot read its manifest: {e}") from e
    if m.get("role") != "device" or not formats <= {"wgsl-plan"}:
        raise UsageError(f"--web {web}: a {m.get('target', {}).get('name', '?')} {m.get('role')} artifact; "
                         "browsers run artifacts compiled with --target webgpu")  # fmt: skip


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT end in a graceful shutdown and exit status 0
        (uvicorn re-raises the signal after shutting down, which skips our cleanup)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    return Server


def _setup_access_log(where: str) -> None:
    import logging

    logger = logging.getLogger("tvm_hybrid.access")
    logger.propagate = False
    logger.handlers.clear()
    if where == "off":
        logger.setLevel(logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr) if where == "-" else logging.FileHandler(where)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
