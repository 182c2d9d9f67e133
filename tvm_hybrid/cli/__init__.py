"""The `tvm-hybrid` command line: a click group; each command lives in its own module."""

from __future__ import annotations

import logging
import sys
import traceback

import click

from .. import __version__
from ..errors import HybridError
from .output import _state



class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"tvm-hybrid: {record.getMessage()}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tvm-hybrid")
@click.option("--verbose", "-v", is_flag=True, help="Debug logs, and the traceback on errors.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr (the default when stderr is not a terminal).")
def cli(verbose: bool, quiet: bool) -> None:
    """Compile ONNX models with Apache TVM for edge targets; run them on the device, with the cloud
    taking what the device cannot carry.

    \b
    tvm-hybrid targets
    tvm-hybrid compile model.onnx --target host --input x:1x3x224x224 -o dist/
    tvm-hybrid run dist/x86-64-avx2 --input x=image.npy --output-dir out/
    """
    _state["verbose"] = verbose
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("tvm_hybrid")
    root.handlers[:] = [handler]
    # Progress is for people: a pipeline (stderr not a terminal) sees only warnings and the error line.
    if verbose:
        level = logging.DEBUG
    elif quiet or not sys.stderr.isatty():
        level = logging.WARNING
    else:
        level = logging.INFO
    root.setLevel(level)
    root.propagate = False


def _register() -> None:
    from . import (compile_cmd, demo_cmd, emulate_cmd, export_cmd, generate_cmd, inspect_cmd, plan_cmd, prune_cmd,
                   quantize_cmd, run_cmd, serve_cmd, sign_cmd, targets_cmd, tune_cmd)  # fmt: skip

    for mod in (targets_cmd, inspect_cmd, plan_cmd, quantize_cmd, prune_cmd, tune_cmd, compile_cmd, run_cmd, serve_cmd,
                generate_cmd, export_cmd, demo_cmd, emulate_cmd):
        cli.add_command(mod.command)
    for cmd in sign_cmd.commands:
        cli.add_command(cmd)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: turns HybridErrors into one stderr line and their exit code."""
    try:
        cli.main(args=argv, prog_name="tvm-hybrid", standalone_mode=False)
    except HybridError as e:
        _fail(str(e), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        # Usage errors: click's own message, one line, exit 2.
        msg = e.format_message()
        if isinstance(e, click.UsageError) and e.ctx is not None:
            msg += f" (see `{e.ctx.command_path} --help`)"
        _fail(msg, 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # a bug of ours: still one line, unless --verbose
        _fail(
            f"internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            " (rerun with --verbose for the traceback, and please report it)",
            1,
        )
    sys.exit(0)


def _fail(message: str, code: int) -> None:
    if _state["verbose"]:
        traceback.print_exc()
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)
