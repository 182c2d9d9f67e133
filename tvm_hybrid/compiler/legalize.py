"""ONNX-level fixes for nodes TVM's Relax frontend converts with the wrong meaning.

The frontend ignores some attributes and edge cases (IsInf's detect_*, ConvTranspose's
output_shape, Mod's float semantics, shifts past the width, Dropout's mask type…). Each rule
below rewrites such a node into ops the frontend gets right, or refuses it with an
UnsupportedError naming the op and the attribute: what compiles is right or is refused. Found
and checked with ONNX's node tests (scripts/conformance.py).
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedError
from .onnx_graph import attr as _attr
from .onnx_graph import opset, replace_nodes, static_shapes


class Ctx:
    """What a rule may ask about the graph: static shapes, element types, constant values."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.shapes: dict[str, tuple[int, ...]] = static_shapes(model)
        self.types: dict[str, int] = {vi.name: vi.type.tensor_type.elem_type
                                      for vi in [*g.input, *g.value_info, *g.output] if vi.type.HasField("tensor_type")}  # fmt: skip
        self.inits = {t.name: t for t in g.initializer}
        for t in g.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = tuple(t.dims)
        self.new_inits: list[onnx.TensorProto] = []
        self._ids = itertools.count()

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def add_const(self, value, hint: str) -> str:
        name = f"{hint}__legal{next(self._ids)}"
        t = numpy_helper.from_array(np.asarray(value), name)
        self.new_inits.append(t)
        self.inits[name] = t
        return name

    def tmp(self, hint: str) -> str:
        return f"{hint}__legal{next(self._ids)}"


def _refuse(node, why: str):
    raise UnsupportedError(f"{node.op_type} node {node.name[:80]!r}: {why}")


def _isinf(node, ctx: Ctx):
    pos, neg = _attr(node, "detect_positive", 1), _attr(node, "detect_negative", 1)
    if pos and neg:
        return None
    x, y = node.input[0], node.output[0]
    if not pos and not neg:
        return [helper.make_node("And", [inf := ctx.tmp(y), ctx.add_const(np.array(False), y)], [y]),
                helper.make_node("IsInf", [x], [inf])]  # fmt: skip
    inf, sign = ctx.tmp(y), ctx.tmp(y)
    zero = ctx.add_const(np.zeros((), helper.tensor_dtype_to_np_dtype(ctx.types[x])), y)
    return [helper.make_node("IsInf", [x], [inf]),
            helper.make_node("Greater" if pos else "Less", [x, zero], [sign]),
            helper.make_node("And", [inf, sign], [y])]  # fmt: skip


def _mod(node, ctx: Ctx):
    """Mod with fmod=0 on floats is numpy's mod: fmod, then the divisor added where the signs differ."""
    x, d = node.input[0], node.input[1]
    if _attr(node, "fmod", 0) or ctx.types.get(x) not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        return None
    y = node.output[0]
    dt = helper.tensor_dtype_to_np_dtype(ctx.types[x])
    zero = ctx.add_const(np.zeros((), dt), y)
    r, eq, rnz, rneg, dneg, differ, fix, plus = (ctx.tmp(y) for _ in range(8))
    return [
        helper.make_node("Mod", [x, d], [r], fmod=1),
        helper.make_node("Equal", [r, zero], [eq]),
        helper.make_node("Not", [eq], [rnz]),
        helper.make_node("Less", [r, zero], [rneg]),
        helper.make_node("Less", [d, zero], [dneg]),
        helper.make_node("Xor", [rneg, dneg], [differ]),
        helper.make_node("And", [rnz, differ], [fix]),
        helper.make_node("Add", [r, d], [plus]),
        helper.make_node("Where", [fix, plus, r], [y]),
    ]


def _bitshift(node, ctx: Ctx):
    """Shifts by a negative amount or by the width or more are 0 (C leaves them undefined)."""
    x, s = node.input[0], node.input[1]
    t = ctx.types.get(x)
    if t is None:
        return None
    dt = np.dtype(helper.tensor_dtype_to_np_dtype(t))
    c = ctx.const(s)
    bits = dt.itemsize * 8
    if c is not None and np.all((c >= 0) & (c < bits)):
        return None
    y = node.output[0]
    ok, lo, hi, safe, shifted = (ctx.tmp(y) for _ in range(5))
    zero, width = ctx.add_const(np.zeros((), dt), y), ctx.add_const(np.array(bits, dt), y)
    nodes = [
        helper.make_node("GreaterOrEqual", [s, zero], [lo]) if dt.kind == "i" else
        helper.make_node("Equal", [s, s], [lo]),
        helper.make_node("Less", [s, width], [hi]),
        helper.make_node("And", [lo, hi], [ok]),
        helper.make_node("Where", [ok, s, zero], [safe]),
        helper.make_node("BitShift", [x, safe], [shifted], direction=_attr(node, "direction")),
    ]
    fill = zero
    if _attr(node, "direction") in (b"RIGHT", "RIGHT") and dt.kind == "i":  # arithmetic: the sign fills
        neg, fill = ctx.tmp(y), ctx.tmp(y)
        nodes += [helper.make_node("Less", [x, zero], [neg]),
                  helper.make_node("Where", [neg, ctx.add_const(np.array(-1, dt), y), zero], [fill])]  # fmt: skip
    nodes.append(helper.make_node("Where", [ok, shifted, fill], [y]))
    return nodes


def _space_to_depth(node, ctx: Ctx):
    mode = _attr(node, "mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "DCR":
        return None
    x, y = node.input[0], node.output[0]
    if x not in ctx.shapes:
        return None
    b, c, h, w = ctx.shapes[x]
    bs = _attr(node, "blocksize")
    r1, t = ctx.tmp(y), ctx.tmp(y)
    return [
        helper.make_node("Reshape", [x, ctx.add_const(np.array([b, c, h // bs, bs, w // bs, bs]), y)], [r1]),
        helper.make_node("Transpose", [r1], [t], perm=[0, 1, 3, 5, 2, 4]),
        helper.make_node("Reshape", [t, ctx.add_const(np.array([b, c * bs * bs, h // bs, w // bs]), y)], [y]),
    ]


def _conv_transpose(node, ctx: Ctx):
    """output_shape (ignored by the frontend) becomes the pads and output_padding it implies."""
    out_shape = _attr(node, "output_shape")
    if not out_shape:
        return None
    x, w = node.input[0], node.input[1]
    if x not in ctx.shapes or w not in ctx.shapes:
        return None
    spatial = ctx.shapes[x][2:]
    out_shape = list(out_shape)[-len(spatial):]
    k = ctx.shapes[w][2:]
    n = len(spatial)
    strides = _attr(node, "strides", [1] * n)
    dil = _attr(node, "dilations", [1] * n)
    opad = list(_attr(node, "output_padding", [0] * n))
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    begin, end = [0] * n, [0] * n
    for i in range(n):
        total = strides[i] * (spatial[i] - 1) + opad[i] + ((k[i] - 1) * dil[i] + 1) - out_shape[i]
        if total < 0:  # a bigger output than the kernel covers: zeros at the end
            opad[i] -= total
            continue
        if auto == "SAME_UPPER":
            begin[i], end[i] = total // 2, total - total // 2
        else:
            begin[i], end[i] = total - total // 2, total // 2
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.attribute[:]
    new.attribute.extend(a for a in node.attribute if a.name not in ("output_shape", "pads", "auto_pad", "output_padding"))
    new.attribute.extend([helper.make_attribute("pads", begin + end), helper.make_attribute("output_padding", opad)])
    return [new]


def _dropout(node, ctx: Ctx):
    """Inference Dropout is the identity and an all-true mask; training mode draws random masks."""
    training = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(False)
    if training is None:
        _refuse(node, "training_mode is computed at run time; tvm-hybrid compiles inference (training_mode false)")
    ratio = ctx.const(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(0.5)
    if bool(training) and (ratio is None or float(ratio) != 0.0):
        _refuse(node, "training_mode=1 drops random elements; tvm-hybrid compiles inference (training_mode 0)")
    x, y = node.input[0], node.output[0]
    nodes = [helper.make_node("Identity", [x], [y])]
    if len(node.output) > 1 and node.output[1]:
        shape = ctx.tmp(y)
        nodes += [helper.make_node("Shape", [x], [shape]),
                  helper.make_node("ConstantOfShape", [shape], [node.output[1]],
                                   value=numpy_helper.from_array(np.array([True])))]  # fmt: skip
    return nodes


def _reduce_mean(ctx: Ctx, x: str, axes: list[int], out: str) -> onnx.NodeProto:
    """ReduceMean keeping dims, its axes as the model's opset takes them (an input from 18)."""
    if opset(ctx.model) >= 18:
        return helper.make_node("ReduceMean", [x, ctx.add_const(np.array(axes, np.int64), out)], [out], keepdims=1)
    return helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1)


def _batch_norm(node, ctx: Ctx):
    """Training mode: normalized by the batch's own mean and (population) variance, with the
    running mean and variance updated by ``momentum`` as further outputs, as ONNX defines it."""
    if not _attr(node, "training_mode", 0):
        return None
    x, scale, bias, mean, var = node.input[:5]
    if x not in ctx.shapes:
        _refuse(node, "training_mode=1 needs a static input shape")
    rank = len(ctx.shapes[x])
    axes = [0, *range(2, rank)]
    eps, momentum = _attr(node, "epsilon", 1e-5), _attr(node, "momentum", 0.9)
    per_channel = ctx.add_const(np.array([-1, *[1] * (rank - 2)], np.int64), x)  # [C] -> [C, 1, ...]
    t = {k: ctx.tmp(f"{node.output[0]}_{k}") for k in ("m", "d", "sq", "v", "ve", "sd", "n", "s", "b", "ys")}
    c = {k: ctx.add_const(np.array(v, np.float32), x) for k, v in (("eps", eps), ("mom", momentum),
                                                                    ("rest", 1 - momentum))}  # fmt: skip
    y = node.output[0]
    nodes = [
        _reduce_mean(ctx, x, axes, t["m"]),
        helper.make_node("Sub", [x, t["m"]], [t["d"]]),
        helper.make_node("Mul", [t["d"], t["d"]], [t["sq"]]),
        _reduce_mean(ctx, t["sq"], axes, t["v"]),
        helper.make_node("Add", [t["v"], c["eps"]], [t["ve"]]),
        helper.make_node("Sqrt", [t["ve"]], [t["sd"]]),
        helper.make_node("Div", [t["d"], t["sd"]], [t["n"]]),
        helper.make_node("Reshape", [scale, per_channel], [t["s"]]),
        helper.make_node("Reshape", [bias, per_channel], [t["b"]]),
        helper.make_node("Mul", [t["n"], t["s"]], [t["ys"]]),
        helper.make_node("Add", [t["ys"], t["b"]], [y]),
    ]
    flat = ctx.add_const(np.array([-1], np.int64), x)
    for k, (running, batch) in enumerate([(mean, t["m"]), (var, t["v"])], start=1):
        if len(node.output) > k and node.output[k]:  # running * momentum + batch * (1 - momentum)
            out = node.output[k]
            b_flat, kept, added = ctx.tmp(f"{out}_b"), ctx.tmp(f"{out}_k"), ctx.tmp(f"{out}_a")
            nodes += [helper.make_node("Reshape", [batch, flat], [b_flat]),
                      helper.make_node("Mul", [running, c["mom"]], [kept]),
                      helper.make_node("Mul", [b_flat, c["rest"]], [added]),
                      helper.make_node("Add", [kept, added], [out])]  # fmt: skip
    return nodes


def _col2im(node, ctx: Ctx):
    """Col2Im as a grouped ConvTranspose: each of a channel's block positions is an input channel
    whose one-hot kernel puts it at that position; overlapping positions add up, as Col2Im sums."""
    x = node.input[0]
    image, block = ctx.const(node.input[1]), ctx.const(node.input[2])
    if image is None or block is None or x not in ctx.shapes:
        return None  # (the importer asks for their values: --input NAME=VALUE)
    image, block = [int(v) for v in image], [int(v) for v in block]
    n, ck, length = ctx.shapes[x]
    d = len(block)
    k = int(np.prod(block))
    dil = list(_attr(node, "dilations", [1] * d))
    pads = list(_attr(node, "pads", [0] * (2 * d)))
    strides = list(_attr(node, "strides", [1] * d))
    blocks = [(image[i] + pads[i] + pads[i + d] - (dil[i] * (block[i] - 1) + 1)) // strides[i] + 1 for i in range(d)]
    if ck % k or int(np.prod(blocks)) != length:
        _refuse(node, f"input of shape {list(ctx.shapes[x])} does not hold {k}-position blocks over {blocks}")
    channels = ck // k
    weight = np.zeros((ck, 1, *block), helper.tensor_dtype_to_np_dtype(ctx.types.get(x, TensorProto.FLOAT)))
    for c in range(channels):
        for j, pos in enumerate(np.ndindex(*block)):
            weight[(c * k + j, 0, *pos)] = 1
    opad = [image[i] + pads[i] + pads[i + d] - (strides[i] * (blocks[i] - 1) + dil[i] * (block[i] - 1) + 1)
            for i in range(d)]  # fmt: skip
    cols = ctx.tmp(node.output[0])
    return [
        helper.make_node("Reshape", [x, ctx.add_const(np.array([n, ck, *blocks], np.int64), x)], [cols]),
        helper.make_node("ConvTranspose", [cols, ctx.add_const(weight, x)], [node.output[0]], group=channels,
                         strides=strides, dilations=dil, pads=pads, output_padding=opad),
    ]  # fmt: skip


def _reduce(node, ctx: Ctx):
    """A reduction over an empty axis has no elements: ONNX gives its identity (±inf for max and
    min, where TVM's kernels give the type's finite limit)."""
    x = node.input[0] if node.input else None
    if x not in ctx.shapes or 0 not in ctx.shapes[x]:
        return None
    shape = ctx.shapes[x]
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node.input[1])
        if axes is None:
            return None
        axes = axes.ravel().tolist()
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return None
        axes = list(range(len(shape)))
    if any(shape[a] == 0 for a in axes):
        _refuse(node, "reduces over a zero-size axis: its result is the reduction's identity (±inf), a constant; "
                      "compute it without the reduction")  # fmt: skip
    return None


def _resize(node, ctx: Ctx):
    if _attr(node, "antialias", 0):
        _refuse(node, "antialias=1 is not implemented by TVM's resize")
    mode = _attr(node, "coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    scales = ctx.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    x = node.input[0]
    if scales is None or scales.size == 0 or x not in ctx.shapes or mode == "tf_crop_and_resize":
        return None
    axes = _attr(node, "axes") or list(range(len(ctx.shapes[x])))
    fractional = [a for a, s in zip(axes, scales.ravel())
                  if float(np.float32(ctx.shapes[x][a] * s)) != np.floor(ctx.shapes[x][a] * s)]  # fmt: skip
    if not fractional:
        return None
    if mode in ("half_pixel", "pytorch_half_pixel", "asymmetric") and np.all(scales <= 1) and \
            all(ctx.shapes[x][a] > 1 for a in fractional):  # fmt: skip
        return _resize_by_roi(node, ctx, dict(zip(axes, scales.ravel().tolist())), mode)
    a = fractional[0]
    n, s = ctx.shapes[x][a], dict(zip(axes, scales.ravel().tolist()))[a]
    _refuse(node, f"scales {scales.tolist()} give a fractional output size ({n} x {s:g}); TVM's resize maps "
                  f"coordinates by the output size, not the scale ({mode}): give sizes instead")  # fmt: skip


def _resize_by_roi(node, ctx: Ctx, scale: dict, mode: str):
    """A downscale by a scale whose output size is fractional, as ONNX maps it (by the scale:
    x_in = (x + 0.5) / s - 0.5 for half_pixel, x / s for asymmetric): the same straight line as
    tf_crop_and_resize over a region of interest, which TVM's resize takes with the output size.
    Downscaling keeps every sampled coordinate inside the input, where the two modes agree."""
    x = node.input[0]
    shape = ctx.shapes[x]
    rank = len(shape)
    out = [int(np.floor(shape[a] * scale.get(a, 1.0))) for a in range(rank)]
    start, end = np.zeros(rank, np.float32), np.ones(rank, np.float32)
    for a in range(rank):
        s, n, m = scale.get(a, 1.0), shape[a], out[a]
        if s == 1.0 or n == 1:
            continue
        b = 0.0 if mode == "asymmetric" or (mode == "pytorch_half_pixel" and m == 1) else 0.5 / s - 0.5
        start[a] = b / (n - 1)
        end[a] = start[a] + ((m - 1) / s) / (n - 1) if m > 1 else start[a]
    # TVM's kernel divides by (output size - 1): a one-pixel axis is made two identical ones, then cut.
    single = [a for a in range(rank) if out[a] == 1 and shape[a] > 1]
    sized = [2 if a in single else out[a] for a in range(rank)]
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.attribute[:]
    new.attribute.extend(a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "axes"))
    new.attribute.append(helper.make_attribute("coordinate_transformation_mode", "tf_crop_and_resize"))
    y = node.output[0]
    mid = ctx.tmp(y) if single else y
    new.input[:] = [x, ctx.add_const(np.concatenate([start, end]), y), "", ctx.add_const(np.array(sized, np.int64), y)]
    new.output[0] = mid
    if not single:
        return [new]
    zeros, ones = ctx.add_const(np.zeros(len(single), np.int64), y), ctx.add_const(np.ones(len(single), np.int64), y)
    return [new, helper.make_node("Slice", [mid, zeros, ones, ctx.add_const(np.array(single, np.int64), y)], [y])]


def _roi_align(node, ctx: Ctx):
    mode = _attr(node, "mode", b"avg")
    if mode in (b"max", "max"):
        _refuse(node, "mode=max: TVM's roi_align max pooling does not follow ONNX's (max of the bilinear samples)")
    return None


def _np(ctx: Ctx, name: str):
    return np.dtype(helper.tensor_dtype_to_np_dtype(ctx.types[name]))


def _pow(node, ctx: Ctx):
    """Pow of mixed types (the exponent's type differs) and of integers: computed in float64,
    then cast to the base's type (TVM's power takes floats of one type)."""
    x, e = node.input[0], node.input[1]
    if x not in ctx.types or e not in ctx.types:
        return None
    tx, te_ = _np(ctx, x), _np(ctx, e)
    if tx == te_ and tx.kind == "f":
        return None
    y = node.output[0]
    wide = TensorProto.DOUBLE if tx.kind in "iu" or tx == np.float64 else TensorProto.FLOAT
    xa, ea, p = ctx.tmp(y), ctx.tmp(y), ctx.tmp(y)
    return [helper.make_node("Cast", [x], [xa], to=wide), helper.make_node("Cast", [e], [ea], to=wide),
            helper.make_node("Pow", [xa, ea], [p]), helper.make_node("Cast", [p], [y], to=ctx.types[x])]  # fmt: skip


def _reduce_bool(node, ctx: Ctx):
    x = node.input[0] if node.input else None
    if ctx.types.get(x) != TensorProto.BOOL:
        return None
    y = node.output[0]
    xi, r = ctx.tmp(y), ctx.tmp(y)
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[0], new.output[0] = xi, r
    return [helper.make_node("Cast", [x], [xi], to=TensorProto.INT32), new,
            helper.make_node("Cast", [r], [y], to=TensorProto.BOOL)]  # fmt: skip


def _one_hot(node, ctx: Ctx):
    """OneHot as Equal(indices, range(depth)) and Where(on, off): negative indices count from
    the end, out-of-range ones give an all-off row."""
    idx, depth_name, values = node.input[:3]
    depth = ctx.const(depth_name)
    if depth is None or idx not in ctx.shapes:
        return None
    d = int(np.asarray(depth).ravel()[0])
    rank = len(ctx.shapes[idx]) + 1
    axis = _attr(node, "axis", -1) % rank
    y = node.output[0]
    shape = [1] * rank
    shape[axis] = d
    ar = ctx.add_const(np.arange(d, dtype=np.int64).reshape(shape), y)
    i64, neg, wrapped, fixed, un, eq, on, off = (ctx.tmp(y) for _ in range(8))
    zero = ctx.add_const(np.array(0, np.int64), y)
    return [
        helper.make_node("Cast", [idx], [i64], to=TensorProto.INT64),
        helper.make_node("Less", [i64, zero], [neg]),
        helper.make_node("Add", [i64, ctx.add_const(np.array(d, np.int64), y)], [wrapped]),
        helper.make_node("Where", [neg, wrapped, i64], [fixed]),
        helper.make_node("Unsqueeze", [fixed, ctx.add_const(np.array([axis], np.int64), y)], [un]),
        helper.make_node("Equal", [un, ar], [eq]),
        helper.make_node("Gather", [values, ctx.add_const(np.array(1, np.int64), y)], [on], axis=0),
        helper.make_node("Gather", [values, ctx.add_const(np.array(0, np.int64), y)], [off], axis=0),
        helper.make_node("Where", [eq, on, off], [y]),
    ]


def _lp_norm(node, ctx: Ctx):
    x, y = node.input[0], node.output[0]
    p = _attr(node, "p", 2)
    axis = _attr(node, "axis", -1)
    if p not in (1, 2):
        _refuse(node, f"p={p}: LpNormalization is defined for p 1 and 2")
    n, q, zero_n = ctx.tmp(y), ctx.tmp(y), ctx.tmp(y)
    zero = ctx.add_const(np.zeros((), _np(ctx, x)), y)
    reduce = helper.make_node("ReduceL1" if p == 1 else "ReduceL2", [x], [n], keepdims=1, axes=[axis])
    if opset(ctx.model) >= 18:  # axes became an input
        reduce = helper.make_node(reduce.op_type, [x, ctx.add_const(np.array([axis], np.int64), y)], [n], keepdims=1)
    return [reduce, helper.make_node("Div", [x, n], [q]), helper.make_node("Equal", [n, zero], [zero_n]),
            helper.make_node("Where", [zero_n, zero, q], [y])]  # a zero vector stays zero


def _reverse_sequence(node, ctx: Ctx):
    x, lens = node.input[0], node.input[1]
    lv = ctx.const(lens)
    if lv is None or x not in ctx.shapes:
        return None
    shape = ctx.shapes[x]
    t_ax, b_ax = _attr(node, "time_axis", 0), _attr(node, "batch_axis", 1)
    idx = np.zeros(shape, np.int64)
    grid = np.indices(shape)
    t, b = grid[t_ax], grid[b_ax]
    n = lv.astype(np.int64)[b]
    idx = np.where(t < n, n - 1 - t, t)
    y = node.output[0]
    return [helper.make_node("GatherElements", [x, ctx.add_const(idx, y)], [y], axis=t_ax)]


def _qlinear_matmul(node, ctx: Ctx):
    a, sa, za, b, sb, zb, sy, zy = node.input
    y = node.output[0]
    da, db, m = ctx.tmp(y), ctx.tmp(y), ctx.tmp(y)
    if a not in ctx.shapes or b not in ctx.shapes:
        return None

    def axis(scale, operand, per):  # per-row of a (its rows axis), per-column of b
        n = int(np.prod(ctx.shapes.get(scale, (1,))))
        return {} if n == 1 else {"axis": len(ctx.shapes[operand]) - per}

    if int(np.prod(ctx.shapes.get(sy, (1,)))) != 1:
        _refuse(node, "y_scale must be a scalar")
    return [helper.make_node("DequantizeLinear", [a, sa, za], [da], **axis(sa, a, 2)),
            helper.make_node("DequantizeLinear", [b, sb, zb], [db], **axis(sb, b, 1)),
            helper.make_node("MatMul", [da, db], [m]),
            helper.make_node("QuantizeLinear", [m, sy, zy], [y])]  # fmt: skip


def _qlinear_conv(node, ctx: Ctx):
    x, sx, zx, w, sw, zw, sy, zy, *bias = node.input
    y = node.output[0]
    dx, dw, c = ctx.tmp(y), ctx.tmp(y), ctx.tmp(y)
    ins = [dx, dw]
    nodes = [helper.make_node("DequantizeLinear", [x, sx, zx], [dx]),
             helper.make_node("DequantizeLinear", [w, sw, zw], [dw], axis=0)]  # fmt: skip
    if bias and bias[0]:
        db, sb = ctx.tmp(y), ctx.tmp(y)
        nodes += [helper.make_node("Mul", [sx, sw], [sb]),
                  helper.make_node("DequantizeLinear", [bias[0], sb], [db], axis=0)]  # fmt: skip
        ins.append(db)
    conv = helper.make_node("Conv", ins, [c])
    conv.attribute.extend(node.attribute)
    return nodes + [conv, helper.make_node("QuantizeLinear", [c, sy, zy], [y])]


def _conv_integer(node, ctx: Ctx):
    """ConvInteger in int32: (x - x_zero_point) * (w - w_zero_point), summed exactly."""
    x, w, *zps = node.input
    y = node.output[0]
    xi, wi = ctx.tmp(y), ctx.tmp(y)
    nodes = [helper.make_node("Cast", [x], [xi], to=TensorProto.INT32),
             helper.make_node("Cast", [w], [wi], to=TensorProto.INT32)]  # fmt: skip
    ins = [xi, wi]
    for k, zp in enumerate(zps[:2]):
        if not zp:
            continue
        zi, sub = ctx.tmp(y), ctx.tmp(y)
        src = ins[k]
        if k == 1 and ctx.shapes.get(zp, ()) not in ((), (1,)):  # per output channel: [M, 1, 1, 1]
            rs = ctx.tmp(y)
            nodes += [helper.make_node("Cast", [zp], [zi], to=TensorProto.INT32),
                      helper.make_node("Reshape", [zi, ctx.add_const(np.array([-1] + [1] * (len(ctx.shapes[w]) - 1)), y)], [rs]),
                      helper.make_node("Sub", [src, rs], [sub])]  # fmt: skip
        else:
            nodes += [helper.make_node("Cast", [zp], [zi], to=TensorProto.INT32),
                      helper.make_node("Sub", [src, zi], [sub])]  # fmt: skip
        ins[k] = sub
    conv = helper.make_node("Conv", ins, [y])
    conv.attribute.extend(node.attribute)
    return nodes + [conv]


def _upsample(node, ctx: Ctx):
    """Upsample (deprecated) is Resize with asymmetric coordinates and floor rounding."""
    if opset(ctx.model) < 10:
        return None  # no Resize before opset 10
    scales = node.input[1] if len(node.input) > 1 else None
    if scales is None:
        sv = _attr(node, "scales")
        if sv is None:
            return None
        scales = ctx.add_const(np.array(sv, np.float32), node.output[0])
    mode = _attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return [helper.make_node("Resize", [node.input[0], "", scales], [node.output[0]], mode=mode,
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")]  # fmt: skip


def _resize_full(node, ctx: Ctx):
    """Resize with ``axes`` or a keep_aspect_ratio_policy: the full-rank sizes they imply (TVM
    reads neither)."""
    axes = _attr(node, "axes")
    policy = _attr(node, "keep_aspect_ratio_policy", b"stretch")
    policy = policy.decode() if isinstance(policy, bytes) else policy
    if axes is None and policy == "stretch":
        return None
    x = node.input[0]
    if x not in ctx.shapes:
        return None
    shape = list(ctx.shapes[x])
    rank = len(shape)
    axes = [a % rank for a in (axes or range(rank))]
    inputs = list(node.input) + [""] * (4 - len(node.input))
    roi, scales, sizes = (ctx.const(n) if n else None for n in inputs[1:4])
    y = node.output[0]
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.attribute[:]
    new.attribute.extend(a for a in node.attribute if a.name not in ("axes", "keep_aspect_ratio_policy"))
    if sizes is not None and sizes.size:
        sizes = sizes.astype(np.int64).ravel()
        if policy != "stretch":
            ratios = [sizes[k] / shape[a] for k, a in enumerate(axes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            sizes = np.array([int(np.floor(shape[a] * r + 0.5)) for a in axes], np.int64)
        full = np.array(shape, np.int64)
        full[axes] = sizes
        new.input[:] = [x, "", "", ctx.add_const(full, y)]
        if roi is not None and roi.size:
            _refuse(node, "roi with axes")
        return [new]
    if scales is not None and scales.size:
        full = np.ones(rank, np.float32)
        full[axes] = scales.ravel()
        new.input[:] = [x, inputs[1] if roi is None or not roi.size else _full_roi(ctx, roi, axes, rank, y),
                        ctx.add_const(full, y)]  # fmt: skip
        return [new]
    return None


def _full_roi(ctx: Ctx, roi, axes, rank, hint):
    r = roi.ravel()
    n = len(axes)
    full = np.concatenate([np.zeros(rank, r.dtype), np.ones(rank, r.dtype)])
    for k, a in enumerate(axes):
        full[a], full[rank + a] = r[k], r[n + k]
    return ctx.add_const(full, hint)


def _resize_all(node, ctx: Ctx):
    return _resize_full(node, ctx) or _resize(node, ctx)


def _axes_1d(node, ctx: Ctx):
    """Axes given as a scalar (onnxruntime takes them; the spec and TVM's frontend want 1-D)."""
    if len(node.input) < 2 or not node.input[1]:
        return None
    axes = ctx.const(node.input[1])
    if axes is None or axes.ndim != 0:
        return None
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[1] = ctx.add_const(axes.reshape(1), node.output[0])
    return [new]


def _split_empty(node, ctx: Ctx):
    """A Split with zero-length pieces (TVM's split wants strictly increasing indices): a Slice each."""
    sizes = _attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        sizes = ctx.const(node.input[1])
        sizes = None if sizes is None else sizes.ravel().tolist()
    if not sizes or 0 not in sizes or opset(ctx.model) < 10:
        return None
    axis = _attr(node, "axis", 0)
    nodes, off = [], 0
    for out, n in zip(node.output, sizes):
        if out:
            c = [ctx.add_const(np.array([v], np.int64), out) for v in (off, off + n, axis)]
            nodes.append(helper.make_node("Slice", [node.input[0], *c], [out]))
        off += n
    return nodes


def _concat_empty(node, ctx: Ctx):
    """A Concat drops its zero-size operands (a zero-length pad): TVM would otherwise store a
    zero-size constant in the library, which its loader then cannot read."""
    empty = [x for x in node.input if x and x in ctx.shapes and 0 in ctx.shapes[x]]
    keep = [x for x in node.input if x and x not in empty]
    if not empty or not keep:
        return None
    if len(keep) == 1:
        return [helper.make_node("Identity", keep, list(node.output))]
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.input[:]
    new.input.extend(keep)
    return [new]


def _eye_like(node, ctx: Ctx):
    """EyeLike of a static shape is a constant (TVM's converter refuses a dtype unlike the input's)."""
    x = node.input[0]
    if x not in ctx.shapes or len(ctx.shapes[x]) != 2:
        return None
    dtype = _attr(node, "dtype") or ctx.types.get(x, TensorProto.FLOAT)
    eye = np.eye(*ctx.shapes[x], k=_attr(node, "k", 0), dtype=helper.tensor_dtype_to_np_dtype(dtype))
    return [helper.make_node("Constant", [], list(node.output), value=numpy_helper.from_array(eye))]


RULES: dict[str, Callable] = {
    "EyeLike": _eye_like,
    "Concat": _concat_empty,
    "Split": _split_empty,
    "Unsqueeze": _axes_1d,
    "Squeeze": _axes_1d,
    "Pow": _pow,
    "ReduceMax": lambda n, c: _reduce_bool(n, c) or _reduce(n, c),
    "ReduceMin": lambda n, c: _reduce_bool(n, c) or _reduce(n, c),
    "OneHot": _one_hot,
    "LpNormalization": _lp_norm,
    "ReverseSequence": _reverse_sequence,
    "QLinearMatMul": _qlinear_matmul,
    "QLinearConv": _qlinear_conv,
    "ConvInteger": _conv_integer,
    "Upsample": _upsample,
    "IsInf": _isinf,
    "Mod": _mod,
    "BitShift": _bitshift,
    "SpaceToDepth": _space_to_depth,
    "ConvTranspose": _conv_transpose,
    "Dropout": _dropout,
    "BatchNormalization": _batch_norm,
    "Col2Im": _col2im,
    "Resize": _resize_all,
    "RoiAlign": _roi_align,
}


def legalize(model: onnx.ModelProto) -> bool:
    """Apply every rule to the top-level graph in place; True when something changed.
    Rules refuse with UnsupportedError."""
    ctx = Ctx(model)
    g = model.graph
    out: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        new = rule(node, ctx) if rule else None
        if new is None:
            out.append(node)
            continue
        # What a rule writes gets the other ops' rules once (a Resize from an Upsample).
        again = []
        for n in new:
            r = RULES.get(n.op_type) if n.op_type != node.op_type else None
            again.extend((r(n, ctx) if r else None) or [n])
        new = again
        for k, n in enumerate(new):
            n.name = n.name or f"{node.name or node.op_type}__legal_{k}"
        out.extend(_topo(new))
        changed = True
    if changed:
        replace_nodes(g, out, ctx.new_inits)
    return changed


def _topo(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The rule's nodes in an order where each reads only what is written before it."""
    made = {o for n in nodes for o in n.output}
    done: set[str] = set()
    out, rest = [], list(nodes)
    while rest:
        for n in rest:
            if all(i not in made or i in done for i in n.input):
                out.append(n)
                done.update(n.output)
                rest.remove(n)
                break
        else:
            raise ValueError("cycle in a legalization rule")
    return out


#: Pure data movement: no arithmetic, so the same in fp16 and fp32.
_MOVES = {"Cast", "CastLike", "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat",
          "Slice", "Gather", "GatherElements", "GatherND", "Split", "Shape", "Size", "Expand", "Tile", "Constant",
          "ConstantOfShape", "If", "Loop", "Scan", "DepthToSpace", "SpaceToDepth", "Where", "Pad",
          "ScatterND", "ScatterElements", "Compress", "ReverseSequence", "Trilu"}  # fmt: skip


def fp16_in_fp32(model: onnx.ModelProto) -> bool:
    """Every node that computes on float16 (or bfloat16) computes in float32, its fp16 results rounded once at
    the end, as CPUs without fp16 arithmetic (and onnxruntime on them) do: TVM would otherwise
    round every intermediate (a matmul's running sum, a softmax's exponentials) to fp16."""
    g = model.graph
    ctx = Ctx(model)
    halves = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    out: list[onnx.NodeProto] = []
    changed = False
    for i, node in enumerate(g.node):
        if node.op_type in _MOVES or node.domain not in ("", "ai.onnx") or \
                not any(ctx.types.get(x) in halves for x in [*node.input, *node.output] if x):  # fmt: skip
            out.append(node)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, x in enumerate(node.input):
            if x and ctx.types.get(x) in halves:
                up = f"{x}__f32_{i}"
                out.append(helper.make_node("Cast", [x], [up], to=TensorProto.FLOAT, name=f"{up}_cast"))
                new.input[k] = up
        tail = []
        for k, y in enumerate(node.output):
            if y and ctx.types.get(y) in halves:
                wide = f"{y}__f32"
                new.output[k] = wide
                tail.append(helper.make_node("Cast", [wide], [y], to=ctx.types[y], name=f"{wide}_cast"))
        for a in new.attribute:  # attributes typed like the data (a constant fill, an epsilon stays float)
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in halves:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        out.append(new)
        out.extend(tail)
        changed = True
    if changed:
        replace_nodes(g, out, [])
    return changed
