"""Calibration samples and accuracy against fp32: what `quantize` and `prune` share.

Samples are a directory of ``.npz`` files, one a sample, keyed by the model's input names,
checked against the model (names, ranks, fixed dimensions, dtypes; one line and exit 2 when
wrong). Accuracy is onnxruntime's outputs of a changed model against the fp32 model's on
held-out samples: per output max and mean abs error, cosine similarity, relative L2 error, and
top-1 agreement for classifier outputs (those a Softmax/LogSoftmax produces). The loss of an
output is its top-1 disagreement for a classifier output, else its relative L2 error; a model's
is the worst of its outputs'.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import UsageError, one_line
from .importer import node_name

#: Ops whose outputs are class scores: top-1 agreement is their accuracy.
_CLASSIFIER_OPS = {"Softmax", "LogSoftmax"}


@dataclasses.dataclass
class OutputReport:
    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    rel_l2: float
    top1: float | None  # agreement, for classifier outputs

    @property
    def loss(self) -> float:
        return 1.0 - self.top1 if self.top1 is not None else self.rel_l2

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loss": self.loss}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints, None where dynamic
    dtype: np.dtype


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def load_samples(directory: str | Path, inputs: list[InputSpec]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Every ``*.npz`` in ``directory`` (sorted by name), checked against the model's inputs."""
    d = Path(directory)
    if not d.is_dir():
        raise UsageError(f"calibration directory {d} does not exist or is not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix == ".npz")
    if not files:
        raise UsageError(f"calibration directory {d} holds no .npz files (one per sample, keyed by input name: "
                         f"{', '.join(i.name for i in inputs)})")  # fmt: skip
    want = {i.name: i for i in inputs}
    samples = []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise UsageError(f"calibration sample {f} is not a readable .npz: {one_line(e)}") from e
        missing = sorted(set(want) - set(arrays))
        extra = sorted(set(arrays) - set(want))
        if missing or extra:
            what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                         f"unknown {', '.join(extra)}" if extra else "") if x)  # fmt: skip
            raise UsageError(f"calibration sample {f.name}: {what} (the model's inputs are {', '.join(want)})")
        for name, a in arrays.items():
            spec = want[name]
            if a.dtype != spec.dtype:
                raise UsageError(f"calibration sample {f.name}: input {name} is {a.dtype}, the model takes {spec.dtype}")
            if a.ndim != len(spec.shape) or any(s is not None and s != n for s, n in zip(spec.shape, a.shape)):
                shown = "x".join("?" if s is None else str(s) for s in spec.shape)
                raise UsageError(f"calibration sample {f.name}: input {name} has shape "
                                 f"{'x'.join(map(str, a.shape))}, the model takes {shown}")  # fmt: skip
        samples.append((f.name, arrays))
    return samples


def split(samples: list, holdout: float) -> tuple[list, list, bool]:
    """(calibration, held-out, held-out is the calibration set): every k-th sample is held out
    for a fraction ``holdout``; with fewer than 5 samples, or ``holdout`` 0, all calibrate and the
    report is on them (said in the report)."""
    if holdout <= 0 or len(samples) < 5:
        return samples, samples, True
    k = max(2, round(1 / holdout))
    held = [s for i, s in enumerate(samples) if i % k == k - 1]
    calib = [s for i, s in enumerate(samples) if i % k != k - 1]
    return calib, held, False


def parse_budget(text: str | None) -> float | None:
    """'1%' or '0.01' -> 0.01."""
    if text is None:
        return None
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"bad --accuracy-budget {text!r}: give a percentage (1%) or a fraction (0.01)") from None
    if not 0 <= value < 1:
        raise UsageError(f"bad --accuracy-budget {text!r}: it must be at least 0 and under 100%")
    return value


def write_atomic(model: onnx.ModelProto, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        # mkstemp makes the file private; the model is meant to be shared like any file written
        # with open() (0o666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def onnxruntime():
    """The onnxruntime module, or a UsageError saying how to install it (quantize and prune use it)."""
    try:
        import onnxruntime as ort
        import onnxruntime.quantization  # noqa: F401
    except ImportError as e:
        raise UsageError(f"quantize and prune need onnxruntime ({one_line(e)}); "
                         "install it: pip install 'tvm-hybrid[quantize]'") from e
    return ort


def session(model: onnx.ModelProto, extra_outputs=()):
    ort = onnxruntime()

    if extra_outputs:
        m = copy(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in extra_outputs if t not in have)
        model = m
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, samples, extra_outputs=()) -> list[dict[str, np.ndarray]]:
    sess = session(model, extra_outputs)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, s))) for _, s in samples]


def compare(model: onnx.ModelProto, ref: list[dict], got: list[dict]) -> list[OutputReport]:
    """Per graph output of ``model``: errors of ``got`` against ``ref`` over all samples."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def source_op(name: str) -> str | None:  # through the ops that only relabel a tensor
        n = producer.get(name)
        while n is not None and n.op_type in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            n = producer.get(n.input[0])
        return n.op_type if n is not None else None

    reports = []
    for out in model.graph.output:
        f = np.concatenate([r[out.name].astype(np.float64).ravel() for r in ref])
        q = np.concatenate([g[out.name].astype(np.float64).ravel() for g in got])
        diff = np.abs(q - f)
        nf, nq = np.linalg.norm(f), np.linalg.norm(q)
        cosine = float(f @ q / (nf * nq)) if nf > 0 and nq > 0 else float(nf == nq)
        rel = float(np.linalg.norm(q - f) / nf) if nf > 0 else float(np.linalg.norm(q))
        top1 = None
        if source_op(out.name) in _CLASSIFIER_OPS and ref[0][out.name].ndim >= 2:
            agree = [np.argmax(r[out.name], -1) == np.argmax(g[out.name], -1) for r, g in zip(ref, got)]
            top1 = float(np.mean(np.concatenate([a.ravel() for a in agree])))
        reports.append(OutputReport(out.name, float(diff.max(initial=0)), float(diff.mean()) if diff.size else 0.0,
                                    cosine, rel, top1))  # fmt: skip
    return reports


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """quantize_static may turn a given model's weights into external data in place: it gets a copy."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m

def loss(outputs: list[OutputReport]) -> float:
    """A model's accuracy loss: its worst output's."""
    return max((o.loss for o in outputs), default=0.0)


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every node has a (unique) name, so nodes can be excluded and reported by name."""
    m = copy(model)
    seen = set()
    for i, n in enumerate(m.graph.node):
        if not n.name or n.name in seen:
            n.name = node_name(n, i) if not n.name else f"{n.name}_{i}"
        seen.add(n.name)
    return m


def read_model(path: Path) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes and the checked model (UsageError, one line, when unreadable or invalid)."""
    from .importer import parse

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read model {path}: {e.strerror or e}") from e
    return data, parse(data, str(path))

