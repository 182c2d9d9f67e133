"""`tvm-hybrid demo`: the README's main job on a bundled real model, end to end."""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from pathlib import Path

import click

from .output import emit_json

log = logging.getLogger("tvm_hybrid.cli")

_BUNDLED = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
_BUNDLED_INPUT = "x:1x3x48x192"
# Small enough that the classifier does not fit: the plan keeps a prefix, the cloud the rest.
_DEMO_MEMORY = "600KiB"


def _bundled_model() -> Path | None:
    here = Path(__file__).resolve()
    for root in (here.parents[2] / "tests" / "models", Path.cwd() / "tests" / "models"):
        if (root / _BUNDLED).is_file():
            return root / _BUNDLED
    return None


@click.command("demo")
@click.option("--model", type=click.Path(dir_okay=False), help=f"ONNX model (default: the bundled {_BUNDLED}).")
@click.option("--input", "input_spec", default=None, help=f"NAME:DIMS for --model (default {_BUNDLED_INPUT}).")
@click.option("--target", "-t", default="host", show_default=True)
@click.option("--memory", default=_DEMO_MEMORY, show_default=True, help="Device memory budget that forces the split.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Keep the artifacts here.")
@click.option("--json", "as_json", is_flag=True)
def command(model, input_spec, target, memory, output, as_json) -> None:
    """Compile a real model with a device/cloud split, serve the cloud half on loopback, run it
    split, then with the cloud gone (local fallback), and check every answer against onnxruntime.

    \b
    tvm-hybrid demo
    tvm-hybrid demo --model det.onnx --input x:1x3x320x320 --memory 8MiB
    """
    import numpy as np

    from ..compiler.importer import InputOverride
    from ..compiler.package import CompileOptions, PlanSettings, compile_model
    from ..errors import UsageError
    from ..runtime import Session

    if model is None:
        found = _bundled_model()
        if found is None:
            raise UsageError(f"the bundled model {_BUNDLED} is not here (run from a source checkout); pass --model")
        model, input_spec = found, input_spec or _BUNDLED_INPUT
    inputs = (InputOverride.parse(input_spec),) if input_spec else ()
    steps = []
    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-demo-") as tmp:
        out = Path(output or tmp)
        t0 = time.perf_counter()
        summaries = compile_model(
            CompileOptions(model=Path(model), targets=(target,), output=out, inputs=inputs,
                           plan=PlanSettings(memory=memory))  # fmt: skip
        )
        device_art = summaries[0]
        cloud_art = summaries[1] if len(summaries) > 1 else None
        steps.append({"step": "compile", "seconds": round(time.perf_counter() - t0, 1),
                      "artifacts": {s.target: s.placement for s in summaries}})  # fmt: skip
        rng = np.random.default_rng(0)
        with Session(device_art.path) as probe:
            feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in probe.inputs}
        ref = _reference(model, feeds)
        if cloud_art is not None:
            with _LoopbackServer(cloud_art.path) as url:
                steps.append(_run("split: device prefix + cloud suffix over KServe v2", device_art.path, feeds, ref,
                                  cloud_url=url, fallback="off"))  # fmt: skip
            steps.append(_run("cloud gone: fallback runs the rest on the device", device_art.path, feeds, ref,
                              cloud_url=url, fallback="auto", timeout=2))  # fmt: skip
        else:
            steps.append(_run("all on the device", device_art.path, feeds, ref))
    doc = {"model": str(model), "target": device_art.target, "memory_budget": memory, "steps": steps,
           "ok": all(s.get("ok", True) for s in steps)}  # fmt: skip
    if as_json:
        emit_json(doc)
    else:
        for s in steps:
            if s["step"] == "compile":
                click.echo(f"compiled  {model} in {s['seconds']} s: " +
                           ", ".join(f"{k} [{' + '.join(v)}]" for k, v in s["artifacts"].items()))  # fmt: skip
                continue
            where = " → ".join(f"{t['placement']}{' (fallback)' if t['fallback'] else ''} {t['ms']:.1f} ms"
                               for t in s["trace"])  # fmt: skip
            verdict = "matches onnxruntime" if s["ok"] else "DOES NOT MATCH onnxruntime"
            click.echo(f"{s['step']}\n    {where}; max |diff| {s['max_abs_diff']:.1e}: {verdict}")
    if not doc["ok"]:
        raise SystemExit(5)


def _run(label, artifact, feeds, ref, **session_kw) -> dict:
    import numpy as np

    from ..runtime import Session

    with Session(artifact, **session_kw) as sess:
        outs = sess.run(feeds)
        trace = sess.trace
    if ref is None:
        return {"step": label, "trace": trace, "ok": True, "max_abs_diff": float("nan")}
    diff = max(float(np.max(np.abs(ref[n].astype(np.float64) - a))) for n, a in outs.items())
    ok = all(np.allclose(a, ref[n], rtol=1e-4, atol=1e-5) for n, a in outs.items())
    return {"step": label, "trace": trace, "ok": ok, "max_abs_diff": diff}


def _reference(model, feeds):
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed; the demo cannot check its answers")
        return None
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


class _LoopbackServer:
    """`tvm-hybrid serve` in a thread on a free loopback port, for the length of a with-block."""

    def __init__(self, artifact: Path):
        self.artifact = artifact

    def __enter__(self) -> str:
        import uvicorn

        from ..server.app import Registry, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.registry = Registry([self.artifact])
        config = uvicorn.Config(create_app(self.registry), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.registry.close()
