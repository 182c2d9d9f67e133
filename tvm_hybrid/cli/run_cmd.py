"""`tvm-hybrid run`: run an artifact on .npy inputs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click

from . import emit_json


def _parse_feed(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep else (None, text)


@click.command("run")
@click.argument("artifact", type=click.Path())
@click.option("--input", "-i", "feeds", multiple=True, metavar="NAME=FILE.npy",
              help="An input as a .npy file (repeatable); NAME= may be left out for a one-input model.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Write NAME.npy for each output here.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run N times and report the median latency.")
@click.option("--verify-key", type=click.Path(dir_okay=False), envvar="TVM_HYBRID_VERIFY_KEY", show_envvar=True,
              help="PEM public key; the artifact must carry a valid signature by it (`tvm-hybrid sign`).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (outputs, trace, latency).")
def command(artifact: str, feeds: tuple[str, ...], output_dir: str | None, repeat: int, verify_key: str | None,
            as_json: bool) -> None:
    """Run an artifact (directory or .tar) on inputs from .npy files.

    \b
    tvm-hybrid run dist/x86-64-avx2 --input x=image.npy --output-dir out/
    tvm-hybrid run dist/x86-64-avx2 --input x=image.npy --repeat 50 --json
    """
    import numpy as np

    from ..errors import UsageError
    from ..manifest import safe_filename
    from ..runtime import Session

    with Session(artifact, verify_key=verify_key) as sess:
        arrays = {}
        for text in feeds:
            name, path = _parse_feed(text)
            if name is None:
                if len(sess.inputs) != 1:
                    raise UsageError(
                        f"--input {text}: name the input (NAME=FILE.npy); the model takes "
                        + ", ".join(s.name for s in sess.inputs)
                    )
                name = sess.inputs[0].name
            arrays[name] = _load_npy(path)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            outs = sess.run(arrays)
            times.append((time.perf_counter() - t0) * 1e3)
        trace = sess.trace
    written = {}
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, arr in outs.items():
            p = out / f"{safe_filename(name)}.npy"
            np.save(p, arr)
            written[name] = str(p)
    median = statistics.median(times)
    if as_json:
        emit_json(
            {
                "artifact": artifact,
                "outputs": {
                    n: {"shape": list(a.shape), "dtype": str(a.dtype), "file": written.get(n),
                        "min": _num(a.min()) if a.size else None, "max": _num(a.max()) if a.size else None}
                    for n, a in outs.items()
                },
                "trace": trace,
                "latency_ms": {"median": median, "runs": repeat, "all": times},
            }
        )
        return
    for n, a in outs.items():
        where = f"  → {written[n]}" if n in written else ""
        flat = np.array2string(a.reshape(-1)[:6], precision=4, separator=", ")
        click.echo(f"{n}  {'x'.join(map(str, a.shape))} {a.dtype}  {flat}{'…' if a.size > 6 else ''}{where}")
    click.echo(f"latency  {median:.3f} ms (median of {repeat})")


def _num(x):
    return x.item()


def _load_npy(path: str):
    import numpy as np

    from ..errors import UsageError

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"input file {path} does not exist") from None
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"input file {path} is not a readable .npy array: {e}") from e
