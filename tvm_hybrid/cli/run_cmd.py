"""`tvm-hybrid run`: run an artifact on .npy inputs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click

import numpy as np

from ..dtypes import NARROW, carrier, from_carrier, np_dtype, to_carrier
from .output import emit_json


def _parse_feed(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep else (None, text)


@click.command("run")
@click.argument("artifact", type=click.Path())
@click.option("--input", "-i", "feeds", multiple=True, metavar="NAME=FILE.npy",
              help="An input as a .npy file (repeatable); NAME= may be left out for a one-input model.")
@click.option("--cloud-url", metavar="URL", help="KServe v2 server hosting the cloud segments (tvm-hybrid serve).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token for the cloud, in a file.")
@click.option("--fallback", type=click.Choice(["auto", "off", "cloud"]), default="auto", show_default=True,
              help="auto: a failed segment runs once on the other side; off: never; cloud: cloud first.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the cloud per call.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Write NAME.npy for each output here.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run N times and report the median latency.")
@click.option("--verify-key", type=click.Path(dir_okay=False), envvar="TVM_HYBRID_VERIFY_KEY", show_envvar=True,
              help="PEM public key; the artifact must carry a valid signature by it (`tvm-hybrid sign`).")
@click.option("--threads", type=int, default=None, metavar="N",
              help="CPU threads per call  [default: $TVM_NUM_THREADS, else every core this process may use].")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (outputs, trace, latency, threads).")
@click.option("--device", default=None, metavar="NAME",
              help="Device to run on; for Vulkan artifacts a wgpu adapter name (or $TVM_HYBRID_WGPU_ADAPTER).")
@click.option("--objective", type=click.Choice(["latency", "energy", "cloud"]), default="latency", show_default=True,
              help="Artifacts compiled with --adaptive: pick each call's cut by least latency, least device "
                   "energy (compute + radio time) or least cloud compute.")
@click.option("--cut", default=None, metavar="NAME", help="Artifacts compiled with --adaptive: always run this cut.")
@click.option("--browser", is_flag=False, flag_value="chromium", default=None, metavar="[chromium|PATH]",
              help="Run a webgpu (or vulkan-*) artifact through the JavaScript runtime in headless Chromium.")
@click.option("--emulate", is_flag=True,
              help="Run an artifact built for another CPU (aarch64) here, under qemu-user: real outputs, meaningless timings.")
def command(artifact: str, feeds: tuple[str, ...], cloud_url: str | None, token_file: str | None, fallback: str,
            timeout: float, output_dir: str | None, repeat: int, as_json: bool, device: str | None,
            emulate: bool, verify_key: str | None, threads: int | None, objective: str,
            cut: str | None, browser: str | None) -> None:  # fmt: skip
    """Run an artifact (directory or .tar) on inputs from .npy files.

    \b
    tvm-hybrid run dist/x86-64-avx2 --input x=image.npy --output-dir out/
    tvm-hybrid run dist/x86-64-avx2 --input x=image.npy --repeat 50 --threads 2 --json
    tvm-hybrid run dist/x86-64 --input x=image.npy --cloud-url http://127.0.0.1:8000
    tvm-hybrid run dist/vulkan-adreno --input x=image.npy --device llvmpipe
    tvm-hybrid run dist/arm64-cortex-a76 --input x=image.npy --output-dir out/ --emulate
    tvm-hybrid run dist/webgpu --input x=image.npy --browser --output-dir out/
    """
    if browser is not None:
        return _run_browser(artifact, feeds, browser, cloud_url, token_file, fallback, timeout, output_dir, repeat,
                            verify_key, as_json)  # fmt: skip

    if emulate:
        from ..emulate import artifact_target
        from ..hostcpu import needs_emulation

        if needs_emulation(artifact_target(artifact)):
            return _run_emulated(artifact, _forwarded_options(click.get_current_context()), repeat, as_json)

    from ..errors import UsageError
    from ..runtime import Session
    from ..runtime.threads import resolve as resolve_threads
    from .serve_cmd import read_token

    if threads is not None:
        threads = resolve_threads(threads, "--threads")
    token = read_token(token_file)
    with Session(artifact, cloud_url=cloud_url, token=token, fallback=fallback, timeout=timeout, device=device,
                 verify_key=verify_key, threads=threads, objective=objective, cut=cut) as sess:
        arrays = {}
        dtypes = {s.name: s.dtype for s in sess.inputs}
        for text in feeds:
            name, path = _parse_feed(text)
            if name is None:
                if len(sess.inputs) != 1:
                    raise UsageError(
                        f"--input {text}: name the input (NAME=FILE.npy); the model takes "
                        + ", ".join(s.name for s in sess.inputs)
                    )
                name = sess.inputs[0].name
            arrays[name] = _narrow_input(_load_npy(path, dtypes.get(name)), dtypes.get(name), path)
        times, cuts = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            outs = sess.run(arrays)
            times.append((time.perf_counter() - t0) * 1e3)
            if sess.decision is not None:
                cuts.append(sess.decision.cut)
        trace = sess.trace
        decision = sess.decision.to_dict() if sess.decision else None
        threads = sess.threads
    written = _write_outputs(outs, output_dir)
    median = statistics.median(times)
    if as_json:
        emit_json(
            {
                "artifact": artifact,
                "outputs": _outputs_doc(outs, written),
                "trace": trace,
                "latency_ms": {"median": median, "runs": repeat, "all": times},
                "threads": threads,
                **({"cut": decision, "cuts_run": cuts} if decision else {}),
            }
        )
        return
    _echo_outputs(outs, written)
    click.echo(f"latency  {median:.3f} ms (median of {repeat}, {threads} thread{'s' if threads > 1 else ''})")
    if decision:
        counts = {c: cuts.count(c) for c in dict.fromkeys(cuts)}
        click.echo(f"cut      {decision['cut']} ({decision['why']}, objective {decision['objective']}); "
                   + ", ".join(f"{c} x{n}" for c, n in counts.items()))  # fmt: skip


def _write_outputs(outs: dict, output_dir: str | None) -> dict[str, str]:
    """``NAME.npy`` per output in ``output_dir`` (narrow types as their carrier's bytes: .npy cannot hold them)."""
    from ..manifest import safe_filename

    written = {}
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, arr in outs.items():
            p = out / f"{safe_filename(name)}.npy"
            np.save(p, to_carrier(arr, arr.dtype.name))
            written[name] = str(p)
    return written


def _outputs_doc(outs: dict, written: dict[str, str]) -> dict:
    return {
        n: {"shape": list(a.shape), "dtype": str(a.dtype), "file": written.get(n),
            **({"stored_as": carrier(a.dtype.name)} if a.dtype.name in NARROW else {}),
            "min": _num(a.min()) if a.size else None, "max": _num(a.max()) if a.size else None}
        for n, a in outs.items()
    }  # fmt: skip


def _echo_outputs(outs: dict, written: dict[str, str]) -> None:
    for n, a in outs.items():
        where = f"  → {written[n]}" if n in written else ""
        flat = np.array2string(a.reshape(-1)[:6], precision=4, separator=", ")
        click.echo(f"{n}  {'x'.join(map(str, a.shape))} {a.dtype}  {flat}{'…' if a.size > 6 else ''}{where}")


def _run_browser(artifact: str, feeds: tuple[str, ...], browser: str, cloud_url: str | None, token_file: str | None,
                 fallback: str, timeout: float, output_dir: str | None, repeat: int, verify_key: str | None,
                 as_json: bool) -> None:  # fmt: skip
    """``run --browser``: the artifact through tvm-hybrid.js in headless Chromium (runtime/browser.py)."""
    from ..errors import UsageError
    from ..runtime.browser import input_specs, run_in_browser
    from .serve_cmd import read_token

    specs = input_specs(artifact)
    arrays = {}
    for text in feeds:
        name, path = _parse_feed(text)
        if name is None:
            if len(specs) != 1:
                raise UsageError(f"--input {text}: name the input (NAME=FILE.npy); the model takes "
                                 + ", ".join(s["name"] for s in specs))  # fmt: skip
            name = specs[0]["name"]
        arrays[name] = _load_npy(path)
    res = run_in_browser(artifact, arrays, browser=browser, cloud_url=cloud_url, token=read_token(token_file),
                         fallback=fallback, timeout=timeout, verify_key=verify_key, repeat=repeat)  # fmt: skip
    outs, times = res["outputs"], res["times_ms"]
    written = _write_outputs(outs, output_dir)
    median = statistics.median(times) if times else None
    if as_json:
        emit_json({"artifact": artifact, "outputs": _outputs_doc(outs, written), "trace": res["trace"],
                   "latency_ms": {"median": median, "runs": repeat, "all": times},
                   "browser": {"user_agent": res["browser"], "adapter": res["adapter"]},
                   **({"signed_by": res["signed_by"]} if res["signed_by"] else {})})  # fmt: skip
        return
    _echo_outputs(outs, written)
    adapter = res["adapter"] or {}
    where = ", ".join(sorted({t["placement"] for t in res["trace"]}))
    click.echo(f"latency  {median:.3f} ms (median of {repeat}, in the browser: {where}"
               + (f", WebGPU adapter {adapter.get('vendor')}/{adapter.get('architecture')}" if adapter else "") + ")")


def _forwarded_options(ctx: click.Context) -> list[str]:
    """This command's options as given (--emulate left out), to run the same command under emulation.
    Only what the command line or the environment set: click 8.3+ keeps an unset ``default`` as a
    sentinel, so comparing with ``p.default`` would forward every flag (``--json`` included)."""
    from click.core import ParameterSource

    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    args = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or p.name == "emulate" or value in (None, ()) \
                or ctx.get_parameter_source(p.name) not in given:  # fmt: skip
            continue
        flag = max(p.opts, key=len)
        if p.is_flag:
            args.append(flag)
            continue
        args += [f"{flag}={v}" for v in (value if p.multiple else [value])]
    return args


def _run_emulated(artifact: str, args: list[str], repeat: int, as_json: bool) -> None:
    """This command again, on the artifact's architecture under qemu-user; its exit code is ours."""
    import json
    import logging
    import sys

    from ..emulate import run_emulated
    from ..errors import RuntimeFailure
    from .output import _state

    if repeat > 1:
        logging.getLogger("tvm_hybrid.cli").warning(
            "timings under emulation mean nothing (qemu translates every instruction); "
            "measure on the device, or tune over RPC (tune --rpc-tracker)"
        )
    proc = run_emulated(artifact, args, capture=True, verbose=_state["verbose"])
    if proc.returncode < 0:
        raise RuntimeFailure(f"the emulated run died with signal {-proc.returncode}; rerun with --verbose")
    if proc.returncode != 0:  # the child printed its one-line error on stderr: same exit code, no second line
        sys.exit(proc.returncode)
    if as_json:
        doc = json.loads(proc.stdout)
        doc["emulated"] = proc.to_dict()
        emit_json(doc)
        return
    click.echo(proc.stdout, nl=False)
    click.echo(f"(emulated with {proc.emulator}: the outputs are the device's, the latency is not)")


def _num(x):
    return float(x) if x.dtype.name in NARROW else x.item()


def _narrow_input(arr, dtype: str | None, path: str):
    """A .npy for an input of a narrow type (float8, int4…), which .npy cannot hold: as ``run
    --output-dir`` writes them (the carrier: a float format's bit patterns as uint8, an integer's
    values as int8/uint8), or as numpy saves an ml_dtypes array (its bytes, as void or an
    unreadable descr)."""
    from ..errors import UsageError

    if dtype not in NARROW or arr.dtype.name == dtype:
        return arr
    if arr.dtype.kind == "V" and arr.dtype.itemsize == 1:
        return arr.view(np_dtype(dtype))
    if arr.dtype.name == carrier(dtype):
        back = from_carrier(arr, dtype)
        if not np.array_equal(to_carrier(back, dtype), arr):
            raise UsageError(f"input file {path}: values out of range for {dtype}")
        return back
    return arr  # (the session names the dtype it wants)


def _load_npy(path: str, dtype: str | None = None):
    from ..errors import UsageError

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"input file {path} does not exist") from None
    except ValueError as e:
        if dtype in NARROW and "descr" in str(e):  # np.save of some ml_dtypes arrays: '<f1'
            return _npy_bytes(path)
        raise UsageError(f"input file {path} is not a readable .npy array: {e}") from e
    except (OSError, EOFError) as e:
        raise UsageError(f"input file {path} is not a readable .npy array: {e}") from e


def _npy_bytes(path: str):
    """A .npy of one-byte elements whose descr numpy cannot parse, as void bytes in its shape."""
    import ast

    from ..errors import UsageError

    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            size = int.from_bytes(f.read(2 if major == 1 else 4), "little")
            header = ast.literal_eval(f.read(size).decode("latin1"))
            shape = tuple(header["shape"])
            data = np.frombuffer(f.read(), np.uint8, count=int(np.prod(shape, dtype=np.int64)))
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
        raise UsageError(f"input file {path} is not a readable .npy array: {e}") from e
    return data.reshape(shape, order="F" if header.get("fortran_order") else "C").view("V1")
