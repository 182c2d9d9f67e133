"""Post-training static int8 quantization: calibrate on the user's samples, write a QDQ ONNX model.

onnxruntime's ``quantize_static`` does the quantizing (QDQ format: u8 activations, s8 weights,
per channel by default); what this module adds is what a release pipeline needs around it:

- calibration samples read from a directory (one ``.npz`` per sample, keyed by input name) and
  checked against the model (names, ranks, fixed dimensions, dtypes), bad ones named in one line;
- the calibration ranges cached by content (model, samples, method), so a second run, or the
  search below, never recalibrates and a crash never loses them;
- an accuracy report against fp32 on held-out samples (``samples.compare``);
- ``budget``: the most sensitive layers stay fp32, the fewest that bring the accuracy loss
  (``samples.loss``) within the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..errors import UsageError, one_line
from ..manifest import sha256_file
from .onnx_graph import opset
from .samples import (OutputReport, compare, copy, load_samples, loss, model_inputs, named, onnxruntime, read_model,
                      run, split, write_atomic)  # fmt: skip

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")
#: Up to this many candidate layers, --accuracy-budget ranks them by quantizing each alone
#: (one onnxruntime quantize and run a layer); more, by the error each adds in one run.
_TRIAL_LIMIT = 128
#: The ops that hold the compute: quantized by default (their weights int8, Q/DQ on their
#: activations). Quantizing the ops between too (``op_types="all"``, onnxruntime's default) adds
#: error and, where the engine runs QDQ as fp32 arithmetic (TVM), time: on PP-OCR cls the
#: relative error was 0.0038 with all ops and 0.0016 with these.
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_COMPUTE_OPS = set(COMPUTE_OPS)


@dataclasses.dataclass
class Report:
    model: str
    output: str
    method: str
    per_channel: bool
    calibration_samples: int
    heldout_samples: int
    heldout_is_calibration: bool
    fp32_bytes: int
    int8_bytes: int
    quantized_nodes: int
    kept_fp32: list[str]
    outputs: list[OutputReport]
    budget: float | None
    calibration_cache: str
    tries: int

    @property
    def loss(self) -> float:
        return max((o.loss for o in self.outputs), default=0.0)

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget is None else self.loss <= self.budget

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["outputs"] = [o.to_dict() for o in self.outputs]
        d["loss"] = self.loss
        d["within_budget"] = self.within_budget
        return d


class _Reader:
    """onnxruntime's CalibrationDataReader over loaded samples."""

    def __init__(self, samples):
        self._samples = [s for _, s in samples]
        self._i = 0

    def get_next(self):
        if self._i >= len(self._samples):
            return None
        self._i += 1
        return self._samples[self._i - 1]

    def __len__(self) -> int:
        return len(self._samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._samples = self._samples[start_index:end_index]
        self._i = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("TVM_HYBRID_CACHE") or Path.home() / ".cache/tvm-hybrid") / "calibration"


def resolve_excludes(original: onnx.ModelProto, model: onnx.ModelProto, excludes) -> list[str]:
    """--exclude values (node names or op types of the user's model) -> names of nodes in the
    pre-processed ``model`` (where onnxruntime fused MatMul + Add into a Gemm named after the
    MatMul, that Gemm); unknown ones are a UsageError."""
    names = {n.name for n in model.graph.node}

    def now(name: str) -> list[str]:
        return [m for m in names if m == name or m.startswith(name + "/")]

    by_op: dict[str, list[str]] = {}
    for n in list(original.graph.node) + list(model.graph.node):
        by_op.setdefault(n.op_type, []).append(n.name)
    known = {n.name for n in original.graph.node} | names
    out: list[str] = []
    for x in excludes:
        if x in by_op:
            out += [m for name in by_op[x] for m in now(name)]
        elif x in known:
            found = now(x)
            if not found:
                log.warning("--exclude %s: onnxruntime's pre-processing folded that node away", x)
            out += found
        else:
            import difflib

            close = difflib.get_close_matches(x, list(known) + list(by_op), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; its op types are {', '.join(sorted(by_op))}"
            raise UsageError(f"--exclude {x}: the model has no node or op type of that name{hint}")
    return sorted(set(out))


def quantize(model_path: str | Path, calibration: str | Path, output: str | Path, method: str = "minmax",
             per_channel: bool = True, exclude=(), budget: float | None = None, holdout: float = 0.2,
             cache: str | Path | None = None, op_types=COMPUTE_OPS) -> Report:  # fmt: skip
    """Quantize ``model_path`` into a QDQ model at ``output`` (written atomically); the report.
    ``op_types``: the op types to quantize, or "all" (every one onnxruntime can)."""
    onnxruntime()  # a missing one is a line saying how to install it
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise UsageError(f"bad --method {method!r}: one of {', '.join(METHODS)}")
    model_path, output = Path(model_path), Path(output)
    data, model = read_model(model_path)
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise UsageError(f"{model_path} has ops outside the standard ONNX domain; quantize takes standard ONNX models")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in model.graph.node):
        raise UsageError(f"{model_path} is already quantized (it has QuantizeLinear/DequantizeLinear nodes)")
    original = named(_opset_13(model))
    model = named(_preprocess(original))
    samples = load_samples(calibration, model_inputs(model))
    calib, held, held_is_calib = split(samples, holdout)
    excluded = resolve_excludes(original, model, exclude)
    if held_is_calib:
        log.warning("%d calibration sample(s): the accuracy report is on the calibration samples themselves "
                    "(give 5 or more to hold some out)", len(samples))  # fmt: skip

    key = hashlib.sha256()
    key.update(model.SerializeToString())
    for name, _ in calib:
        key.update(name.encode() + sha256_file(Path(calibration) / name).encode())
    key.update(method.encode() + ",".join(op_types).encode())
    cache_path = Path(cache) if cache else default_cache_dir() / f"{key.hexdigest()[:24]}-{method}.json"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]  # fmt: skip
    fp32_outputs = run(model, held)
    everything = _op_types_to_quantize()
    if op_types == "all":
        op_types = everything
    else:
        bad = sorted(set(op_types) - set(everything))
        if bad:
            raise UsageError(f"--op-types {', '.join(bad)}: onnxruntime cannot quantize that; it can: {', '.join(everything)}")
        op_types = sorted(op_types)

    def build(keep: list[str], only: list[str] | None = None) -> tuple[onnx.ModelProto, list[OutputReport]]:
        with tempfile.TemporaryDirectory(prefix="tvm-hybrid-quant.") as tmp:
            out = Path(tmp) / "q.onnx"
            try:
                with _ort_logs_to_debug():
                    quantize_static(copy(model), out, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                                    nodes_to_quantize=only, calibrate_method=calibrate_method,
                                    op_types_to_quantize=op_types, calibration_cache_path=cache_path)  # fmt: skip
            except ValueError as e:  # a cache of another method or a corrupt one: recalibrate
                if not cache_path.exists():
                    raise
                log.warning("calibration cache %s unusable (%s); recalibrating", cache_path, one_line(e))
                cache_path.unlink()
                return build(keep, only)
            q = onnx.load(str(out))
        return q, compare(model, fp32_outputs, run(q, held))

    q, outputs = build(excluded)
    tries, kept = 1, list(excluded)
    if budget is not None and loss(outputs) > budget:
        candidates = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in excluded]
        if len(candidates) <= _TRIAL_LIMIT:
            # each layer quantized alone: the loss it causes by itself
            alone = {n: loss(build([], only=[n])[1]) for n in candidates}
            tries += len(candidates)
            ranked = sorted(candidates, key=lambda n: -alone[n])
        else:
            ranked = [n for n in sensitivity(model, q, held, op_types) if n not in excluded]
        results: dict[int, tuple] = {}

        def keep_top(k: int):
            nonlocal tries
            if k not in results:
                results[k] = build(sorted(set(excluded) | set(ranked[:k])))
                tries += 1
                log.info("%d layer(s) kept fp32: loss %.4f%%", k, 100 * loss(results[k][1]))
            return results[k]

        lo, hi = 0, 1  # doubling to the first k that fits, then bisecting below it
        while hi < len(ranked) and loss(keep_top(hi)[1]) > budget:
            lo, hi = hi, min(2 * hi, len(ranked))
        hi = min(hi, len(ranked))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if loss(keep_top(mid)[1]) <= budget:
                hi = mid
            else:
                lo = mid
        q, outputs = keep_top(hi)
        kept = sorted(set(excluded) | set(ranked[:hi]))
    write_atomic(q, output)
    dq = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sum(1 for n in q.graph.node if n.op_type in _COMPUTE_OPS and any(i in dq for i in n.input))
    return Report(
        model=str(model_path), output=str(output), method=method, per_channel=per_channel,
        calibration_samples=len(calib), heldout_samples=len(held), heldout_is_calibration=held_is_calib,
        fp32_bytes=len(data), int8_bytes=output.stat().st_size, quantized_nodes=quantized, kept_fp32=kept,
        outputs=outputs, budget=budget, calibration_cache=str(cache_path), tries=tries,
    )  # fmt: skip


def _opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """Per-channel DequantizeLinear (its ``axis``) needs opset 13: older models are converted."""
    from onnx import version_converter

    if opset(model) >= 13:
        return model
    try:
        return version_converter.convert_version(model, 13)
    except Exception as e:
        raise UsageError(f"cannot convert the model from opset {opset} to 13, which int8 QDQ needs: {one_line(e)}") from e


def _preprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's pre-quantization pass: shape inference and its graph optimizations (batch
    norms folded into convs, constant subgraphs folded), so weights and biases are initializers."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-quant.") as tmp, _ort_logs_to_debug(), _cwd(tmp):
        src, out = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(model.SerializeToString())
        try:
            quant_pre_process(src, out)
        except Exception as e:  # its symbolic shape inference gives up on some graphs: optimize without it
            log.debug("quant_pre_process: %s; retrying without symbolic shape inference", one_line(e))
            quant_pre_process(src, out, skip_symbolic_shape=True)
        return onnx.load(str(out))


@contextlib.contextmanager
def _cwd(path):
    """Run in ``path``: onnxruntime's symbolic shape inference, when it gives up, saves the model
    it got so far as sym_shape_infer_temp.onnx (and its weights as a <uuid>.data file) in the
    current directory — the user's, or the checkout, which got a 69 MB one committed."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("onnxruntime.quantization: %s", record.getMessage())


@contextlib.contextmanager
def _ort_logs_to_debug():
    """onnxruntime's quantization tools log advice and warnings on the root logger; ours are the
    report's, so theirs go to --verbose only."""
    root = logging.getLogger()
    handler, level = _ToDebug(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _op_types_to_quantize() -> list[str]:
    """What quantize_static quantizes by default (it passes the same list when given none)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def sensitivity(model: onnx.ModelProto, qmodel: onnx.ModelProto, samples, op_types) -> list[str]:
    """The nodes of ``model`` that quantizing touches (``op_types``), most sensitive first: the
    relative error quantizing adds at a node's output over the worst error already on its
    inputs, on ``samples``."""
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    tensors = sorted({t for n in model.graph.node for t in n.output if t})
    qtensors = {t for n in qmodel.graph.node for t in n.output}
    tensors = [t for t in tensors if t in qtensors]
    f = run(model, samples[:4], tensors)
    q = run(qmodel, samples[:4], tensors)
    err = {}
    for t in tensors:
        a = np.concatenate([r[t].astype(np.float64).ravel() for r in f])
        b = np.concatenate([r[t].astype(np.float64).ravel() for r in q])
        na = np.linalg.norm(a)
        err[t] = float(np.linalg.norm(a - b) / na) if na > 0 else 0.0
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def out_err(n, depth=0) -> float | None:
        # a tensor quantizing removed (a Relu folded into the Q before it): the one it became
        found = [err[t] for t in n.output if t in err]
        if found or depth > 3:
            return max(found, default=None)
        users = [u for t in n.output for u in consumers.get(t, ())]
        return out_err(users[0], depth + 1) if len(users) == 1 else None

    added = {}
    for n in nodes:
        out = [e for e in [out_err(n)] if e is not None]
        if not out:
            continue
        before = max((err.get(t, 0.0) for t in n.input), default=0.0)
        added[n.name] = max(out) - before
    return sorted(added, key=lambda k: -added[k])
