"""`tvm-hybrid demo`: the README's main job on a bundled real model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import click

from . import emit_json

log = logging.getLogger("tvm_hybrid.cli")

_BUNDLED = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
_BUNDLED_INPUT = "x:1x3x48x192"


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
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Keep the artifact here.")
@click.option("--json", "as_json", is_flag=True)
def command(model, input_spec, target, output, as_json) -> None:
    """Compile a real model for this machine, run it, and check it against onnxruntime.

    \b
    tvm-hybrid demo
    tvm-hybrid demo --model det.onnx --input x:1x3x320x320
    """
    import numpy as np

    from ..compiler.importer import InputOverride
    from ..compiler.package import CompileOptions, compile_model
    from ..errors import UsageError
    from ..runtime import Session

    if model is None:
        found = _bundled_model()
        if found is None:
            raise UsageError(f"the bundled model {_BUNDLED} is not here (run from a source checkout) ; pass --model")
        model, input_spec = found, input_spec or _BUNDLED_INPUT
    inputs = (InputOverride.parse(input_spec),) if input_spec else ()
    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-demo-") as tmp:
        out = Path(output or tmp)
        log.info("demo: compiling %s for %s", model, target)
        [summary] = compile_model(CompileOptions(model=Path(model), targets=(target,), output=out, inputs=inputs))
        with Session(summary.path) as sess:
            rng = np.random.default_rng(0)
            feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in sess.inputs}
            outs = sess.run(feeds)
            times = []
            for _ in range(20):
                sess.run(feeds)
                times.append(sess.trace[0]["ms"])
        doc = {
            "model": str(model),
            "target": summary.target,
            "artifact": str(summary.path) if output else None,
            "compile_seconds": summary.seconds,
            "device_ms_median": float(np.median(times)),
            "outputs": {n: list(a.shape) for n, a in outs.items()},
            "reference": _compare(model, feeds, outs),
        }
    if as_json:
        emit_json(doc)
        return
    click.echo(f"compiled  {model} for {summary.target} in {summary.seconds:.1f} s")
    click.echo(f"ran       on the device: {doc['device_ms_median']:.2f} ms (median of 20)")
    ref = doc["reference"]
    if ref.get("max_abs_diff") is not None:
        verdict = "match" if ref["ok"] else "MISMATCH"
        click.echo(f"checked   against onnxruntime: max |diff| {ref['max_abs_diff']:.2e} → {verdict}")
    else:
        click.echo(f"checked   {ref['note']}")
    if not ref.get("ok", True):
        raise SystemExit(5)


def _compare(model, feeds, outs) -> dict:
    import numpy as np

    try:
        import onnxruntime as ort
    except ImportError:
        return {"ok": True, "max_abs_diff": None, "note": "onnxruntime not installed; skipped the reference check"}
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    diff = max(float(np.max(np.abs(ref[n].astype(np.float64) - a))) for n, a in outs.items())
    ok = all(np.allclose(a, ref[n], rtol=1e-4, atol=1e-5) for n, a in outs.items())
    return {"ok": ok, "max_abs_diff": diff}
