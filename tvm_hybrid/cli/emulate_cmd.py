"""`tvm-hybrid emulate setup|path`: the aarch64 sysroot that `run --emulate` runs artifacts in."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

_ARCHES = click.Choice(["aarch64"])


@click.group("emulate")
def command() -> None:
    """The sysroot `tvm-hybrid run --emulate` runs other architectures' artifacts in (qemu-user).

    \b
    tvm-hybrid emulate setup          # once: ~25 s, ~430 MB in ~/.cache/tvm-hybrid/aarch64-sysroot
    tvm-hybrid emulate path           # where it is; exit 1 when it is not ready
    """


@command.command("setup")
@click.option("--arch", type=_ARCHES, default="aarch64", show_default=True)
@click.option("--sysroot", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory  [default: $TVM_HYBRID_<ARCH>_SYSROOT or ~/.cache/tvm-hybrid/<arch>-sysroot].")
@click.option("--force", is_flag=True, help="Recreate it even when it is ready.")
def setup(arch: str, sysroot: Path | None, force: bool) -> None:
    """Create (or update) the sysroot; returns at once when it is ready. Prints its directory."""
    from ..emulate import create_sysroot

    _progress_to_stderr()
    click.echo(create_sysroot(arch, sysroot, force=force).root)


@command.command("path")
@click.option("--arch", type=_ARCHES, default="aarch64", show_default=True)
def path(arch: str) -> None:
    """Print the sysroot's directory; exit 1 (one line on stderr) when it is not ready."""
    from ..emulate import find_sysroot
    from ..errors import RuntimeFailure

    try:
        click.echo(find_sysroot(arch).root)
    except RuntimeFailure as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


def _progress_to_stderr() -> None:
    """Setup takes a while: its progress lines go to stderr even when stderr is not a terminal."""
    root = logging.getLogger("tvm_hybrid")
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
