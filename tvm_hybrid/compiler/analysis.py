"""Per-node facts of an imported model: FLOPs, parameter and activation bytes, predicted time."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..targets import TargetProfile
from . import backends
from .importer import ImportedModel, node_name, subgraph_reads, supported_op_types

# Ops whose cost is a few operations per output element rather than one.
_TRANSCENDENTAL = {"Softmax": 5, "LogSoftmax": 5, "Erf": 8, "Gelu": 10, "Sigmoid": 4, "Tanh": 6, "Exp": 4,
                   "HardSwish": 3, "HardSigmoid": 2, "LayerNormalization": 8, "BatchNormalization": 2,
                   "InstanceNormalization": 8, "Resize": 4}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    flops: int
    param_bytes: int
    activation_bytes: int
    supported: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def analyze(imported: ImportedModel, profile: TargetProfile | None = None) -> list[NodeInfo]:
    """FLOPs and bytes per node, and whether the profile's backend can run it (without a profile:
    whether TVM's frontend converts it)."""
    model = imported.model
    g = model.graph
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = (tuple(max(d.dim_value, 0) for d in tt.shape.dim), tt.elem_type)
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        shapes[t.name] = (tuple(t.dims), t.data_type)
    rejected = set()
    keeps_int8 = True
    if profile is not None:
        backend = backends.for_profile(profile)
        keeps_int8 = backend.keeps_int8_weights
        rejected = {r.node for r in backend.rejected_nodes(backend.prepare(imported, profile), profile)}
    else:
        supported = supported_op_types()
    infos = []
    for i, node in enumerate(g.node):
        outs = [o for o in node.output if o]
        ins = list(dict.fromkeys([*(x for x in node.input if x), *subgraph_reads(node)]))  # branches read too
        pbytes = sum(_nbytes(*shapes[x]) for x in ins if x in inits and x in shapes)
        abytes = sum(_nbytes(*shapes[o]) for o in outs if o in shapes)
        if dequantizes_initializer(node, inits):
            # A quantized weight: never a tensor of its own on the device. A backend that keeps
            # it int8 (rewrites.int8_weights) stores it at its size; others fold it to fp32.
            abytes = 0
            if not keeps_int8:
                pbytes = sum(_nbytes(*shapes[o]) for o in outs if o in shapes)
        name = node_name(node, i)
        ok = name not in rejected if profile is not None else node.op_type in supported
        infos.append(
            NodeInfo(
                name=name,
                op_type=node.op_type,
                inputs=ins,
                outputs=outs,
                flops=_flops(node, shapes),
                param_bytes=pbytes,
                activation_bytes=abytes,
                supported=ok,
            )
        )
    return infos


def dequantizes_initializer(node: onnx.NodeProto, inits) -> bool:
    """A DequantizeLinear of a constant: a quantized weight, which kernels read (int8, or folded
    to fp32 by the backend) and never hold as a tensor of its own."""
    return node.op_type == "DequantizeLinear" and bool(node.input) and node.input[0] in inits


def _nbytes(shape: tuple[int, ...], elem_type: int) -> int:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:
        itemsize = 4
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _flops(node: onnx.NodeProto, shapes) -> int:
    def shp(name):
        return shapes.get(name, ((), 0))[0]

    out = shp(node.output[0]) if node.output else ()
    out_elems = int(np.prod(out, dtype=np.int64)) if out else 0
    op = node.op_type
    if op == "Conv" and len(node.input) > 1:
        w = shp(node.input[1])
        if len(w) >= 3:
            return 2 * out_elems * int(np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose" and len(node.input) > 1:
        w, x = shp(node.input[1]), shp(node.input[0])
        if len(w) >= 3 and x:
            return 2 * int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op in ("MatMul", "Gemm") and len(node.input) > 1:
        a = shp(node.input[0])
        if a:
            k = a[0] if op == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute) else a[-1]
            return 2 * out_elems * k
    if op in ("LSTM", "GRU", "RNN") and len(node.input) > 2:
        w, r = shp(node.input[1]), shp(node.input[2])  # [dirs, G*h, in], [dirs, G*h, h]
        x = shp(node.input[0])
        if len(w) == 3 and len(r) == 3 and len(x) == 3:
            steps = x[0] * x[1]  # seq * batch, either layout
            return 2 * steps * w[0] * w[1] * (w[2] + r[2]) + 8 * steps * w[0] * w[1]  # matmuls, gates
    return out_elems * _TRANSCENDENTAL.get(op, 1)


def tensor_bytes(imported: ImportedModel) -> dict[str, int]:
    """Size in bytes of every tensor with a static shape (inputs, intermediates, outputs)."""
    g = imported.model.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = _nbytes(tuple(max(d.dim_value, 0) for d in tt.shape.dim), tt.elem_type)
    return out


def predicted_ms(flops: int, bytes_moved: int, profile: TargetProfile) -> float:
    """Roofline time: the slower of compute at peak and memory traffic at peak bandwidth."""
    gflops = float(profile.capacity.get("peak_gflops", 1.0))
    gbps = float(profile.capacity.get("bandwidth_gbps", 1.0))
    return max(flops / (gflops * 1e9), bytes_moved / (gbps * 1e9)) * 1e3
