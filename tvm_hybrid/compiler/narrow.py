"""Narrow types at import: float8, float4, E8M0, int4 and int2 tensors carried in bytes.

TVM's ONNX frontend and kernels know none of ONNX's narrow types. Before anything else sees the
model, every tensor of such a type becomes its carrier (``tvm_hybrid.dtypes``: the float formats'
bit patterns in uint8, the integers' values in int8/uint8): initializers and constants are
re-encoded, graph inputs and outputs retyped (the model keeps its own types at its boundary, where
the runtime converts), and the nodes that give the types a meaning become standard ops on carriers:

- Cast / CastLike from a narrow float: a lookup in the format's 256 (or 16) values.
- Cast to a narrow float: round to nearest even on the format's grid, with no bit casts: the
  exponent by a binary search over the format's powers of two, the significand as
  Round(|x| / 2^(e-M)), the code an affine function of both (subnormals and the carry into the
  next binade included). Overflow saturates, or becomes inf / NaN, as ``saturate`` says; NaN and
  the sign (-0 too; the fnuz formats have no -0) are encoded as ml_dtypes encodes them, which is
  what ONNX's own tests expect. E8M0 rounds its exponent up, down or to nearest (``round_mode``).
- Cast to a narrow integer: truncation toward zero, then wrap-around (ml_dtypes' conversion).
- QuantizeLinear / DequantizeLinear with narrow types, and blocked ones (``block_size``, which
  TVM's frontend refuses), as the arithmetic ONNX defines for them.

Data movement (Reshape, Transpose, Concat, Gather, Where, …) works on the carriers unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..dtypes import NARROW, np_dtype, to_carrier
from ..errors import UnsupportedError
from .legalize import Ctx
from .onnx_graph import attr as _attr
from .onnx_graph import replace_nodes


@dataclasses.dataclass(frozen=True)
class _Float:
    """A narrow float format: M significand bits, its bias, the largest exponent, the largest
    finite code, NaN's and infinity's codes (None: none), whether -0 exists, the sign bit."""

    m: int
    bias: int
    emax: int
    maxcode: int
    nan: int
    inf: int | None
    fnuz: bool
    sign: int = 0x80
    saturates: bool = False  # no inf or NaN to overflow into: overflow always saturates


FLOATS = {
    "float8_e4m3fn": _Float(3, 7, 8, 0x7E, 0x7F, None, False),
    "float8_e4m3fnuz": _Float(3, 8, 7, 0x7F, 0x80, None, True),
    "float8_e5m2": _Float(2, 15, 15, 0x7B, 0x7E, 0x7C, False),
    "float8_e5m2fnuz": _Float(2, 16, 15, 0x7F, 0x80, None, True),
    "float4_e2m1fn": _Float(1, 1, 2, 0x7, 0x8, None, False, sign=0x8, saturates=True),
}
E8M0 = "float8_e8m0fnu"
#: narrow integer -> (lowest, highest)
INTS = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def narrow_name(elem_type: int) -> str | None:
    """The narrow dtype name of an ONNX element type, or None for the others."""
    try:
        name = str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    except Exception:
        return None
    return name if name in NARROW else None


def _carrier_type(name: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(NARROW[name][0]))


def _carrier_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    name = narrow_name(t.data_type)
    return numpy_helper.from_array(to_carrier(numpy_helper.to_array(t), name), t.name)


class _Builder:
    """New nodes for one rewritten node, with fresh tensor names and constants (``legalize.Ctx``'s)."""

    def __init__(self, ctx: Ctx, hint: str):
        self.ctx, self.hint, self.nodes = ctx, hint, []

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.ctx.tmp(self.hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        return self.ctx.add_const(np.asarray(value, dtype=dtype), self.hint)


def _mentions_narrow(model: onnx.ModelProto) -> bool:
    g = model.graph
    if any(narrow_name(t.data_type) for t in g.initializer):
        return True
    if any(vi.type.HasField("tensor_type") and narrow_name(vi.type.tensor_type.elem_type)
           for vi in [*g.input, *g.value_info, *g.output]):  # fmt: skip
        return True
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and narrow_name(a.t.data_type):
                return True
            if a.name in ("to", "output_dtype") and a.type == onnx.AttributeProto.INT and narrow_name(a.i):
                return True
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and _attr(n, "block_size", 0):
            return True
    return False


def lower(model: onnx.ModelProto) -> dict[str, str] | None:
    """Rewrite ``model`` (shapes inferred) in place so no tensor has a narrow type; returns the
    narrow dtype of each graph input and output that had one (now typed as its carrier), or None
    when there was nothing to rewrite. The caller infers shapes again. UnsupportedError for what
    it cannot express."""
    if not _mentions_narrow(model):
        return None
    g = model.graph
    ctx = Ctx(model)  # (the types as inferred, before any is rewritten)
    for i, t in enumerate(g.initializer):
        if narrow_name(t.data_type):
            g.initializer[i].CopyFrom(_carrier_tensor(t))
    io: dict[str, str] = {}
    for vi in [*g.input, *g.output]:
        name = narrow_name(vi.type.tensor_type.elem_type) if vi.type.HasField("tensor_type") else None
        if name:
            io[vi.name] = name
            vi.type.tensor_type.elem_type = _carrier_type(name)
    out: list[onnx.NodeProto] = []
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and narrow_name(a.t.data_type):
                a.t.CopyFrom(_carrier_tensor(a.t))
        new = _rewrite(node, ctx)
        out.extend([node] if new is None else new)
    replace_nodes(g, out, ctx.new_inits)
    del g.value_info[:]
    return io


def _rewrite(node: onnx.NodeProto, g: Ctx) -> list[onnx.NodeProto] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    b = _Builder(g, node.output[0] if node.output else node.op_type)
    if node.op_type in ("Cast", "CastLike"):
        src = g.types.get(node.input[0])
        dst = _attr(node, "to") if node.op_type == "Cast" else g.types.get(node.input[1])
        if src is None or dst is None or not (narrow_name(src) or narrow_name(dst)):
            return None
        round_mode = _attr(node, "round_mode", b"up")
        _cast(b, node.input[0], src, dst, bool(_attr(node, "saturate", 1)), round_mode.decode(), node.output[0])
        return b.nodes
    if node.op_type == "QuantizeLinear":
        out_t = g.types.get(node.output[0])
        if not (narrow_name(out_t) or _attr(node, "block_size", 0)):
            return None
        _quantize(b, node, g, out_t)
        return b.nodes
    if node.op_type == "DequantizeLinear":
        if not (narrow_name(g.types.get(node.input[0])) or _attr(node, "block_size", 0)):
            return None
        _dequantize(b, node, g)
        return b.nodes
    return None


def _decode(b: _Builder, x: str, name: str) -> str:
    """float32 values of a narrow float's codes: a lookup in the format's table."""
    n = 16 if name == "float4_e2m1fn" else 256
    with np.errstate(all="ignore"):
        table = np.arange(n, dtype=np.uint8).view(np_dtype(name)).astype(np.float32)
    return b.op("Gather", [b.const(table), b.op("Cast", [x], to=TensorProto.INT32)], axis=0)


def _floor_log2(b: _Builder, a: str, lo: int, hi: int) -> str:
    """int32 index i with 2^(lo+i) <= a < 2^(lo+i+1), clamped to [0, hi-lo] (0 below 2^lo, and for
    NaN): a binary search over a table of the powers of two, padded with NaN (never <= a)."""
    n = 1 << (hi - lo).bit_length()
    table = b.const([2.0 ** (lo + k) if lo + k <= hi else np.nan for k in range(n)])
    i = None
    step = n // 2
    while step:
        cand = b.const(step, np.int32) if i is None else b.op("Add", [i, b.const(step, np.int32)])
        ge = b.op("GreaterOrEqual", [a, b.op("Gather", [table, cand], axis=0)])
        i = b.op("Where", [ge, cand, i if i is not None else b.const(0, np.int32)])
        step //= 2
    return i if i is not None else b.op("Cast", [b.op("Mul", [a, b.const(0.0)])], to=TensorProto.INT32)


def _negative(b: _Builder, x: str) -> str:
    """x < 0, -0 included (1 / -0 is -inf)."""
    zero = b.const(0.0)
    return b.op("Or", [b.op("Less", [x, zero]), b.op("Less", [b.op("Reciprocal", [x]), zero])])


def _encode_float(b: _Builder, x: str, f: _Float, saturate: bool, out: str) -> None:
    """uint8 codes of float32 ``x`` in format ``f``, rounded to nearest even."""
    lo = 1 - f.bias
    a = b.op("Abs", [x])
    i = _floor_log2(b, a, lo, f.emax)
    n = 1 << (f.emax - lo).bit_length()
    quantum = b.const([2.0 ** (lo + k - f.m) for k in range(n)])
    m = b.op("Round", [b.op("Div", [a, b.op("Gather", [quantum, i], axis=0)])])
    # code = (e + bias - 1) * 2^M + m with e = lo + i = 1 - bias + i; a carry into the next
    # binade (m = 2^(M+1)) and subnormals (i = 0, m < 2^M) come out right by themselves.
    code = b.op("Add", [b.op("Mul", [b.op("Cast", [i], to=TensorProto.FLOAT), b.const(2.0**f.m)]), m])
    over = b.op("Greater", [code, b.const(float(f.maxcode))])
    ovf = f.maxcode if saturate or f.saturates else (f.inf if f.inf is not None else f.nan)
    mag = b.op("Where", [over, b.const(float(ovf)), code])
    neg = _negative(b, x)
    if f.fnuz:  # no -0, and NaN (0x80) has no sign
        neg = b.op("And", [neg, b.op("Greater", [mag, b.const(0.0)])])
        neg = b.op("And", [neg, b.op("Less", [mag, b.const(float(f.nan))])])
    signed = b.op("Where", [neg, b.op("Add", [mag, b.const(float(f.sign))]), mag])
    res = b.op("Where", [b.op("IsNaN", [x]), b.const(float(f.nan)), signed])
    b.op("Cast", [res], out, to=TensorProto.UINT8)


def _encode_e8m0(b: _Builder, x: str, saturate: bool, round_mode: str, out: str) -> None:
    """uint8 codes of float32 ``x`` as E8M0 (a biased exponent; the sign is dropped), as ONNX's
    reference rounds it: ``up`` when any fraction is left, ``down``, or ``nearest`` (up from 1.5)."""
    if round_mode not in ("up", "down", "nearest"):
        raise UnsupportedError(f"Cast to float8e8m0: round_mode {round_mode!r} is not one of up, down, nearest")
    a = b.op("Abs", [x])
    normal = b.op("GreaterOrEqual", [a, b.const(2.0**-126)])
    i = _floor_log2(b, a, -126, 127)
    n = 1 << (127 + 126).bit_length()
    power = b.op("Gather", [b.const([2.0 ** (-126 + k) if k <= 253 else np.inf for k in range(n)]), i], axis=0)
    base = b.op("Where", [normal, b.op("Cast", [b.op("Add", [i, b.const(1, np.int32)])], to=TensorProto.FLOAT),
                          b.const(0.0)])  # fmt: skip
    if round_mode == "down":
        code = base
    else:
        if round_mode == "up":
            frac = b.op("Where", [normal, b.op("Greater", [a, power]), b.op("Greater", [a, b.const(0.0)])])
        else:
            frac = b.op("Where", [normal, b.op("GreaterOrEqual", [a, b.op("Mul", [power, b.const(1.5)])]),
                                  b.op("Greater", [a, b.const(2.0**-127)])])  # fmt: skip
        if saturate:
            frac = b.op("And", [frac, b.op("Less", [base, b.const(254.0)])])
        code = b.op("Add", [base, b.op("Cast", [frac], to=TensorProto.FLOAT)])
    special = b.op("Or", [b.op("IsNaN", [x]), b.op("IsInf", [x])])
    b.op("Cast", [b.op("Where", [special, b.const(255.0), code])], out, to=TensorProto.UINT8)


def _encode_int(b: _Builder, v: str, name: str, out: str) -> None:
    """A narrow integer's carrier from ``v``: truncated toward zero, then wrapped into range."""
    lo, hi = INTS[name]
    vi = b.op("Cast", [v], to=TensorProto.INT32)
    r = b.op("Add", [b.op("Mod", [b.op("Sub", [vi, b.const(lo, np.int32)]), b.const(hi - lo + 1, np.int32)]),
                     b.const(lo, np.int32)])  # fmt: skip
    b.op("Cast", [r], out, to=_carrier_type(name))


def _to_float(b: _Builder, v: str, v_type: int) -> str:
    return v if v_type == TensorProto.FLOAT else b.op("Cast", [v], to=TensorProto.FLOAT)


def _cast(b: _Builder, x: str, src: int, dst: int, saturate: bool, round_mode: str, out: str) -> None:
    s, d = narrow_name(src), narrow_name(dst)
    if s in FLOATS or s == E8M0:
        v, vt = _decode(b, x, s), TensorProto.FLOAT
    elif s in INTS:
        v, vt = x, _carrier_type(s)
    else:
        v, vt = x, src
    if d is None:
        b.op("Cast", [v], out, to=dst)
    elif d in FLOATS:
        _encode_float(b, _to_float(b, v, vt), FLOATS[d], saturate, out)
    elif d == E8M0:
        _encode_e8m0(b, _to_float(b, v, vt), saturate, round_mode, out)
    else:
        _encode_int(b, v, d, out)


def _param(b: _Builder, p: str, g: Ctx, x_shape: tuple, axis: int, block: int) -> str:
    """A scale or zero point made to broadcast against x: as is (per tensor), along ``axis``
    (per axis), or each value repeated ``block`` times along ``axis`` (blocked)."""
    ps = g.shapes.get(p)
    if ps is None:
        raise UnsupportedError(f"quantization parameter {p!r} has no static shape")
    if not ps or int(np.prod(ps)) == 1:
        return p
    rank = len(x_shape)
    if not block:
        dims = [1] * rank
        dims[axis] = ps[0]
        return b.op("Reshape", [p, b.const(dims, np.int64)])
    n = ps[axis]
    wide = list(ps)
    wide.insert(axis + 1, block)
    rep = b.op("Expand", [b.op("Unsqueeze", [p, b.const([axis + 1], np.int64)]), b.const(wide, np.int64)])
    merged = list(ps)
    merged[axis] = n * block
    rep = b.op("Reshape", [rep, b.const(merged, np.int64)])
    if n * block != x_shape[axis]:
        rep = b.op("Slice", [rep, b.const([0], np.int64), b.const([x_shape[axis]], np.int64),
                             b.const([axis], np.int64)])  # fmt: skip
    return rep


def _qparams(node: onnx.NodeProto, g: Ctx) -> tuple[tuple, int, int]:
    x_shape = g.shapes.get(node.input[0])
    if x_shape is None or any(d < 0 for d in x_shape):
        raise UnsupportedError(f"{node.op_type} node {node.name[:80]!r}: its input has no static shape")
    axis = _attr(node, "axis", 1)
    axis = axis + len(x_shape) if axis < 0 else axis
    return x_shape, axis, _attr(node, "block_size", 0) or 0


def _quantize(b: _Builder, node: onnx.NodeProto, g: Ctx, out_t: int) -> None:
    x, s = node.input[0], node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    x_shape, axis, block = _qparams(node, g)
    if _attr(node, "precision", 0) not in (0, TensorProto.FLOAT):
        raise UnsupportedError(f"QuantizeLinear node {node.name[:80]!r}: precision other than float is not compiled")
    scale = _to_float(b, _param(b, s, g, x_shape, axis, block), g.types.get(s, TensorProto.FLOAT))
    v = b.op("Div", [_to_float(b, x, g.types[x]), scale])
    name = narrow_name(out_t)
    if name in FLOATS:
        if zp is not None and name == "float4_e2m1fn":  # the float8 formats ignore their (zero) zero point
            v = b.op("Add", [v, _decode(b, _param(b, zp, g, x_shape, axis, block), name)])
        _encode_float(b, v, FLOATS[name], bool(_attr(node, "saturate", 1)), node.output[0])
        return
    if name == E8M0:
        raise UnsupportedError(f"QuantizeLinear node {node.name[:80]!r}: float8e8m0 output is not compiled")
    lo, hi = INTS[name] if name else (int(np.iinfo(helper.tensor_dtype_to_np_dtype(out_t)).min),
                                       int(np.iinfo(helper.tensor_dtype_to_np_dtype(out_t)).max))  # fmt: skip
    v = b.op("Round", [v])
    if zp is not None:
        v = b.op("Add", [v, b.op("Cast", [_param(b, zp, g, x_shape, axis, block)], to=TensorProto.FLOAT)])
    v = b.op("Clip", [v, b.const(float(lo)), b.const(float(hi))])
    b.op("Cast", [v], node.output[0], to=_carrier_type(name) if name else out_t)


def _dequantize(b: _Builder, node: onnx.NodeProto, g: Ctx) -> None:
    x, s = node.input[0], node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    x_shape, axis, block = _qparams(node, g)
    name = narrow_name(g.types[x])
    if name in FLOATS or name == E8M0:  # the float formats ignore their (zero) zero point
        v = _decode(b, x, name)
    else:
        v = b.op("Cast", [x], to=TensorProto.FLOAT)
        if zp is not None:
            v = b.op("Sub", [v, b.op("Cast", [_param(b, zp, g, x_shape, axis, block)], to=TensorProto.FLOAT)])
    s_type = g.types.get(s, TensorProto.FLOAT)
    y = b.op("Mul", [v, _to_float(b, _param(b, s, g, x_shape, axis, block), s_type)])
    out_t = _attr(node, "output_dtype", 0) or s_type
    b.op("Cast", [y], node.output[0], to=out_t)
