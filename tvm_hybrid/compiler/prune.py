"""Magnitude pruning: zero the weakest weights, or remove whole channels, checked against fp32.

Unstructured (default): in every Conv, MatMul and Gemm with a constant weight, the fraction
``sparsity`` of weights with the smallest magnitude (per layer) becomes zero. The model keeps
its shapes; it compresses better, and sparse engines can skip the zeros.

Structured (``structured="channels"``): whole output channels of a convolution go, chosen by the
L1 norm of their filters, where the channels can be followed to the convolutions that read
them: through per-channel ops (activations, BatchNormalization, Add/Mul/Sub/Div by per-channel
constants, binary ops of two tensors of the same channels, depthwise convolutions, pooling) into
convolutions, whose input channels are removed with them. A channel that reaches anything else
(a residual Add with another branch, a Concat, a Reshape, a graph output, a Mul by another
branch's gate) keeps its group whole. The result is a smaller, faster dense model.

With ``budget``, the sparsity is lowered (bisection over [0, sparsity]) to the highest that keeps
the accuracy loss (``samples.loss``) within it.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import UsageError
from .onnx_graph import attr as _attr
from .samples import (OutputReport, compare, copy, load_samples, loss, model_inputs, named, onnxruntime, read_model,
                      run, session, split, write_atomic)  # fmt: skip

log = logging.getLogger(__name__)

_WEIGHTED = ("Conv", "MatMul", "Gemm")
_MIN_ELEMENTS = 256  # smaller weights (biases, tiny heads) are left alone
_UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Identity", "Elu", "Selu",
          "Softplus", "Mish", "Gelu", "MaxPool", "AveragePool", "Dropout", "Neg", "Abs", "Sqrt", "Exp"}  # fmt: skip
_BINARY = {"Add", "Mul", "Sub", "Div", "Max", "Min", "Pow"}


@dataclasses.dataclass
class Stats:
    params: int
    nonzero: int
    file_bytes: int
    gzip_bytes: int
    gflops: float
    ms: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    model: str
    output: str
    structured: str | None
    sparsity_asked: float
    sparsity: float
    pruned_layers: int
    channels_removed: int
    before: Stats
    after: Stats
    outputs: list[OutputReport]
    budget: float | None
    heldout_samples: int
    heldout_is_calibration: bool

    @property
    def loss(self) -> float:
        return loss(self.outputs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(before=self.before.to_dict(), after=self.after.to_dict(), outputs=[o.to_dict() for o in self.outputs],
                 loss=self.loss, within_budget=None if self.budget is None else self.loss <= self.budget)  # fmt: skip
        return d


def prune(model_path: str | Path, calibration: str | Path, output: str | Path, sparsity: float,
          structured: str | None = None, budget: float | None = None, holdout: float = 0.2) -> Report:  # fmt: skip
    """Prune ``model_path`` into ``output`` (written atomically); the report against fp32."""
    if not 0 < sparsity < 1:
        raise UsageError(f"bad --sparsity {sparsity}: a fraction above 0 and below 1, e.g. 0.5")
    if structured not in (None, "channels"):
        raise UsageError(f"bad --structured {structured!r}: channels")
    onnxruntime()  # a missing one is a line saying how to install it
    model_path, output = Path(model_path), Path(output)
    data, model = read_model(model_path)
    model = named(_constants_as_initializers(model))
    samples = load_samples(calibration, model_inputs(model))
    _, held, held_is_calib = split(samples, holdout)
    ref = run(model, held)
    make = _channels if structured else _magnitude

    def attempt(s: float):
        m, layers, removed = make(model, s)
        return m, layers, removed, compare(model, ref, run(m, held))

    best = attempt(sparsity)
    used = sparsity
    if budget is not None and loss(best[3]) > budget:
        lo, hi, found = 0.0, sparsity, None
        for _ in range(7):  # sparsity to within sparsity / 128
            mid = (lo + hi) / 2
            cand = attempt(mid)
            log.info("sparsity %.3f: loss %.4f%%", mid, 100 * loss(cand[3]))
            if loss(cand[3]) <= budget:
                lo, found = mid, cand
            else:
                hi = mid
        if found is None:
            raise UsageError(f"no sparsity keeps the accuracy loss within {100 * budget:g}% "
                             f"(at {100 * hi:.2f}%: {100 * loss(attempt(hi)[3]):.3f}%)")  # fmt: skip
        best, used = found, lo
    pruned, layers, removed, outputs = best
    if structured and removed == 0:
        raise UsageError("no convolution's channels can be followed to the convolutions that read them "
                         "(residual adds, concats or reshapes take every one); prune without --structured")  # fmt: skip
    write_atomic(pruned, output)
    feeds = held[0][1]
    return Report(
        model=str(model_path), output=str(output), structured=structured, sparsity_asked=sparsity, sparsity=used,
        pruned_layers=layers, channels_removed=removed, before=_stats(model, len(data), feeds),
        after=_stats(pruned, output.stat().st_size, feeds), outputs=outputs, budget=budget,
        heldout_samples=len(held), heldout_is_calibration=held_is_calib,
    )  # fmt: skip


def _constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights exported as Constant nodes (Paddle's exporter does), and constants reshaped in the
    graph, become initializers."""
    m = copy(model)
    keep = []
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
        elif n.op_type == "Reshape" and len(n.input) == 2 and all(i in inits for i in n.input):
            # a bias reshaped to [1, C, 1, 1] in the graph: the reshaped constant
            x, shape = (numpy_helper.to_array(inits[i]) for i in n.input)
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            t = numpy_helper.from_array(x.reshape(shape), n.output[0])
        else:
            keep.append(n)
            continue
        m.graph.initializer.append(t)
        inits[t.name] = t
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


# -- unstructured ------------------------------------------------------------------------------


def _weight_inits(model: onnx.ModelProto):
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in _WEIGHTED and len(n.input) > 1 and n.input[1] in inits:
            t = inits[n.input[1]]
            if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= _MIN_ELEMENTS:
                yield n, t


def _magnitude(model: onnx.ModelProto, sparsity: float) -> tuple[onnx.ModelProto, int, int]:
    m = copy(model)
    done = set()
    for _, t in _weight_inits(m):
        if t.name in done:
            continue
        w = numpy_helper.to_array(t).copy()
        k = int(sparsity * w.size)
        if k:
            cut = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
            w[np.abs(w) <= cut] = 0
        t.CopyFrom(numpy_helper.from_array(w, t.name))
        done.add(t.name)
    return m, len(done), 0


# -- structured: channels ----------------------------------------------------------------------


def _channels(model: onnx.ModelProto, sparsity: float) -> tuple[onnx.ModelProto, int, int]:
    m = copy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    new_inits: dict[str, np.ndarray] = {}
    value = lambda name: new_inits[name] if name in new_inits else numpy_helper.to_array(inits[name])  # noqa: E731
    shared = {name for name, users in consumers.items() if name in inits and len(users) > 1}
    layers = removed = 0
    claimed: set[str] = set()  # nodes already changed by a group
    for conv in list(g.node):
        if conv.op_type != "Conv" or _attr(conv, "group", 1) != 1 or len(conv.input) < 2:
            continue
        w_name = conv.input[1]
        if w_name not in inits or w_name in shared or conv.name in claimed:
            continue
        w = value(w_name)
        c = w.shape[0]
        group = _follow(conv, c, consumers, inits, outputs, shared, producer)
        if group is None or any(n.name in claimed for n, _ in group):
            continue
        drop = int(sparsity * c)
        if drop == 0 or drop >= c:
            continue
        keep = np.sort(np.argsort(-np.abs(w).reshape(c, -1).sum(1))[: c - drop])
        new_inits[w_name] = w[keep]
        if len(conv.input) > 2 and conv.input[2]:
            new_inits[conv.input[2]] = value(conv.input[2])[keep]
        for node, role in group:
            _slice_node(node, role, keep, c, value, new_inits)
            claimed.add(node.name)
        claimed.add(conv.name)
        layers += 1
        removed += drop
    for t in g.initializer:
        if t.name in new_inits:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new_inits[t.name]), t.name))
    del g.value_info[:]
    return shape_inference.infer_shapes(m), layers, removed


def _per_channel(arr: np.ndarray, c: int) -> bool:
    """A constant that broadcasts per channel over an NCHW tensor of ``c`` channels ([c,1,1], [1,c,1,1])
    or is a scalar."""
    if arr.size == 1:
        return True
    s = arr.shape
    return len(s) >= 3 and s[-3] == c and int(np.prod(s)) == c


def _writer_chain(t: str, c: int, producer, consumers, inits, shared):
    """A tensor of ``c`` channels made by a conv through per-channel unary ops, used only on that
    path (a squeeze-excite gate: conv -> HardSigmoid): [(node, role)], the conv a "writer"."""
    chain = []
    while True:
        n = producer.get(t)
        if n is None or len(consumers.get(t, [])) != 1:
            return None
        if n.op_type == "Conv":
            if _attr(n, "group", 1) != 1 or len(n.input) < 2 or n.input[1] not in inits or n.input[1] in shared:
                return None
            if numpy_helper.to_array(inits[n.input[1]]).shape[0] != c:
                return None
            return chain + [(n, "writer")]
        if n.op_type not in _UNARY or any(i in inits and numpy_helper.to_array(inits[i]).size != 1
                                          for i in n.input[1:] if i):  # fmt: skip
            return None
        chain.append((n, "through"))
        t = n.input[0]


def _follow(conv, c: int, consumers, inits, outputs, shared, producer):
    """The nodes a conv's output channels reach, with their role, or None when a channel escapes."""
    group: list[tuple] = []
    seen: set[str] = set()
    stack = [conv.output[0]]
    tensors = {conv.output[0]}
    while stack:
        t = stack.pop()
        if t in outputs:
            return None
        for n in consumers.get(t, []):
            if n.name in seen:
                continue
            role = None
            if n.op_type == "Conv":
                if len(n.input) < 2 or n.input[1] not in inits or n.input[1] in shared:
                    return None
                if n.input[0] != t:
                    return None
                groups = _attr(n, "group", 1)
                if groups == 1:
                    role = "reader"
                elif groups == c and numpy_helper.to_array(inits[n.input[1]]).shape[1] == 1:
                    role = "depthwise"
                else:
                    return None
            elif n.op_type in _UNARY or n.op_type == "GlobalAveragePool":
                if any(i in inits and not _per_channel(numpy_helper.to_array(inits[i]), c) and
                       numpy_helper.to_array(inits[i]).size != 1 for i in n.input[1:] if i):  # fmt: skip
                    return None
                role = "through"
            elif n.op_type == "BatchNormalization":
                if any(i not in inits or i in shared for i in n.input[1:5]):
                    return None
                role = "bn"
            elif n.op_type in _BINARY:
                others = [i for i in n.input if i != t]
                ok = True
                for o in others:
                    if o in inits:
                        ok = ok and o not in shared and _per_channel(numpy_helper.to_array(inits[o]), c)
                    elif o not in tensors:  # a gate computed on the side (squeeze-excite): its conv too
                        chain = _writer_chain(o, c, producer, consumers, inits, shared)
                        if chain is not None:  # else it must turn out to carry the channels (checked below)
                            for cn, crole in chain:
                                if cn.name not in seen:
                                    seen.add(cn.name)
                                    group.append((cn, crole))
                                    tensors.update(x for x in cn.output if x)
                if not ok:
                    return None
                role = "binary"
            else:
                return None
            seen.add(n.name)
            group.append((n, role))
            if role != "reader":
                for o in n.output:
                    if o and o not in tensors:
                        tensors.add(o)
                        stack.append(o)
    # a binary op reached through one operand must have its other operand in the group by now
    for n, role in group:
        if role == "binary" and any(i not in tensors and i not in inits for i in n.input):
            return None
    return group if any(role == "reader" for _, role in group) else None


def _slice_node(node, role, keep, c, value, new_inits) -> None:
    if role == "reader":
        new_inits[node.input[1]] = value(node.input[1])[:, keep]
    elif role == "writer":
        new_inits[node.input[1]] = value(node.input[1])[keep]
        if len(node.input) > 2 and node.input[2]:
            new_inits[node.input[2]] = value(node.input[2])[keep]
    elif role == "depthwise":
        new_inits[node.input[1]] = value(node.input[1])[keep]
        if len(node.input) > 2 and node.input[2]:
            new_inits[node.input[2]] = value(node.input[2])[keep]
        for a in node.attribute:
            if a.name == "group":
                a.i = len(keep)
    elif role == "bn":
        for i in node.input[1:5]:
            new_inits[i] = value(i)[keep]
    elif role in ("binary", "through"):
        for i in node.input:
            if i in new_inits or _is_init(i, value):
                arr = value(i)
                if arr.size > 1 and arr.ndim >= 3 and arr.shape[-3] == c:
                    new_inits[i] = np.take(arr, keep, axis=arr.ndim - 3)


def _is_init(name: str, value) -> bool:
    try:
        value(name)
        return True
    except KeyError:
        return False


# -- report ------------------------------------------------------------------------------------


def _stats(model: onnx.ModelProto, file_bytes: int, feeds: dict) -> Stats:
    from . import analysis, importer

    ws = [numpy_helper.to_array(t) for _, t in _weight_inits(model)]
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    nonzero = params - sum(int((w == 0).sum()) for w in ws)
    overrides = [importer.InputOverride(k, tuple(v.shape)) for k, v in feeds.items()]
    flops = sum(i.flops for i in analysis.analyze(importer.prepare(model, overrides)))
    sess = session(model)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return Stats(params=params, nonzero=nonzero, file_bytes=file_bytes,
                 gzip_bytes=len(gzip.compress(model.SerializeToString(), 6)), gflops=round(flops / 1e9, 4),
                 ms=round(statistics.median(times), 3))  # fmt: skip
