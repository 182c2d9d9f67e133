"""`tvm-hybrid serve`: host cloud segments over KServe v2."""

from __future__ import annotations

import click


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


@click.command("serve")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token-file", type=click.Path(dir_okay=False), help="Require `Authorization: Bearer <token>`.")
def command(artifacts: tuple[str, ...], host: str, port: int, token_file: str | None) -> None:
    """Serve cloud artifacts' segments over the KServe v2 protocol.

    \b
    tvm-hybrid serve dist/cloud-x86 --port 8000 --token-file token.txt
    curl localhost:8000/v2/health/ready
    """
    import uvicorn

    from ..server.app import Registry, create_app

    token = read_token(token_file)
    registry = Registry(list(artifacts))
    app = create_app(registry, token)
    names = ", ".join(f"{n}/{v}" for n, vs in sorted(registry.models.items()) for v in sorted(vs))
    click.echo(f"tvm-hybrid: serving {names} on http://{host}:{port}", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        registry.close()
