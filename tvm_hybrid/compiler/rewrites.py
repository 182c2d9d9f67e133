"""Relax rewrites before legalization: conv_transpose_as_conv for every build; the ones a backend
asks for (Backend.rewrites), such as patch_conv_as_matmul on CPUs."""

from __future__ import annotations

import numpy as np


def _relax_pass(name: str, op_name: str | tuple[str, ...], rewrite_call, with_uses: bool = False):
    """A module pass applying ``rewrite_call(builder, call)`` (a new expression, or None to keep
    the call) to every call of ``op_name`` (or of any of several) in the module's Relax functions.
    ``with_uses``: ``rewrite_call(builder, call, uses)``, ``uses`` counting each variable's uses in
    the function before the pass (``uses.get(var, 0)``; vars the pass re-binds keep their count)."""
    op_names = (op_name,) if isinstance(op_name, str) else op_name
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

    @visitor
    class Uses(PyExprVisitor):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def visit_var_(self, var):
            self.counts[var] = self.counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            self.visit_var_(var)

    @mutator
    class Rewriter(PyExprMutator):
        def __init__(self, mod, uses=None):
            super().__init__(mod)
            self.uses = uses

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name in op_names:
                new = rewrite_call(self.builder_, call, self.uses) if with_uses else rewrite_call(self.builder_, call)
                return call if new is None else new
            return call

    @tvm.transform.module_pass(opt_level=0, name=name)
    def rewrite(mod, _ctx):
        # (on a copy: a module pass gets the caller's module itself, and assigning into it changed it)
        mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                uses = None
                if with_uses:
                    counter = Uses()
                    counter.visit_expr(func)
                    uses = counter.counts
                rw = Rewriter(mod, uses)
                mod[gv] = rw.visit_expr(func)
                # Kernels a rewrite added (builder.add_func) go into the module too.
                have = list(mod.functions)
                for new_gv, new_func in rw.builder_.get().functions.items():
                    if not any(new_gv.same_as(g) for g in have) and not isinstance(new_func, relax.Function):
                        mod[new_gv] = new_func
        return mod

    return rewrite


def _static_shapes(*exprs) -> list[tuple[int, ...]] | None:
    """The static shapes of Relax expressions; None when any is symbolic or unknown."""
    try:
        return [tuple(int(d) for d in e.ty.shape) for e in exprs]
    except (AttributeError, TypeError, ValueError):
        return None


def _conv_operands(call):
    """(attrs, data, weight, data shape, weight shape) of a 2-D convolution call with static
    NCHW shapes, or None."""
    x, w = call.args
    shapes = _static_shapes(x, w)
    if shapes is None or [len(t) for t in shapes] != [4, 4] or call.attrs.data_layout != "NCHW":
        return None
    return call.attrs, x, w, shapes[0], shapes[1]


def _out_dtype(attrs) -> str | None:
    """A call's ``out_dtype`` attribute, None where it is unset (the input's dtype)."""
    return str(attrs.out_dtype) if attrs.out_dtype is not None and str(attrs.out_dtype) else None


def _patches(attrs, kh: int, kw: int) -> bool:
    """Each output pixel reads its own kh x kw patch: strides equal to the kernel, no padding,
    no dilation, no groups."""
    return (
        int(attrs.groups) == 1 and [int(s) for s in attrs.strides] == [kh, kw]
        and not any(int(p) for p in attrs.padding) and all(int(d) == 1 for d in attrs.dilation)
    )  # fmt: skip


def patch_conv_as_matmul():
    """A Relax pass: a ``conv2d`` whose stride equals its kernel, larger than 1x1, with no
    padding, dilation or groups (a ViT's patch embedding, space-to-depth stems) becomes a
    patchify reshape/transpose and one matmul.

    Each output pixel reads its own k x k patch once, so the convolution is a
    ``(pixels, C·k·k) x (C·k·k, O)`` matrix product; as a convolution its stride-k reads left the
    kernel scalar (ViT-S/16's 16x16 patch embedding: 8.3 ms at 14 GFLOP/s on 2 Zen 4 cores).
    """
    return _relax_pass("PatchConvAsMatmul", "relax.nn.conv2d", _patch_conv_as_matmul)


def _patch_conv_as_matmul(bb, call):
    """The rewritten expression for one conv2d call, or None when it does not apply."""
    from tvm import relax

    ops = _conv_operands(call)
    if ops is None:
        return None
    a, x, w, (n, c, h, wd), (o, ci, kh, kw) = ops
    plain = (
        a.kernel_layout == "OIHW" and a.out_layout == "NCHW" and _patches(a, kh, kw)
        and ci == c and kh * kw > 1 and h % kh == 0 and wd % kw == 0
    )  # fmt: skip
    if not plain:
        return None
    hp, wp = h // kh, wd // kw
    out_dtype = _out_dtype(a)
    xp = bb.emit(relax.op.reshape(x, [n, c, hp, kh, wp, kw]))
    xp = bb.emit(relax.op.reshape(relax.op.permute_dims(xp, [0, 2, 4, 1, 3, 5]), [n * hp * wp, c * kh * kw]))
    wm = bb.emit(relax.op.permute_dims(relax.op.reshape(w, [o, c * kh * kw]), [1, 0]))
    y = bb.emit(relax.op.matmul(xp, wm, out_dtype=out_dtype))
    return relax.op.permute_dims(relax.op.reshape(y, [n, hp, wp, o]), [0, 3, 1, 2])


def conv_taps_in_bounds():
    """A Relax pass: a ``conv2d`` some of whose kernel rows or columns only ever read padding (a
    3x3 conv over a map one row high, as text recognizers' necks have once the height is
    pooled away: its top and bottom rows multiply zeros) becomes the conv of the kernel rows and
    columns that read the map, with the padding that keeps every output where it was. A 3x3
    conv over 1x40 computes a third of the products (PP-OCRv4-rec-shaped's neck convs)."""
    return _relax_pass("ConvTapsInBounds", "relax.nn.conv2d", _conv_taps_in_bounds)


def _conv_taps_in_bounds(bb, call):
    from tvm import relax

    ops = _conv_operands(call)
    if ops is None:
        return None
    a, x, w, (n, c, h, wd), (o, ci, kh, kw) = ops
    if a.kernel_layout != "OIHW":
        return None
    taps = _taps_in_bounds(a, h, wd, kh, kw)
    if taps is None:
        return None
    (r0, r1), (c0, c1), padding = taps
    wc = bb.emit(relax.op.strided_slice(w, axes=[2, 3], begin=[r0, c0], end=[r1, c1]))
    return relax.op.nn.conv2d(x, wc, strides=a.strides, padding=padding, dilation=[1, 1],
                              groups=int(a.groups), data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                              out_layout=a.out_layout, out_dtype=_out_dtype(a))  # fmt: skip


def _taps_in_bounds(a, h: int, wd: int, kh: int, kw: int):
    """For a conv of ``kh x kw`` over ``h x wd`` with attributes ``a``: the kernel rows and columns
    that read the map for some output ((r0, r1), (c0, c1)) and the padding that keeps every
    output where it was with only those; None where that is all of them (or dilated)."""
    if any(int(d) != 1 for d in a.dilation):
        return None
    top, left, bottom, right = (int(p) for p in a.padding)
    sy, sx = (int(v) for v in a.strides)
    ho, wo = (h + top + bottom - kh) // sy + 1, (wd + left + right - kw) // sx + 1
    if ho <= 0 or wo <= 0:
        return None

    def used(k, before, size, out, stride):  # taps that read the map for some output
        taps = [r for r in range(k) if any(0 <= y * stride + r - before < size for y in range(out))]
        return (taps[0], taps[-1] + 1) if taps else None

    rows, cols = used(kh, top, h, ho, sy), used(kw, left, wd, wo, sx)
    if rows is None or cols is None or (rows, cols) == ((0, kh), (0, kw)):
        return None
    (r0, r1), (c0, c1) = rows, cols
    top2, left2 = top - r0, left - c0
    bottom2, right2 = (ho - 1) * sy + (r1 - r0) - h - top2, (wo - 1) * sx + (c1 - c0) - wd - left2
    if min(top2, left2, bottom2, right2) < 0:
        return None
    return rows, cols, [top2, left2, bottom2, right2]


def qparams_as_tensors():
    """A Relax pass: the scalar constant scale and zero point of a ``quantize`` or ``dequantize``
    become one-element tensors. TVM's legalization writes a scalar constant into the kernel as an
    immediate, so every requantizing epilogue of a QDQ model was a kernel of its own, equal to the
    others of its shape but for its scales; as tensors they are kernel parameters, and kernels
    of one shape are one function (PP-OCRv4 det int8 for ``x86-64-avx512-vnni``: 84 -> 71 kernels,
    its library 1,644,120 -> 1,615,672 bytes).
    A per-tensor ``quantize`` to 8 bits multiplies by the scale's reciprocal
    (``_quantize_compute``) where TVM's divides by the scale, as ``divide_by_constant`` does."""
    return _relax_pass("QParamsAsTensors", ("relax.quantize", "relax.dequantize"), _qparams_as_tensors)


def _qparams_as_tensors(bb, call):
    import tvm
    from tvm import relax

    args = list(call.args)
    changed = False
    for i in (1, 2):
        a = args[i]
        if isinstance(a, tvm.ir.GenericConst) and a.ty.ndim == 0:
            args[i] = relax.const(a.value.numpy().reshape(1))
            changed = True
    a = call.attrs
    one = lambda t: _static_shapes(t) == [(1,)]  # noqa: E731
    if (call.op.name == "relax.quantize" and one(args[1]) and one(args[2]) and str(a.out_dtype) in ("uint8", "int8")
            and str(args[0].ty.dtype) == "float32"):  # fmt: skip
        return bb.call_te(_quantize_compute, args[0], args[1], args[2], str(a.out_dtype), primfunc_name_hint="quantize")
    if not changed:
        return None
    op = relax.op.quantize if call.op.name == "relax.quantize" else relax.op.dequantize
    return op(args[0], args[1], args[2], axis=int(a.axis), out_dtype=str(a.out_dtype))


def _quantize_compute(x, scale, zero_point, dtype: str):
    """``saturate(round(x * (1 / scale)) + zero_point)``: TVM's quantize, but for the division.
    A vector division an element was most of a requantizing epilogue's cost (PP-OCRv4 det int8,
    this and the fake-quantized activations' with ``divide_by_constant``: 0.936x,
    ``scripts/ab_revisions.py``, x86-64-avx512-vnni). The product is within an ulp of the
    quotient, so a value exactly between two steps may round to the other one: onnxruntime's own
    int8 kernels, which requantize by a multiplier, do the same."""
    inv = 1.0 / scale[0]
    return _quantized(lambda *i: x(*i) * inv, x.shape, zero_point, dtype)


def _quantized(value, shape, zero_point, dtype: str):
    """``saturate(round(value) + zero_point)`` to ``dtype``, element by element."""
    import numpy as np
    from tvm import te

    info = np.iinfo(dtype)
    return te.compute(shape, lambda *i: te.max(te.min(te.round(value(*i)) + zero_point[0].astype("float32"),
                                                      float(info.max)), float(info.min)).astype(dtype), name="quantized")  # fmt: skip


def scalars_folded():
    """A Relax pass: the multiplies and adds by scalar constants around a QDQ model's requantizes
    fold into each other, their constants multiplied (or divided) at compile time. A layer of
    PP-OCRv4 det int8 (an int8 conv, its fake-quantized output, a learnable affine ``k * y + d``,
    HardSwish, another affine, the quantize the next conv reads) scaled each element by a
    constant five times; three of them fold away:

    - ``k * fake_quant(x) + d`` (an affine after a fake-quantized activation): the fake quant's
      ``r * s`` becomes ``r * (s * k) + d``, one fused multiply-add;
    - ``(y * k) * c`` and ``(p * (r * k)) * c`` (HardSwish's ``/ 6``, then an affine's scale;
      ONNX's HardSwish imports as ``x * (clip(x + 3, 0, 6) / 6)``): ``y * (k * c)``,
      ``p * (r * (k * c))``;
    - a quantize or fake quant at scale ``s`` of ``y * c + d``, ``y * c`` or ``y + d`` reads
      ``y * (c / s) + d / s`` (``_divided``) and rounds it (``_quantize_prescaled``,
      ``_fake_quant_prescaled``), where it multiplied by ``1 / s`` after the affine;
    - the same of an int8 convolution's output (``int8.int8_compute``, then its bias): the
      convolution's per-channel scales and the bias come divided by ``s``.

    ``scripts/ab_revisions.py HEAD WORKTREE``, x86-64-avx512-vnni: PP-OCRv4 det int8 0.962x and
    0.963x (one thread), 0.974x (two); PP-OCR cls int8 0.982x and 0.985x; det int8's library
    1,611,672 -> 1,599,384 bytes.

    Each operand a rewrite takes has no other use. The folded constants are rounded to float32
    once, so a result may differ from the unfolded one by an ulp or two before its ``round``: a
    value within that of halfway between two steps may round to the other one, as onnxruntime's
    int8 kernels, which requantize by one multiplier, also do. The folded scalars are
    one-element tensors (``_one``: kernel parameters, as ``qparams_as_tensors`` makes the
    quantizes' own), so kernels of one shape are still one function."""
    return _relax_pass("ScalarsFolded", ("relax.multiply", "relax.add", "relax.quantize", "relax.call_tir"),
                       _fold_scalars, with_uses=True)  # fmt: skip


def _const_operand(m, call, scalar: bool):
    """(the other operand, the constant's value) of a binary op with a float32 constant operand
    (``scalar``: a finite one of one element) that does not change the other's shape; else
    (None, None)."""
    import numpy as np

    for a, b in ((0, 1), (1, 0)):
        v = _const(m, call.args[b])
        if v is None or v.dtype != np.float32 or (scalar and (v.size != 1 or not np.isfinite(v).all())):
            continue
        other = call.args[a]
        shapes = _static_shapes(call, other)
        if shapes is not None and shapes[0] == shapes[1] and str(other.ty.dtype) == "float32":
            return other, v
    return None, None


def _scalar_operand(m, call):
    """(the other operand, the float32 value) of a binary op with a one-element float32 constant
    operand that does not change the other's shape; else (None, None)."""
    import numpy as np

    other, v = _const_operand(m, call, scalar=True)
    return (None, None) if other is None else (other, np.float32(v.reshape(())))


def _fake_quant_args(m, expr):
    """The constants (scale, lo, hi, out_scale, out_bias) and input of a ``fake_quant`` kernel
    call (``_fake_quant``, or one this pass folded), else None."""
    import numpy as np
    import tvm

    e = _resolve(m, expr)
    if _op_name(e) != "relax.call_tir" or not isinstance(e.args[0], tvm.ir.GlobalVar):
        return None
    if not e.args[0].name_hint.startswith(FAKE_QUANT) or len(e.args[1].fields) not in (4, 5, 6):
        return None
    x, *consts = e.args[1].fields
    vals = [_const(m, c) for c in consts]
    if any(v is None or v.size != 1 for v in vals):
        return None
    vals = [np.float32(v.reshape(())) for v in vals]
    if len(vals) == 3:
        vals += [vals[0], np.float32(0)]  # r * s + 0
    elif len(vals) == 4:
        vals = [None, *vals]  # (_fake_quant_prescaled: no scale to divide by)
    return x, vals


def _emit_fake_quant(bb, x, s, lo, hi, a, b):
    """A ``fake_quant`` kernel call of ``x`` (``s``: None where ``x`` is already divided by it)."""
    if s is None:
        return bb.call_te(_fake_quant_prescaled, x, *map(_one, (lo, hi, a, b)), primfunc_name_hint=FAKE_QUANT)
    return bb.call_te(_fake_quant_compute, x, *map(_one, (s, lo, hi, a, b)), primfunc_name_hint=FAKE_QUANT)


def _int8_conv_divided(bb, v, uses, s: float):
    """``v``, an int8 convolution's output (``int8.int8_compute``: ``conv2d_int8``, then maybe a
    constant bias added), each used only here, recomputed divided by ``s``: the convolution's
    per-channel scale and the bias divided at compile time. None for anything else."""
    import numpy as np
    import tvm
    from tvm import relax

    if not isinstance(v, relax.Var) or uses.get(v, 0) != 1:
        return None
    e, bias = _resolve(bb, v), None
    if _op_name(e) == "relax.add":
        v, bias = _const_operand(bb, e, scalar=False)
        if not isinstance(v, relax.Var) or uses.get(v, 0) != 1:
            return None
        e = _resolve(bb, v)
    if (_op_name(e) != "relax.call_tir" or not isinstance(e.args[0], tvm.ir.GlobalVar)
            or not e.args[0].name_hint.startswith("conv2d_int8") or len(e.args[1].fields) != 5):  # fmt: skip
        return None
    args = list(e.args[1].fields)  # (activation, weights, zero-point term, scale, zero point): int8._emit
    scale = _const(bb, args[3])
    if scale is None or scale.dtype != np.float32 or scale.ndim != 1:
        return None
    scale = (scale.astype(np.float64) / s).astype(np.float32)
    bias = None if bias is None else (bias.astype(np.float64) / s).astype(np.float32)
    if not _folded(*scale.ravel(), *([] if bias is None else bias.ravel())):
        return None
    conv = _emit_once(bb, uses, relax.call_tir(e.args[0], [*args[:3], relax.const(scale), args[4]], e.ty))
    return conv if bias is None else _emit_once(bb, uses, relax.op.add(conv, relax.const(bias)))


def _one(value):
    """A folded scalar as a one-element float32 tensor: a kernel parameter, where TVM writes a
    0-d constant into the kernel as an immediate (and every layer's kernel would be its own)."""
    import numpy as np
    from tvm import relax

    return relax.const(np.array([value], np.float32))


def _emit_once(bb, uses, expr):
    """``expr`` bound to a new variable, which ``uses`` counts as used once (by the rewrite
    that emits it), so a later rewrite may fold it too."""
    v = bb.emit(expr)
    uses[v] = 1
    return v


def _folded(*values) -> bool:
    """Whether folded constants are finite (and, nonzero, normal floats)."""
    import numpy as np

    v = np.array(values, np.float32)
    return bool(np.isfinite(v).all() and np.all((v == 0) | (np.abs(v) >= np.finfo(np.float32).tiny)))


def _fold_scalars(bb, call, uses):
    import numpy as np
    from tvm import relax

    name = call.op.name
    if name == "relax.quantize":
        return _quantize_folded(bb, call, uses)
    if name == "relax.call_tir":  # a fake quant: its division done by what it reads
        fq = _fake_quant_args(bb, call)
        if fq is None or fq[1][0] is None:
            return None
        x, (s, lo, hi, a, b) = fq
        x = _divided(bb, x, uses, float(s))
        return None if x is None else _emit_fake_quant(bb, x, None, lo, hi, a, b)
    y, c = _scalar_operand(bb, call)
    if y is None or not isinstance(y, relax.Var) or uses.get(y, 0) != 1:
        return None
    fq = _fake_quant_args(bb, y)
    if fq is not None:
        x, (s, lo, hi, a, b) = fq
        a, b = (np.float32(a * c), np.float32(b * c)) if name == "relax.multiply" else (a, np.float32(b + c))
        if not _folded(a, b):
            return None
        return _emit_fake_quant(bb, x, s, lo, hi, a, b)
    inner = _resolve(bb, y)
    if name != "relax.multiply" or _op_name(inner) != "relax.multiply":
        return None
    z, k = _scalar_operand(bb, inner)
    if z is not None:  # (z * k) * c
        return relax.op.multiply(z, _one(k * c)) if _folded(np.float32(k * c)) else None
    return _product_scaled(bb, inner, uses, c)


def _product_scaled(bb, e, uses, c):
    """``e * c`` for ``e = p * (r * k)``, ``k`` a scalar and ``r * k`` used only in ``e``, as
    ``p * (r * (k * c))`` (ONNX's HardSwish imports as ``x * (clip(x + 3, 0, 6) / 6)``): the
    multiply by ``c`` folded into the one by ``k``. None for anything else."""
    import numpy as np
    from tvm import relax

    shapes = _static_shapes(e, *e.args) if _op_name(e) == "relax.multiply" else None
    if shapes is None or len(set(shapes)) != 1:
        return None
    for p, q in ((0, 1), (1, 0)):
        r = e.args[q]
        if isinstance(r, relax.Var) and uses.get(r, 0) == 1 and _op_name(_resolve(bb, r)) == "relax.multiply":
            r, k = _scalar_operand(bb, _resolve(bb, r))
            if r is not None and _folded(np.float32(float(k) * float(c))):
                return relax.op.multiply(e.args[p], _emit_once(bb, uses, relax.op.multiply(r, _one(float(k) * float(c)))))
    return None


def _quantize_folded(bb, call, uses):
    """``quantize(v, s, z)`` as ``_quantize_prescaled`` of ``v / s`` where ``_divided`` computes
    that; else None."""
    import numpy as np
    from tvm import relax

    a = call.attrs
    vals = [_const(bb, v) for v in call.args[1:3]]
    if any(v is None or v.size != 1 for v in vals) or str(a.out_dtype) not in ("uint8", "int8"):
        return None
    s, z = float(vals[0].reshape(())), vals[1].reshape(())
    if not np.isfinite(s) or s == 0:
        return None
    x = _divided(bb, call.args[0], uses, s)
    if x is None:
        return None
    return bb.call_te(_quantize_prescaled, x, relax.const(np.array([z], z.dtype)), str(a.out_dtype),
                      primfunc_name_hint="quantize")  # fmt: skip


def _divided(bb, v, uses, s: float):
    """``v / s``, computed by ``v``'s producers with their constants divided at compile time: an
    int8 convolution (``_int8_conv_divided``), or ``y * c + d``, ``y * c``, ``y + d`` by scalars
    (as ``y * (c / s) + d / s``); each operand used only here. None for anything else."""
    import numpy as np
    from tvm import relax

    x = _int8_conv_divided(bb, v, uses, s)
    if x is not None or not isinstance(v, relax.Var) or uses.get(v, 0) != 1:
        return x
    e, c, d = _resolve(bb, v), np.float32(1), np.float32(0)
    if _op_name(e) == "relax.add":
        y, d = _scalar_operand(bb, e)
        if isinstance(y, relax.Var) and uses.get(y, 0) == 1 and _op_name(_resolve(bb, y)) == "relax.multiply":
            u, k = _scalar_operand(bb, _resolve(bb, y))
            if u is not None:
                y, c = u, k
    elif _op_name(e) == "relax.multiply":
        y, c = _scalar_operand(bb, e)
    else:
        return None
    if y is None:
        return None
    scale, bias = np.float32(float(c) / s), np.float32(float(d) / s)
    if not _folded(scale, bias):
        return None
    x = None
    if c == 1 and isinstance(y, relax.Var) and uses.get(y, 0) == 1:  # (p * (r * k) + d) / s: p * (r * (k / s)) + d / s
        x = _product_scaled(bb, _resolve(bb, y), uses, scale)
    x = _emit_once(bb, uses, relax.op.multiply(y, _one(scale)) if x is None else x)
    return x if d == 0 else _emit_once(bb, uses, relax.op.add(x, _one(bias)))


def _quantize_prescaled(x, zero_point, dtype: str):
    """``saturate(round(x) + zero_point)``: ``_quantize_compute`` of an input its producer already
    divided by the scale (``scalars_folded``)."""
    return _quantized(x, x.shape, zero_point, dtype)


def divide_by_constant():
    """A Relax pass: ``x / c`` by a float32 constant ``c`` is ``x * (1 / c)``, the reciprocal
    computed at compile time. A vector division costs several multiplies on every x86 and Arm
    core (Zen 4's ``vdivps`` on 16 floats: one issued every 5 cycles or so, a multiply two a
    cycle), and HardSwish's ``/ 6`` and a BatchNorm's ``/ sqrt(var)`` that could not fold into a
    convolution (a QDQ model's: the requantize sits between) divide every element of the
    epilogues they are in. Each result is within an ulp or so of the quotient (the reciprocal
    rounded once, the product once): what compilers do under ``-freciprocal-math``. Left as is: a
    constant with a zero, an infinity or a NaN, or whose reciprocal is not a normal float."""
    return _relax_pass("DivideByConstant", "relax.divide", _divide_by_constant)


def _divide_by_constant(bb, call):
    import numpy as np
    from tvm import relax

    c = _const(bb, call.args[1])
    if c is None or c.dtype != np.float32 or str(call.args[0].ty.dtype) != "float32":
        return None
    with np.errstate(divide="ignore", over="ignore"):
        r = (np.float32(1) / c).astype(np.float32)
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(r)) and np.all(np.abs(r) >= np.finfo(np.float32).tiny)):
        return None
    return relax.op.multiply(call.args[0], relax.const(r))


def fake_quant_fused():
    """A Relax pass: ``dequantize(quantize(x, s, z), s, z)`` (a QDQ model's fake-quantized
    activation, where no int8 kernel reads the quantized tensor) as ``clip(round(x / s), qmin - z,
    qmax - z) * s``: the same values (``round(x / s)`` is a whole number, and so are its sums with
    the zero point), without the conversions to the 8-bit type and back, and the zero point's add
    and subtract, in every element of the epilogues that requantize. ``x / s`` is computed as
    ``x * (1 / s)``, as ``_quantize_compute`` does. The scale and the bounds are
    one-element tensors, as ``qparams_as_tensors`` makes them: layers that differ in them share a
    kernel. Only where the quantized tensor has no other use, with one scale and zero point."""
    return _relax_pass("FakeQuantFused", "relax.dequantize", _fake_quant, with_uses=True)


def _fake_quant(bb, call, uses):
    import numpy as np
    from tvm import relax

    m = bb  # the block builder looks bindings up as a mutator does (_resolve, _const)
    q = call.args[0]
    if not isinstance(q, relax.Var) or uses.get(q, 0) != 1:
        return None
    e = _resolve(m, q)
    if _op_name(e) != "relax.quantize" or str(call.attrs.out_dtype) != "float32":
        return None
    dtype = str(e.attrs.out_dtype)
    if dtype not in ("uint8", "int8") or str(e.args[0].ty.dtype) != "float32":
        return None
    vals = [_const(m, a) for a in (e.args[1], e.args[2], call.args[1], call.args[2])]
    if any(v is None or v.size != 1 for v in vals):
        return None
    s, z, s2, z2 = (v.reshape(()) for v in vals)
    if s != s2 or z != z2 or not np.isfinite(s) or s == 0:
        return None
    info = np.iinfo(dtype)
    scale = relax.const(np.array([s], np.float32))
    lo, hi = (relax.const(np.array([float(b) - float(z)], np.float32)) for b in (info.min, info.max))
    return bb.call_te(_fake_quant_compute, e.args[0], scale, lo, hi, primfunc_name_hint=FAKE_QUANT)


#: The name hint of ``fake_quant_fused``'s kernels (``scalars_folded`` finds them by it).
FAKE_QUANT = "fake_quant"


def _fake_quant_compute(x, scale, lo, hi, out_scale=None, out_bias=None):
    """``clip(round(x / scale), lo, hi) * scale``; with ``out_scale`` and ``out_bias``
    (``scalars_folded``), ``clip(round(x / scale), lo, hi) * out_scale + out_bias``."""
    inv = 1.0 / scale[0]
    return _fake_quantized(lambda *i: x(*i) * inv, x.shape, lo, hi, scale if out_scale is None else out_scale, out_bias)


def _fake_quant_prescaled(x, lo, hi, out_scale, out_bias):
    """``clip(round(x), lo, hi) * out_scale + out_bias``: ``_fake_quant_compute`` of an input its
    producer already divided by the scale (``scalars_folded``)."""
    return _fake_quantized(x, x.shape, lo, hi, out_scale, out_bias)


def _fake_quantized(value, shape, lo, hi, out_scale, out_bias=None):
    """``clip(round(value), lo, hi) * out_scale (+ out_bias)``, element by element."""
    from tvm import te

    def step(*i):
        # te.round, as TVM's quantize rounds (relax.op.round's nearbyint was a libm call an element)
        r = te.min(te.max(te.round(value(*i)), lo[0]), hi[0]) * out_scale[0]
        return r if out_bias is None else r + out_bias[0]

    return te.compute(shape, step, name="fake_quant")


def fp16_operands():
    """A Relax pass: every fp32 ``conv2d`` and ``matmul`` reads fp16 operands and accumulates in
    fp32 (``out_dtype``). Constant weights fold to fp16, half their size; an activation's cast
    fuses into the kernel that produces it, which then writes half the bytes. The ops between
    (normalizations, softmax, activations) stay fp32, so inputs, outputs and the numerically
    touchy reductions keep fp32 range. (Relax's ToMixedPrecision does more, in fp16 throughout,
    but refuses the kernels TVM's ONNX importer emits as call_tir.)"""
    return _relax_pass("Fp16Operands", ("relax.nn.conv2d", "relax.matmul"), _fp16_operands)


def _fp16_operands(bb, call):
    from tvm import relax

    x, w = call.args
    if str(x.ty.dtype) != "float32" or str(w.ty.dtype) != "float32":
        return None
    xh, wh = relax.op.astype(x, "float16"), relax.op.astype(w, "float16")
    if call.op.name == "relax.matmul":
        return relax.op.matmul(xh, wh, out_dtype="float32")
    a = call.attrs
    return relax.op.nn.conv2d(xh, wh, a.strides, a.padding, a.dilation, a.groups, a.data_layout,
                              a.kernel_layout, a.out_layout, out_dtype="float32")  # fmt: skip


def softmax_padded_to(lanes: int):
    """A Relax pass: a softmax along an axis that no useful vector divides (a ViT's 197 tokens)
    runs on the input padded to whole vectors of ``lanes`` with a large negative value (so the
    padding's exponentials are 0), then the valid part is sliced out. Its max and sum
    reductions then add in vectors instead of one scalar chain per row."""
    return _relax_pass("SoftmaxPaddedToVectors", "relax.nn.softmax", lambda bb, call: _pad_softmax(bb, call, lanes))


def matmul_weights_padded_to(lanes: int):
    """A Relax pass: a float32 matmul by a constant [K, N] weight whose N no useful vector
    divides (a CTC head's 6625 classes) multiplies by the weight padded with zero columns to
    whole vectors of ``lanes`` at compile time, and slices the valid columns out of the result
    (a slice the epilogue reads in place). The CPU schedule had padded the weight inside the
    kernel on every call (``_pad_vector_axis``: a 3.2 MB copy for PP-OCRv4-rec's head) and
    copied the result out of the padded sums in another pass."""
    return _relax_pass("MatmulWeightsPaddedToVectors", "relax.matmul", lambda bb, call: _pad_matmul_weight(bb, call, lanes))


def _pad_matmul_weight(bb, call, lanes: int):
    import tvm
    from tvm import relax

    x, w = call.args
    if not isinstance(w, tvm.ir.GenericConst) or str(x.ty.dtype) != "float32" or x.ty.shape is None:
        return None
    value = w.value.numpy()
    if value.ndim != 2 or value.dtype != np.float32 or (call.attrs.out_dtype and str(call.attrs.out_dtype) != "float32"):
        return None
    n = value.shape[1]
    big = value.shape[0] * (n + (-n % lanes)) * 4 >= _PANEL_MIN_BYTES  # (padded to whole vectors)
    # A big weight whose columns a smaller vector divides (an ImageNet classifier's 1000: vectors
    # of 10) goes in panels all the same: each k of a tile was 40 bytes of a row 4 KB long.
    if not _worth_padding(n, lanes) and not (big and n % lanes and n >= 8 * lanes):
        return None
    if big:
        return _panel_matmul(bb, x, value, lanes * _PANEL_VECTORS)
    padded = np.zeros((value.shape[0], n + (-n % lanes)), np.float32)
    padded[:, :n] = value
    y = bb.emit(relax.op.matmul(x, relax.const(padded)))
    return relax.op.strided_slice(y, axes=[len(x.ty.shape) - 1], begin=[0], end=[n])


# A constant weight this big (more than L2 holds on most CPUs) is packed in column panels.
_PANEL_MIN_BYTES = 1 << 20
_PANEL_VECTORS = 3  # vectors a panel is wide: the register tile's columns (8 rows x 3 on AVX-512)


def _panel_matmul(bb, x, value, cw: int):
    """``x @ value`` for a big constant ``value`` [K, N], the weight packed at compile time in
    panels of ``cw`` columns ([N/cw, K, cw], zero columns to whole panels): a register tile's
    columns of every k are then one contiguous run, where in [K, N] each k is a row N apart (a
    CTC head's 120 x 6625 weight: 120 rows 26 KB apart, a page each, for one tile). The sums come
    out as [..., N/cw, cw], which is [..., N padded] in memory: a reshape, then the slice.
    PP-OCRv4-rec's head, one core: 0.69 -> 0.57 ms (the kernel alone, in a loop)."""
    from tvm import relax, te

    k, n = value.shape
    npad = n + (-n % cw)
    padded = np.zeros((k, npad), np.float32)
    padded[:, :n] = value
    panels = relax.const(np.ascontiguousarray(padded.reshape(k, npad // cw, cw).transpose(1, 0, 2)))
    lead = list(_static_shapes(x)[0][:-1])

    def compute(a, w):
        r = te.reduce_axis((0, k), "k")
        return te.compute((*lead, npad // cw, cw), lambda *i: te.sum(a[(*i[:-2], r)] * w[i[-2], r, i[-1]], axis=r),
                          name="matmul_panels")  # fmt: skip

    y = bb.emit_te(compute, x, panels, primfunc_name_hint="matmul_panels")
    y = bb.emit(relax.op.reshape(y, (*lead, npad)))
    return relax.op.strided_slice(y, axes=[len(lead)], begin=[0], end=[n])


def _worth_padding(n: int, lanes: int) -> bool:
    """Whether an axis of ``n`` is worth padding to whole vectors of ``lanes``: at least two of
    them, and no divisor of ``n`` above half a vector (a 360-wide axis runs in vectors of 15)."""
    best = next((d for d in range(min(n, lanes), 3, -1) if n % d == 0), 0)
    return n >= 2 * lanes and 2 * best <= lanes


def _f32_softmax(call):
    """(input, its static shape, the softmax axis) of a float32 softmax, or None."""
    x = call.args[0]
    shapes = _static_shapes(x)
    if not shapes or not shapes[0] or str(x.ty.dtype) != "float32":
        return None
    return x, list(shapes[0]), int(call.attrs.axis) % len(shapes[0])


def _pad_softmax(bb, call, lanes: int):
    from tvm import relax

    if (found := _f32_softmax(call)) is None:
        return None
    x, shape, axis = found
    n = shape[axis]
    if not _worth_padding(n, lanes):
        return None
    if axis == len(shape) - 1:
        return None  # softmax_rows takes a row of any length (``_softmax_ragged_rows``): no copies
    width = [0] * (2 * len(shape))
    width[2 * axis + 1] = -n % lanes
    padded = bb.emit(relax.op.nn.pad(x, width, "constant", -1e30))
    y = bb.emit(relax.op.nn.softmax(padded, axis=axis))
    return relax.op.strided_slice(y, axes=[axis], begin=[0], end=[n])


def split_of_concat():
    """A Relax pass: a ``split`` along one axis of a ``concat`` along another, whose parts are
    themselves concats along the split's axis with the same sections (maybe reshaped over later
    axes), becomes one concat a section, of the pieces that section holds. A YOLOv8 head
    concatenates each scale's box and class maps on channels, flattens the pixels, concatenates
    the scales and splits boxes from classes again; TVM fused that into one kernel whose every
    element chose its source through nested conditions and divisions (0.33 ms of YOLOv8n-320 on 2
    Zen 4 cores, a 1.2 MB copy)."""
    return _relax_pass("SplitOfConcat", "relax.split", _split_of_concat)


def concat_within(max_buffers: int):
    """A Relax pass: a ``concat`` or ``stack`` of more inputs than a kernel may bind
    (``max_buffers`` storage buffers, the output included: WebGPU's default is 8) becomes a tree
    of them that each fit (a stack's groups stacked, then concatenated along its axis).
    ``kernels_within`` then keeps fusion from joining them again."""
    return _relax_pass("ConcatWithin", ("relax.concat", "relax.stack"),
                       lambda bb, call: _concat_within(bb, call, max_buffers - 1))  # fmt: skip


def _concat_within(bb, call, per_kernel: int):
    from tvm import relax

    items = call.args[0]
    if per_kernel < 2 or not isinstance(items, relax.Tuple) or len(items.fields) <= per_kernel:
        return None
    axis = int(call.attrs.axis)
    fields = list(items.fields)
    stacked = call.op.name == "relax.stack"
    while len(fields) > per_kernel:
        groups = [fields[i : i + per_kernel] for i in range(0, len(fields), per_kernel)]
        if stacked:
            fields = [bb.emit(relax.op.stack(g, axis)) for g in groups]
            stacked = False
        else:
            fields = [bb.emit(relax.op.concat(g, axis)) if len(g) > 1 else g[0] for g in groups]
    return relax.op.stack(fields, axis) if stacked else relax.op.concat(fields, axis)


def kernels_within(max_buffers: int):
    """A Relax pass between ``FuseOps`` and ``FuseTIR``: a fused group whose kernel would bind more
    than ``max_buffers`` storage buffers (its tensor parameters, constants and outputs) is
    inlined back into its caller, so each of its ops becomes a kernel of its own. Fusion does not
    count buffers; a GPU API with a per-kernel limit (WebGPU: 8) refuses such a kernel."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KernelsWithin")
    def run(mod, _ctx):
        over = [gv for gv, f in mod.functions.items()
                if isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs
                and _fused_buffers(f) > max_buffers]  # fmt: skip
        if not over:
            return mod
        # InlinePrivateFunctions inlines every private function: the groups that fit are made
        # public for the moment, and private again after.
        keep = {}
        for gv, f in mod.functions.items():
            if isinstance(f, relax.Function) and gv not in over and (f.attrs is None or "global_symbol" not in f.attrs):
                keep[gv] = f
                mod[gv] = f.with_attr("global_symbol", gv.name_hint)
        mod = relax.transform.InlinePrivateFunctions()(mod)
        for gv, f in keep.items():
            mod[gv] = f
        return mod

    return run


def _fused_buffers(func) -> int:
    """Storage buffers a fused group's kernel binds: tensor parameters, constants, outputs."""
    import tvm
    from tvm import relax

    n = sum(isinstance(p.ty, relax.TensorType) for p in func.params)
    out = func.ret_ty
    n += len(out.fields) if isinstance(out, relax.TupleType) else 1
    consts = set()
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call):
                for a in b.value.args:
                    for x in a.fields if isinstance(a, relax.Tuple) else [a]:
                        if isinstance(x, tvm.ir.expr.Constant):
                            consts.add(x)
    return n + len(consts)


_AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def conv_affine_folded():
    """A Relax pass: per-output-channel constants applied to a convolution's output (an unfused
    BatchNorm's subtract, divide, multiply and add; a bias) fold into its weights and one bias:
    ``conv(x, W) * s + t`` becomes ``conv(x, W * s) + t``. Each folded constant was a separate
    buffer the kernel read (PP-OCR cls's conv kernels bound 9 buffers, over WebGPU's limit of 8
    storage buffers a kernel; now 6) and arithmetic per output. Only where the convolution's
    output has no other use."""
    return _relax_pass("ConvAffineFolded", _AFFINE_OPS, _fold_conv_affine, with_uses=True)


def _channel_const(e, channels: int):
    """A constant that broadcasts over a conv's NCHW output per channel (or a scalar): as a
    ``[channels]`` float64 array, else None."""
    from tvm.ir.expr import Constant

    if not isinstance(e, Constant):
        return None
    v = e.value.numpy()
    if v.dtype.kind != "f" or v.ndim > 4 or v.size not in (1, channels):
        return None
    shape = (1,) * (4 - v.ndim) + v.shape
    if v.size > 1 and shape != (1, channels, 1, 1):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,))


def _fold_conv_affine(bb, call, uses):
    """``op(conv2d(x, W) [+ b], c)`` with constants W, b, c per channel: ``conv2d(x, W') + b'``."""
    from tvm import relax
    from tvm.ir.expr import Constant

    op = call.op.name
    a, c = call.args
    if op in ("relax.add", "relax.multiply") and isinstance(a, Constant):
        a, c = c, a
    if not isinstance(a, relax.Var) or uses.get(a, 0) != 1:
        return None
    bias = None
    conv = _bound_call(bb, a, "relax.nn.conv2d")
    if conv is None and (add := _bound_call(bb, a, "relax.add")) is not None:
        conv_var, bias = add.args
        if isinstance(conv_var, relax.Var) and uses.get(conv_var, 1) == 1:  # (unknown: this pass emitted it)
            conv = _bound_call(bb, conv_var, "relax.nn.conv2d")
    if conv is None or not isinstance(conv.args[1], Constant):
        return None
    at = conv.attrs
    if (at.data_layout, at.kernel_layout, at.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    w = conv.args[1].value.numpy()
    if w.dtype not in (np.float32, np.float16):
        return None
    o = w.shape[0]
    k = _channel_const(c, o)
    t = np.zeros(o) if bias is None else _channel_const(bias, o)
    if k is None or t is None or (op == "relax.divide" and not np.all(k)):
        return None
    scale = {"relax.multiply": k, "relax.divide": 1.0 / k}.get(op, np.ones(o))
    shift = {"relax.add": t + k, "relax.subtract": t - k}.get(op, t * scale)
    new_w = relax.const((w.astype(np.float64) * scale[:, None, None, None]).astype(w.dtype))
    out = bb.emit(relax.Call(conv.op, [conv.args[0], new_w], conv.attrs))
    # (the bias in the output's dtype: a conv of fp16 operands may accumulate into float32)
    return relax.op.add(out, relax.const(shift.reshape(1, o, 1, 1).astype(str(out.ty.dtype))))


def _bound_call(bb, e, op: str):
    """The call of ``op`` that ``e`` is, or a variable ``e`` is bound to; else None."""
    import tvm
    from tvm import relax

    while isinstance(e, relax.Var):
        e = bb.lookup_binding(e)
    return e if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == op else None


def _split_of_concat(bb, call):
    """The split's sections as concats of the pieces, or None when it does not apply."""
    import tvm
    from tvm import relax

    x = call.args[0]
    shapes = _static_shapes(x)
    cat = _bound_call(bb, x, "relax.concat")
    sections = call.attrs.indices_or_sections
    if shapes is None or cat is None or isinstance(sections, tvm.tirx.IntImm):
        return None
    a = int(call.attrs.axis) % len(shapes[0])
    b = int(cat.attrs.axis) % len(shapes[0])
    bounds = [0, *[int(i) for i in sections], shapes[0][a]]
    if a == b or not isinstance(cat.args[0], relax.Tuple):
        return None
    pieces = []  # per part: its inner operands, each reshaped like the part
    for part in cat.args[0].fields:
        shape = _static_shapes(part)
        inner = _bound_call(bb, part, "relax.concat")
        reshape = None
        if inner is None and (rs := _bound_call(bb, part, "relax.reshape")) is not None:
            reshape, inner = rs, _bound_call(bb, rs.args[0], "relax.concat")
        if shape is None or inner is None or not isinstance(inner.args[0], relax.Tuple):
            return None
        src = _static_shapes(*inner.args[0].fields)
        before = _static_shapes(reshape.args[0]) if reshape is not None else [shape[0]]
        if (src is None or before is None or int(inner.attrs.axis) % len(before[0]) != a
                or list(before[0][: a + 1]) != list(shape[0][: a + 1])):  # fmt: skip
            return None
        if [0, *[sum(t[a] for t in src[: i + 1]) for i in range(len(src))]] != bounds:
            return None
        pieces.append([q if reshape is None else relax.op.reshape(q, [*shape[0][:a], t[a], *shape[0][a + 1:]])
                       for q, t in zip(inner.args[0].fields, src)])  # fmt: skip
    return relax.Tuple([bb.emit(relax.op.concat([p[t] for p in pieces], axis=b)) for t in range(len(bounds) - 1)])


def conv_transpose_as_conv():
    """A Relax pass: a ``conv2d_transpose`` whose stride equals its kernel (the 2x2/stride-2
    upsampling of detectors and U-Nets) becomes a 1x1 ``conv2d`` and a pixel shuffle.

    Legalized as is, such a layer dilates its input with zeros and convolves over them: three
    quarters of the multiply-adds and a zero-filled copy four times the input's size are waste,
    and its kernel was the slowest in PP-OCR det. Each output pixel takes exactly one tap, so
    ``y[n, o, i*kh+a, j*kw+b] = sum_c x[n, c, i, j] * w[c, o, a, b]``: a 1x1 convolution with
    ``o*kh*kw`` output channels, then a reshape/transpose. Weight permutes fold as constants.
    """
    return _relax_pass("ConvTransposeAsConv", "relax.nn.conv2d_transpose", _conv_transpose_as_conv)


def _conv_transpose_as_conv(bb, call):
    """The rewritten expression for one conv2d_transpose call, or None when it does not apply."""
    from tvm import relax

    ops = upsampling_operands(call)
    if ops is None:
        return None
    a, x, w, (n, ci, h, wd), (_, co, kh, kw) = ops
    w2 = bb.emit(relax.op.reshape(relax.op.permute_dims(w, [1, 2, 3, 0]), [co * kh * kw, ci, 1, 1]))
    out_dtype = _out_dtype(a)
    return pixel_shuffle(bb, bb.emit(relax.op.nn.conv2d(x, w2, out_dtype=out_dtype)), (n, co, kh, kw, h, wd))


def upsampling_operands(call):
    """``_conv_operands`` of a conv2d_transpose that ``conv_transpose_as_conv`` rewrites (stride
    equal to the kernel, no padding, IOHW weight, NCHW output), or None."""
    ops = _conv_operands(call)
    if ops is None:
        return None
    a, _, _, (_, ci, _, _), (wi, _, kh, kw) = ops
    plain = (
        a.kernel_layout == "IOHW" and a.out_layout == "NCHW" and _patches(a, kh, kw)
        and wi == ci and not any(int(p) for p in a.output_padding)
    )  # fmt: skip
    return ops if plain else None


def pixel_shuffle(bb, z, dims):
    """The upsampled map from the 1x1 convolution ``z`` of ``conv_transpose_as_conv``, its
    ``co*kh*kw`` channels interleaved into kh x kw blocks; ``dims`` = (n, co, kh, kw, h, w)."""
    from tvm import relax

    n, co, kh, kw, h, wd = dims
    z = bb.emit(relax.op.permute_dims(relax.op.reshape(z, [n, co, kh, kw, h, wd]), [0, 1, 4, 2, 5, 3]))
    return relax.op.reshape(z, [n, co, h * kh, wd * kw])


# -- int8 weights ------------------------------------------------------------------------------

#: The stage of a conv2d_int8w kernel that dequantizes the weight: the CPU schedules run it on its
#: own (the whole weight, once a call) rather than inline in the convolution's inner loop.
DEQUANTIZE_STAGE = "dequantize_weight"
#: The stage of a Winograd output transform that computes each tile's 2x2 outputs
#: (``_conv_winograd``): the CPU schedules keep it a stage of its own, not inlined.
WINOGRAD_TILES_STAGE = "winograd_output_tiles"
#: TVM's OpPatternKind of conv2d and matmul (relay/op_attr_types.h: kOutEWiseFusable).
_OUT_ELEMWISE_FUSABLE = 4
#: A matmul of at least this many rows by an int8 weight dequantizes the weight once a call, as a
#: stage of its own, and multiplies in fp32; with fewer, it dequantizes as it reads. Inline, each
#: tile of rows dequantizes the whole weight again: the int8 MiniLM-L6 (``scripts/ab_revisions.py``)
#: at 8x128 0.684x with the stage, at 1x128 0.934x; at 1x64 1.057x and 1x32 1.458x (the threshold
#: lowered to 16 rows), so inline there.
_DEQUANTIZE_ONCE_ROWS = 128
#: Smaller int8 constants are left to constant folding: the call overhead is not worth a few bytes.
_INT8_MIN_ELEMENTS = 1024


def int8_weights():
    """A Relax pass, before constant folding: weights stored as int8 stay int8 in the artifact.

    A quantized model keeps its weights as int8 constants and dequantizes them in the graph (a QDQ
    model's ``DequantizeLinear``, or a ``Cast`` and ``Mul`` by a scale). Constant folding would
    turn each into an fp32 constant four times the size. For a ``conv2d``, a ``matmul`` (also of a
    transposed weight, as Gemm imports) or a ``take`` (an embedding table) whose weight is such a
    dequantization, the call becomes one kernel that reads the int8 weight and dequantizes each
    element as it reads it, ``(float(q) - zero_point) * scale`` — the value constant folding would
    have stored, so the results are the same. The CPU schedules inline it into a take's loop, and
    into a matmul's of fewer than ``_DEQUANTIZE_ONCE_ROWS`` rows, like any cast; a convolution, and
    a matmul of more rows, dequantize the weight as a stage of their own (``DEQUANTIZE_STAGE``),
    the whole weight once a call, and compute as fp32 ones do.
    """
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            new = None
            try:
                if call.op.name == "relax.nn.conv2d":
                    new = _int8_conv2d(self, call)
                elif call.op.name == "relax.matmul":
                    new = _int8_matmul(self, call)
                elif call.op.name == "relax.take":
                    new = _int8_take(self, call)
            except _NotInt8:
                new = None
            return call if new is None else new

    @tvm.transform.module_pass(opt_level=0, name="Int8Weights")
    def rewrite(mod, _ctx):
        rewriter = Rewriter(mod)
        new = {gv: rewriter.visit_expr(f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
        out = rewriter.builder_.get()  # holds the kernels call_te added
        for gv, func in new.items():
            out[gv] = func
        return out

    return rewrite


class _NotInt8(Exception):
    pass


class _Dequant:
    """An int8 weight and how it dequantizes: ``(q - zero_point) * scale``, the scale and zero
    point as numpy arrays that broadcast against ``q`` (numpy's rules)."""

    def __init__(self, q, scale, zero_point):
        self.q, self.scale, self.zero_point = q, scale, zero_point

    def te_value(self, qt, st, zt, idx):
        """The dequantized float at index ``idx`` of te tensors (q, scale, zero point)."""
        def bidx(t, shape):
            off = len(idx) - len(shape)
            return [0 if int(shape[d]) == 1 else idx[off + d] for d in range(len(shape))] if shape else []

        v = qt(*idx).astype("int32")
        if zt is not None:
            v = v - zt(*bidx(zt, self.zero_point.shape)).astype("int32")
        return v.astype("float32") * st(*bidx(st, self.scale.shape))


def _op_name(expr) -> str:
    """The name of the op ``expr`` calls ("relax.add", "relax.call_tir"…), or "" for anything else."""
    return getattr(getattr(expr, "op", None), "name", "")


def _resolve(m, expr):
    from tvm import relax

    while isinstance(expr, relax.Var):
        bound = m.lookup_binding(expr)
        if bound is None:
            return expr
        expr = bound
    return expr


def constant_array(expr):
    """The numpy value of a constant expression (an initializer, a folded value), or None for
    anything computed at run time."""
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _const(m, expr):
    """The numpy value of a constant expression (through variable bindings), or None."""
    return constant_array(_resolve(m, expr))


def _dequant_of(m, expr, min_elements: int = _INT8_MIN_ELEMENTS) -> _Dequant:
    """The dequantization ``expr`` computes from an int8 constant of at least ``min_elements``,
    else raises _NotInt8."""
    import numpy as np

    e = _resolve(m, expr)
    if not hasattr(e, "op") or not hasattr(e.op, "name"):
        raise _NotInt8
    if e.op.name == "relax.dequantize":
        q, s, z = (_const(m, a) for a in e.args[:3])
        if q is None or s is None or z is None or str(e.attrs.out_dtype) != "float32":
            raise _NotInt8
        axis = int(e.attrs.axis) % q.ndim
        shape = [q.shape[axis] if d == axis else 1 for d in range(q.ndim)]
        s = s.reshape(shape) if s.size > 1 else s.reshape(())
        z = z.reshape(shape) if z.size > 1 else z.reshape(())
        d = _Dequant(q, s.astype("float32"), None if not z.any() else z)
    elif e.op.name == "relax.multiply":
        a, b = e.args
        s = _const(m, b)
        cast = _resolve(m, a)
        if s is None:
            s, cast = _const(m, a), _resolve(m, b)
        if s is None or not hasattr(cast, "op") or getattr(cast.op, "name", "") != "relax.astype":
            raise _NotInt8
        q = _const(m, cast.args[0])
        if q is None or str(cast.attrs.dtype) != "float32" or s.dtype != np.float32:
            raise _NotInt8
        d = _Dequant(q, s, None)
    else:
        raise _NotInt8
    q = d.q
    if q.dtype not in (np.int8, np.uint8) or q.size < min_elements:
        raise _NotInt8
    try:  # the scale must not add dimensions or change the weight's shape
        if np.broadcast_shapes(q.shape, d.scale.shape) != q.shape or d.scale.ndim > q.ndim:
            raise _NotInt8
    except ValueError:
        raise _NotInt8 from None
    return d


def _emit_int8(m, name: str, compute, data_args, dq: _Dequant, key):
    """call_te of ``compute(*data te tensors, dequant(idx))`` with the int8 weight as an argument;
    calls with the same ``key`` and argument types share one kernel (call_te makes one a call)."""
    from tvm import relax

    q = relax.const(dq.q)
    s = relax.const(dq.scale)
    args = [*data_args, q, s] + ([relax.const(dq.zero_point)] if dq.zero_point is not None else [])
    full_key = (name, key, tuple((tuple(a.ty.shape), str(a.ty.dtype)) for a in args))
    cache = m.__dict__.setdefault("_int8_kernels", {})
    if full_key in cache:
        gv, out_ty = cache[full_key]
        return relax.call_tir(gv, args, out_ty)

    def fn(*ts):
        data, (qt, st, *zt) = ts[: len(data_args)], ts[len(data_args):]
        return compute(*data, lambda idx: dq.te_value(qt, st, zt[0] if zt else None, idx), qt.shape)

    out = m.builder_.call_te(fn, *args, primfunc_name_hint=name)
    # Fused like the op it replaces: epilogues (bias, activation) in, producers not. Left to
    # AnnotateTIROpPattern, the dequantizing body reads as a plain reduction, and a GELU before
    # it was fused inside, recomputed for every output column (14 ms of MiniLM-L6's 21).
    gv = out.args[0]
    func = m.builder_.get()[gv]
    m.builder_.update_func(gv, func.with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE))
    cache[full_key] = (gv, list(out.ty_args))
    return out


def _int8_conv2d(m, call):
    from tvm import te, topi

    a = call.attrs
    if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW":
        return None
    dq = _dequant_of(m, call.args[1])
    out_dtype = _out_dtype(a)
    padding = [int(p) for p in a.padding]
    shapes = _static_shapes(call.args[0])
    taps = _taps_in_bounds(a, *shapes[0][2:], *dq.q.shape[2:]) if shapes and len(shapes[0]) == 4 else None
    if taps is not None:
        # Only the kernel rows and columns that read the map, as ``conv_taps_in_bounds`` does
        # for an fp32 conv (that pass runs after this one, and this call is a kernel by then):
        # PP-OCR cls's 5x5 depthwise convs over maps two rows high, 3x5.
        (r0, r1), (c0, c1), padding = taps
        cut = lambda v: v[:, :, r0:r1, c0:c1] if v is not None and v.ndim == 4 and v.shape[2:] != (1, 1) else v  # noqa: E731
        dq = _Dequant(np.ascontiguousarray(dq.q[:, :, r0:r1, c0:c1]), cut(dq.scale), cut(dq.zero_point))

    def compute(x, value, wshape):
        w = te.compute(wshape, lambda *i: value(list(i)), name=DEQUANTIZE_STAGE)
        ints = lambda v: [int(i) for i in v]  # noqa: E731
        return topi.nn.conv(x, w, ints(a.strides), padding, ints(a.dilation), int(a.groups), "NCHW", "OIHW",
                            out_dtype)  # fmt: skip

    return _emit_int8(m, "conv2d_int8w", compute, [call.args[0]], dq, f"{a} {padding}")


def _int8_matmul(m, call):
    from tvm import te

    x, w = call.args
    transposed = False
    we = _resolve(m, w)
    if hasattr(we, "op") and getattr(we.op, "name", "") == "relax.permute_dims":
        axes = we.attrs.axes
        if axes is not None and [int(i) for i in axes] != [1, 0]:
            return None
        transposed, w = True, we.args[0]
    dq = _dequant_of(m, w)
    xs = _static_shapes(x)
    if dq.q.ndim != 2 or xs is None or len(xs[0]) < 2:
        return None
    out_dtype = _out_dtype(call.attrs) or "float32"
    if str(x.ty.dtype) != "float32" or out_dtype not in ("float32", "void"):
        return None

    staged = int(np.prod(xs[0][:-1])) >= _DEQUANTIZE_ONCE_ROWS

    def compute(xt, value, wshape):
        k_ext = wshape[1] if transposed else wshape[0]
        n_ext = wshape[0] if transposed else wshape[1]
        k = te.reduce_axis((0, k_ext), name="k")
        if staged:
            wf = te.compute([k_ext, n_ext], lambda kk, nn: value([nn, kk] if transposed else [kk, nn]), name=DEQUANTIZE_STAGE)
            weight = lambda n: wf[k, n]  # noqa: E731
        else:
            weight = lambda n: value([n, k] if transposed else [k, n])  # noqa: E731

        def body(*i):
            return te.sum(xt(*i[:-1], k) * weight(i[-1]), axis=k)

        return te.compute([*xt.shape[:-1], n_ext], body, name="matmul")

    return _emit_int8(m, "matmul_int8w", compute, [x], dq, (transposed, staged))


def _int8_take(m, call):
    from tvm import te

    table, idx = call.args
    axis = call.attrs.axis
    dq = _dequant_of(m, table)
    if dq.q.ndim != 2 or (axis is not None and int(axis) % 2 != 0):
        return None
    ishape = _static_shapes(idx)
    if ishape is None or "int" not in str(idx.ty.dtype):
        return None
    rows = dq.q.shape[0]
    mode = str(getattr(call.attrs, "mode", "fast"))

    def compute(it, value, wshape):
        def body(*i):
            r = it(*i[:-1]).astype("int64")
            if mode == "wrap":
                r = te.floormod(r, rows)
            else:  # "clip", and "fast" (unchecked there: an index out of range is clipped here)
                r = te.max(te.min(r, rows - 1), 0)
            return value([r, i[-1]])

        return te.compute([*it.shape, wshape[1]], body, name="take")

    return _emit_int8(m, "take_int8w", compute, [idx], dq, mode)


def legalize_overrides() -> dict:
    """LegalizeOps replacements where TVM's own kernel is wrong: float max and min reductions
    start from ∓inf, not the type's finite limit (TVM's), so a row of -inf reduces to -inf (an
    attention row masked out entirely is recognised by exactly that)."""
    return {"relax.max": _extremum("max"), "relax.min": _extremum("min"), "relax.cosh": _hyperbolic("cosh"),
            "relax.sinh": _hyperbolic("sinh"), "relax.topk": _topk, "relax.cumsum": _scan("cumsum"),
            "relax.cumprod": _scan("cumprod")}  # fmt: skip


def fast_sigmoid(bb, call):
    """sigmoid(x) = 1 / (1 + exp(-x)) with TVM's vectorizable polynomial exp (``topi.fast_exp``,
    the one FastMathTransform puts in place of exp; it clamps its argument, so large |x| give 0
    and 1): YOLOv8n-320 2.00x -> 1.45x onnxruntime (README, Benchmark). float32 only."""
    from tvm import te, tirx, topi

    x = call.args[0]
    if str(x.ty.dtype) != "float32":
        return bb.call_te(topi.sigmoid, x, primfunc_name_hint="sigmoid")

    def compute(t):
        e = topi.fast_exp(te.compute(t.shape, lambda *i: -t(*i), name="neg"))
        one = tirx.const(1.0, "float32")
        return te.compute(t.shape, lambda *i: one / (one + e(*i)), name="sigmoid")

    return bb.call_te(compute, x, primfunc_name_hint="sigmoid")


def _scan(kind: str):
    """cumsum and cumprod (no legalization registered in TVM 0.27): topi's scan kernels."""

    def legalize(bb, call):
        from tvm import topi

        a = call.attrs
        dtype = str(a.dtype) if a.dtype is not None and str(a.dtype) else None
        axis = int(a.axis) if a.axis is not None else None
        return bb.call_te(getattr(topi, kind), call.args[0], axis, dtype, bool(a.exclusive), primfunc_name_hint=kind)

    return legalize


def _hyperbolic(kind: str):
    """cosh and sinh from exp (LLVM has no intrinsic TVM can lower them to)."""
    from tvm import te, tirx

    def legalize(bb, call):
        def compute(x):
            def body(*i):
                e, ne = tirx.exp(x(*i)), tirx.exp(-x(*i))
                half = tirx.const(0.5, x.dtype)
                return (e + ne) * half if kind == "cosh" else (e - ne) * half

            return te.compute(x.shape, body, name=kind)

        return bb.call_te(compute, call.args[0], primfunc_name_hint=kind)

    return legalize


def _topk(bb, call):
    """TopK (TVM 0.27 registers no legalization for relax.topk): topi's sort-based kernel."""
    from tvm import relax, topi

    a = call.attrs
    ret = str(a.ret_type)
    out = bb.call_te(topi.topk, call.args[0], int(a.k), int(a.axis), ret, not bool(a.largest), str(a.dtype),
                     primfunc_name_hint="topk")  # fmt: skip
    if ret == "both":
        return out
    return relax.TupleGetItem(out, 0) if isinstance(out.ty, relax.TupleType) else out


def _extremum(kind: str):
    import tvm
    from tvm import te, tirx

    default = tvm.ir.Op.get(f"relax.{kind}").get_attr("FLegalize")

    def legalize(bb, call):
        x = call.args[0]
        shape = _static_shapes(x)
        dtype = str(x.ty.dtype)
        if shape is None or not dtype.startswith(("float", "bfloat")) or 0 in shape[0]:
            return default(bb, call)
        ndim = len(shape[0])
        axes = [int(a) % ndim for a in call.attrs.axis] if call.attrs.axis is not None else list(range(ndim))
        keep = bool(call.attrs.keepdims)
        inf = float("-inf") if kind == "max" else float("inf")
        combine = tirx.max if kind == "max" else tirx.min
        reducer = te.comm_reducer(lambda a, b: combine(a, b), lambda t: tirx.const(inf, t), name=f"{kind}_from_inf")

        def compute(data):
            out_shape = [1 if d in axes else n for d, n in enumerate(shape[0]) if keep or d not in axes]
            rs = [te.reduce_axis((0, shape[0][d]), name=f"k{d}") for d in axes]

            def body(*idx):
                it = iter(idx)
                full, r = [], iter(rs)
                for d in range(ndim):
                    if d in axes:
                        if keep:
                            next(it)
                        full.append(next(r))
                    else:
                        full.append(next(it))
                return reducer(data[tuple(full)], axis=rs)

            return te.compute(out_shape, body, name=f"{kind}_reduce")

        return bb.call_te(compute, x, primfunc_name_hint=kind)

    return legalize


def layer_norm_rows(lanes: int):
    """LayerNorm over the last axis as one kernel per row, parallel over rows: the mean and the
    variance each one vectorized pass over the row (``rfactor`` into ``lanes`` partial sums), then
    the normalized row, all while the row is in cache. TVM's own (topi) kernel, scheduled by the
    default heuristics, padded the rows to a tile (two copies of the input) and ran its reductions
    on one thread: ViT-S/16's 25 LayerNorms took 1.38 ms."""

    def legalize(bb, call):
        import tvm
        from tvm import relax, s_tir, te, tirx

        default = tvm.ir.Op.get("relax.nn.layer_norm").get_attr("FLegalize")
        x, gamma, beta = call.args
        shapes = _static_shapes(x, gamma, beta)
        a = call.attrs
        if shapes is None or str(x.ty.dtype) != "float32" or not a.center or not a.scale:
            return default(bb, call)
        shape = shapes[0]
        axes = [int(v) % len(shape) for v in a.axes]
        c = shape[-1] if shape else 0
        if axes != [len(shape) - 1] or shapes[1] != (c,) or shapes[2] != (c,) or c % lanes or c == 0:
            return default(bb, call)
        rows = 1
        for d in shape[:-1]:
            rows *= d
        inv, eps = 1.0 / c, float(a.epsilon)
        X = te.placeholder((rows, c), "float32", "x")
        G = te.placeholder((c,), "float32", "gamma")
        B = te.placeholder((c,), "float32", "beta")
        k1 = te.reduce_axis((0, c), "k1")
        s1 = te.compute((rows,), lambda r: te.sum(X[r, k1], axis=k1), "ln_sum")
        k2 = te.reduce_axis((0, c), "k2")
        s2 = te.compute((rows,), lambda r: te.sum((X[r, k2] - s1[r] * inv) * (X[r, k2] - s1[r] * inv), axis=k2), "ln_var")
        Y = te.compute((rows, c), lambda r, j: (X[r, j] - s1[r] * inv) * tirx.rsqrt(s2[r] * inv + eps) * G[j] + B[j],
                       "ln_out")  # fmt: skip
        sch = s_tir.Schedule(te.create_prim_func([X, G, B, Y]))
        y = _row_kernel(bb, sch, "ln_out", ("ln_sum", "ln_var"), lanes, "layer_norm_rows", [x, gamma, beta], rows, c)
        return relax.op.reshape(y, shape)

    return legalize


def softmax_rows(lanes: int):
    """A Relax pass: a float32 softmax over the last axis whose length is a whole number of
    vectors (after ``softmax_padded_to``) becomes one row-parallel kernel: the row's max and its
    sum of exponentials each one vectorized pass (``rfactor`` into ``lanes`` partials), then the
    normalized row, while the row is in cache; exp is TVM's fast polynomial form, as
    ``FastMathTransform`` gives the rest of the model."""
    return _relax_pass("SoftmaxRows", "relax.nn.softmax", lambda bb, call: _softmax_rows(bb, call, lanes))


def _softmax_rows(bb, call, lanes: int):
    from tvm import relax, s_tir, te, topi

    if (found := _f32_softmax(call)) is None:
        return None
    x, shape, axis = found
    if axis != len(shape) - 1 or shape[-1] < 2 * lanes:
        return None
    c = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if c % lanes:
        return _softmax_ragged_rows(bb, x, shape, rows, c, lanes)
    # softmax(scores + mask), the mask broadcast over the leading axes (attention's causal or
    # padding mask): the add is done in the kernel's passes instead of as a kernel of its own.
    masked = _broadcast_add(bb, x, shape)
    X = te.placeholder((rows, c), "float32", "x")
    if masked is not None:
        x, mask, mrows = masked
        Mk = te.placeholder((mrows, c), "float32", "mask")
        Xm = te.compute((rows, c), lambda r, j: X[r, j] + Mk[r % mrows, j], "sm_masked")
    else:
        Xm = X
    k1 = te.reduce_axis((0, c), "k1")
    M = te.compute((rows,), lambda r: te.max(Xm[r, k1], axis=k1), "sm_max")
    E = topi.fast_exp(te.compute((rows, c), lambda r, j: Xm[r, j] - M[r], "sm_shift"))
    k2 = te.reduce_axis((0, c), "k2")
    S = te.compute((rows,), lambda r: te.sum(E[r, k2], axis=k2), "sm_sum")
    Y = te.compute((rows, c), lambda r, j: E[r, j] / S[r], "sm_out")
    sch = s_tir.Schedule(te.create_prim_func([X, Mk, Y] if masked is not None else [X, Y]))
    for name in ("sm_shift", E.op.name) + (("sm_masked",) if masked is not None else ()):
        sch.compute_inline(sch.get_sblock(name))  # recomputed where read: cheap vector passes
    args = [x] + ([bb.normalize(relax.op.reshape(mask, (mrows, c)))] if masked is not None else [])
    y = _row_kernel(bb, sch, "sm_out", ("sm_max", "sm_sum"), lanes, "softmax_rows", args, rows, c)
    return relax.op.reshape(y, shape)


def _fexp(x):
    """exp as TVM's ``topi.fast_exp`` computes it (Cephes' polynomial; within 4.1e-6 relative),
    an expression that vectorizes."""
    from tvm import tirx

    def f32(v):
        return tirx.const(v, "float32")

    xc = tirx.max(tirx.min(x, f32(88.3762626647950)), f32(-88.3762626647949))
    n = tirx.floor(xc * f32(1.44269504088896341) + f32(0.5))
    fr = xc - n * f32(0.6931471805599453)
    y = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * fr + f32(c)
    y = y * fr * fr + fr + f32(1.0)
    scale = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return tirx.max(scale * y, x)


def _softmax_ragged_rows(bb, x, shape, rows: int, c: int, lanes: int):
    """Softmax over rows of ``c`` that no vector divides (a CTC head's 6625 classes), written by
    hand: per row, its max in ``lanes`` partials, then each exponential computed once, stored in
    the output and summed, then the row scaled by the sum's inverse, each pass whole vectors with
    a scalar tail. A broadcast add before it (a mask, or a Gemm's bias) is done in its passes, as
    ``softmax_rows`` does. It replaces padding the input to whole vectors (a copy), the padded
    softmax and the slice out of it (another copy)."""
    from tvm import relax, tirx
    from tvm.script import tirx as T

    nv, tail = c // lanes, c % lanes
    base = nv * lanes
    zero, ninf = tirx.const(0.0, "float32"), tirx.const(float("-inf"), "float32")
    masked = _broadcast_add(bb, x, shape)
    mrows, oshape = 1, tuple(shape)
    if masked is not None:
        x, mask, mrows = masked
    cin = c  # a slice of a wider row (a padded matmul's sums) is read in place
    sliced = _resolve(bb, x)
    if _op_name(sliced) == "relax.strided_slice" and len(sliced.args) == 4:
        src, (axis,), (begin,) = sliced.args[0], sliced.args[1].fields, sliced.args[2].fields
        full = _static_shapes(src)
        if (int(axis) % len(shape) == len(shape) - 1 and int(begin) == 0 and full
                and list(full[0][:-1]) == shape[:-1]):  # fmt: skip
            x, cin = src, int(full[0][-1])
    ishape = tuple(_static_shapes(x)[0])

    @T.prim_func(private=True, s_tir=True)
    def softmax_rows(inp: T.Buffer(ishape, "float32"), mk: T.Buffer((mrows, c), "float32"),
                     out: T.Buffer(oshape, "float32")):  # fmt: skip
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        with T.sblock("root"):
            # Input and output in their own shapes, seen as rows: no reshape kernels around it.
            xb = T.decl_buffer((rows, cin), "float32", data=inp.data)
            y = T.decl_buffer((rows, c), "float32", data=out.data)
            for r in T.parallel(rows):
                part = T.decl_buffer((lanes,), "float32")
                one = T.decl_buffer((2,), "float32")  # the row's max, then the sum's inverse
                m = r % mrows
                for i in T.vectorized(lanes):
                    part[i] = ninf
                for v in range(nv):
                    for i in T.vectorized(lanes):
                        part[i] = T.max(part[i], xb[r, v * lanes + i] + mk[m, v * lanes + i])
                one[0] = ninf
                for i in range(lanes):
                    one[0] = T.max(one[0], part[i])
                for t in range(tail):
                    one[0] = T.max(one[0], xb[r, base + t] + mk[m, base + t])
                for i in T.vectorized(lanes):
                    part[i] = zero
                for v in range(nv):
                    for i in T.vectorized(lanes):
                        y[r, v * lanes + i] = _fexp(xb[r, v * lanes + i] + mk[m, v * lanes + i] - one[0])
                        part[i] = part[i] + y[r, v * lanes + i]
                one[1] = zero
                for i in range(lanes):
                    one[1] = one[1] + part[i]
                for t in range(tail):
                    y[r, base + t] = _fexp(xb[r, base + t] + mk[m, base + t] - one[0])
                    one[1] = one[1] + y[r, base + t]
                one[1] = T.float32(1.0) / one[1]
                for v in range(nv):
                    for i in T.vectorized(lanes):
                        y[r, v * lanes + i] = y[r, v * lanes + i] * one[1]
                for t in range(tail):
                    y[r, base + t] = y[r, base + t] * one[1]

    gv = bb.add_func(softmax_rows, "softmax_rows")
    mk = bb.normalize(relax.op.reshape(mask, (mrows, c))) if masked is not None else relax.const(np.zeros((1, c), np.float32))
    return bb.emit(relax.call_tir(gv, [x, mk], relax.TensorType(shape, "float32")))


def _broadcast_add(bb, x, shape):
    """(a, mask, mask rows) when ``x`` is ``a + mask``, ``a`` of ``shape`` and ``mask`` float32
    matching its trailing axes (broadcast over the leading ones); else None."""
    from tvm import relax

    if not isinstance(x, relax.Var):
        return None
    try:
        bound = bb.lookup_binding(x)
    except Exception:
        return None
    if not (isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.add"):
        return None
    for a, m in (bound.args, bound.args[::-1]):
        sa, sm = _static_shapes(a), _static_shapes(m)
        if not sa or not sm or list(sa[0]) != shape or str(m.ty.dtype) != "float32":
            continue
        ms = list(sm[0])
        while ms and ms[0] == 1 and len(ms) > 1:
            ms = ms[1:]
        if len(ms) >= 1 and ms == shape[-len(ms):]:
            mrows = 1
            for d in ms[:-1]:
                mrows *= d
            return a, m, mrows
    return None


def _row_kernel(bb, sch, out: str, reductions: tuple[str, ...], lanes: int, name: str, args, rows: int, c: int):
    """Schedule a (rows, c) kernel whose ``reductions`` (in order, each reading the ones before)
    feed ``out``: rows in parallel, each reduction one vectorized pass (``rfactor`` into ``lanes``
    partials) under the row loop, the output row vectorized; add it to the module and call it on
    ``args`` (the first flattened to rows). Returns the (rows, c) result."""
    from tvm import relax

    r, j = sch.get_loops(sch.get_sblock(out))
    sch.parallel(r)
    _, jv = sch.split(j, [None, lanes])
    sch.vectorize(jv)
    rfs = {}
    for red in reductions:
        blk = sch.get_sblock(red)
        _, kv = sch.split(sch.get_loops(blk)[-1], [None, lanes])
        rfs[red] = sch.rfactor(kv, factor_axis=1)
    for red in reversed(reductions):  # consumers first: each lands under the row loop
        sch.compute_at(sch.get_sblock(red), r)
        sch.compute_at(rfs[red], r)
    for rf in rfs.values():
        _, lane, k = sch.get_loops(rf)  # compute_at orders them as the block's iters: lanes, then k
        sch.reorder(k, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(rf, k)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True).without_attr("global_symbol")
    gv = bb.add_func(func, name)
    flat = bb.normalize(relax.op.reshape(args[0], (rows, c)))
    return bb.emit(relax.call_tir(gv, [flat, *args[1:]], relax.TensorType((rows, c), "float32")))


def _conv_channel_vectors(bb, x, weight, pad: list[int], s: int, ho: int, wo: int, hw: tuple[int, int] | None = None):
    """A convolution whose output channels make whole vectors, with them as the vector axis:
    sums ``[pixel, channel]`` over the output's pixels exactly (no padding columns, no pixels
    rounded up to whole vectors), the weights prepacked at compile time as ``[in, ky, kx, out]``
    so each reduction step loads contiguous channel vectors and broadcasts one input value a
    pixel, then the sums written back as NCHW with the epilogue. Where the flattened-rows form
    computes many pixels it drops (a 10x10 map's rows of 12, padded to 128 pixels for 100) or
    splits a strided input into phases, this is the faster one: `scripts/profile_kernels.py
    zoo:yolov8n-320`'s convs on 20x20 and 10x10 maps, and its stride-2 ones onto 40x40 and 20x20
    (``conv2d_flat_rows``). The products are added in the same order (bitwise the same sums).
    ``hw``: ``x`` is channels-last, ``[batch, h * w, channel]`` with ``hw = (h, w)``, and the sums
    are the output as they are (``channels_last``: no write back to NCHW)."""
    from tvm import relax, te, tirx

    if hw is None:
        n, c, h, wd = (int(d) for d in x.ty.shape)
    else:
        (n, _, c), (h, wd) = (int(d) for d in x.ty.shape), hw
    o, _, kh, kw = weight.shape
    # A 1x1 conv's weight rows (one an input channel) of a multiple of 1 KB sit a multiple of
    # 4 KB apart every few rows, in the same L1 sets: a block of 32 rows of 1024 or 2048
    # channels fought over one set's 12 ways, and each step's weight vectors came from L2. A
    # vector of zeros at each row's end sets them apart; the kernel never reads it (it computes
    # the ``o`` channels only). ResNet-50's convs alone, two runs: 1024->2048 stride 2 0.73-0.78x,
    # 512->2048 0.79-0.99x; a 3x3 one (a tap's rows 9 taps apart already) gained nothing (0.99x).
    spread = 16 if (kh, kw) == (1, 1) and o * 4 % 1024 == 0 else 0
    packed = relax.const(np.ascontiguousarray(np.pad(weight.transpose(1, 2, 3, 0), [(0, 0)] * 3 + [(0, spread)])))
    top, left = pad[0], pad[1]
    zero = tirx.const(0.0, "float32")

    def inside(y, xx):
        return tirx.all(y >= top, y < top + h, xx >= left, xx < left + wd)

    def input_reader(data):  # at(b, i, y, x) over the padded input
        if hw is None:
            if any(pad):
                shape = (n, c, h + pad[0] + pad[2], wd + pad[1] + pad[3])
                data = te.compute(shape, lambda b, i, y, xx: tirx.if_then_else(
                    inside(y, xx), data[b, i, y - top, xx - left], zero), name="pad")  # fmt: skip
            return lambda b, i, y, xx: data[b, i, y, xx]
        if any(pad):
            shape = (n, h + pad[0] + pad[2], wd + pad[1] + pad[3], c)
            src = te.compute(shape, lambda b, y, xx, i: tirx.if_then_else(
                inside(y, xx), data[b, (y - top) * wd + xx - left, i], zero), name="pad")  # fmt: skip
            return lambda b, i, y, xx: src[b, y, xx, i]
        return lambda b, i, y, xx: data[b, y * wd + xx, i]

    def compute(data, wp):
        at = input_reader(data)
        i = te.reduce_axis((0, c), "i")
        ry = te.reduce_axis((0, kh), "ry")
        rx = te.reduce_axis((0, kw), "rx")
        acc = te.compute(
            (n, ho * wo, o),
            lambda b, p, f: te.sum(at(b, i, (p // wo) * s + ry, (p % wo) * s + rx) * wp[i, ry, rx, f], axis=[i, ry, rx]),
            name="conv_chv",
        )  # fmt: skip
        if hw is not None:
            return acc
        return te.compute((n, o, ho, wo), lambda b, f, y, xx: acc[b, y * wo + xx, f], name="conv_nchw")

    return bb.call_te(compute, x, packed, primfunc_name_hint="conv2d_chv" if hw is None else "conv2d_chv_nhwc")


#: Output pixels under which a 1x1 convolution computes with its output channels as the vectors.
_CHV_POINTWISE_PIXELS = 256


def conv_form(call, lanes: int, min_channels: int = 32):
    """How the CPU computes a ``conv2d`` call (``conv2d_flat_rows``): ``("chv", x, w, pad, s, ho,
    wo)`` with its output channels as the vectors (``_conv_channel_vectors``), ``("flat", ...)``
    over the flattened padded rows, or None for TVM's own kernel."""
    import tvm

    ops = _conv_operands(call)
    if ops is None:
        return None
    attrs, x, w, (n, c, h, wd), (o, ci, kh, kw) = ops
    pad = [int(p) for p in attrs.padding]  # top, left, bottom, right
    strides = [int(v) for v in attrs.strides]
    s = strides[0]
    if (
        str(x.ty.dtype) != "float32" or str(w.ty.dtype) != "float32" or _out_dtype(attrs) not in (None, "float32")
        or int(attrs.groups) != 1 or ci != c or c < min_channels
        or strides != [s, s] or s not in (1, 2) or any(int(d) != 1 for d in attrs.dilation)
        or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout or "NCHW") != "NCHW"
    ):  # fmt: skip
        return None
    ho, wo = (h + pad[0] + pad[2] - kh) // s + 1, (wd + pad[1] + pad[3] - kw) // s + 1
    one_by_one = (kh, kw) == (1, 1) and not any(pad)
    pointwise = one_by_one and s == 1
    const = isinstance(w, tvm.ir.GenericConst)
    # A 1x1 convolution onto a small map (ResNet-50's 14x14 and 7x7, and its stride-2
    # downsampling onto them) whose pixels make no whole vectors: its output channels are
    # the vectors, and the weights (up to 4 MB there) stream through L1 in blocks that every
    # pixel tile uses (``cpu.CpuConfig.conv_k_block``).
    if one_by_one and (s == 2 or ho * wo % lanes) and 16 <= ho * wo < _CHV_POINTWISE_PIXELS and o % lanes == 0 and const:
        return ("chv", x, w, pad, s, ho, wo)
    # Rows of whole vectors need no flattening; nor do a pointwise conv's pixels when they
    # make whole vectors (the CPU schedule fuses its rows by itself: cpu._fuse_pixels), or
    # when there are too few to fill four (a squeeze-excite's 1x1 map: padding is waste).
    if ho <= 0 or wo <= 0 or (ho * wo if pointwise else wo) % lanes == 0 or (pointwise and ho * wo < 4 * lanes):
        return None
    wq = -(-(wd + pad[1] + pad[3]) // s)  # a phase's row
    pixels = -(-ho * wq // lanes) * lanes
    # Output channels in whole vectors: those are the vectors instead, where the flattened
    # rows would compute 10 % more pixels than there are (a 10x10 map: 128 for 100; a 15x40
    # one, 640 for 600, measured no faster that way), or split a stride-2 input into phases
    # for 400 output pixels or more (onto 10x10, the phases measured faster).
    if o % lanes == 0 and const and ((s == 1 and pixels >= 1.1 * ho * wo) or (s == 2 and ho * wo >= 400)):
        return ("chv", x, w, pad, s, ho, wo)
    return ("flat", x, w, pad, s, ho, wo)


def conv2d_flat_rows(lanes: int, min_channels: int = 32):
    """A convolution (kernel larger than 1x1, or 1x1 onto a small map; stride 1 or 2, no groups
    or dilation) over maps whose output rows are no whole number of vectors (YOLO's 40x40,
    20x20 and 10x10: rows of 2.5, 1.25 and 0.6 vectors) as a convolution over the zero-padded
    input flattened row after row: at stride 1, output pixel ``y * Wp + x`` reads input
    ``(y + ry) * Wp + x + rx`` (``Wp`` the padded row), so the pixels make one contiguous axis,
    padded to whole vectors, whose vectors cross rows; the few columns computed past a row's
    end are cropped off afterwards.
    At stride s the padded input is first split into its s x s phases (rows and columns modulo
    s), each flattened the same way: pixel ``y * Wq + x`` reads phase ``(ry % s, rx % s)`` at
    ``(y + ry // s) * Wq + x + rx // s`` (``Wq = Wp / s``), again one contiguous vector axis.
    The products are added in the same order as in TVM's own kernel. `scripts/profile_kernels.py
    zoo:yolov8n-320` on 2 Zen 4 cores: its 3x3 stride-1 convs (with their bias and SiLU) went
    from 200-240 to 300-415 GFLOP/s, the model's kernel sum from 12.2 to 9.6 ms. Inputs of fewer
    than ``min_channels`` channels (16) gained nothing and keep TVM's kernel, as do maps whose
    output rows are whole vectors."""

    def legalize(bb, call):
        import tvm
        from tvm import te, tirx

        default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
        form = conv_form(call, lanes, min_channels)
        if form is None:
            return default(bb, call)
        x, w, pad, s, ho, wo = form[1:]
        if form[0] == "chv":
            return _conv_channel_vectors(bb, x, w.value.numpy(), pad, s, ho, wo)
        n, c, h, wd = (int(d) for d in x.ty.shape)
        o, _, kh, kw = (int(d) for d in w.ty.shape)
        hp, wp = -(-(h + pad[0] + pad[2]) // s) * s, -(-(wd + pad[1] + pad[3]) // s) * s
        wq = wp // s  # a phase's row
        pixels = -(-ho * wq // lanes) * lanes
        # Whole phase rows, so the padding stage iterates rows x columns (no division per element).
        length = -(-(pixels + ((kh - 1) // s) * wq + (kw - 1) // s) // wq) * wq
        top, left = pad[0], pad[1]
        zero = tirx.const(0.0, "float32")

        def compute(data, weight):
            def padded(b, i, a, e, q):
                yy, xx = (q // wq) * s + a - top, (q % wq) * s + e - left
                inside = tirx.all(q < (hp // s) * wq, yy >= 0, yy < h, xx >= 0, xx < wd)
                return tirx.if_then_else(inside, data[b, i, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, wd - 1), 0)],
                                         zero)  # fmt: skip

            flat = te.compute((n, c, s, s, length), padded, name="pad_flat")
            i = te.reduce_axis((0, c), "i")
            ry = te.reduce_axis((0, kh), "ry")
            rx = te.reduce_axis((0, kw), "rx")
            acc = te.compute(
                (n, o, pixels),
                lambda b, f, p: te.sum(flat[b, i, ry % s, rx % s, p + (ry // s) * wq + rx // s] * weight[f, i, ry, rx],
                                       axis=[i, ry, rx]),
                name="conv_flat",
            )  # fmt: skip
            return te.compute((n, o, ho, wo), lambda b, f, yy, xx: acc[b, f, yy * wq + xx], name="conv_crop")

        return bb.call_te(compute, x, w, primfunc_name_hint="conv2d_flat")

    return legalize


def permutes_collapsed():
    """A Relax pass: a transpose of a transpose is one transpose of the first's input, or that
    input itself when the two cancel (the fused attention's output, read back into tokens)."""
    return _relax_pass("PermutesCollapsed", "relax.permute_dims", _collapse_permutes)


def _collapse_permutes(bb, call):
    from tvm import relax

    inner = _bound_call(bb, call.args[0], "relax.permute_dims")
    if inner is None:
        return None
    shapes = _static_shapes(inner.args[0])
    if not shapes or shapes[0] is None:
        return None
    ndim = len(shapes[0])

    def axes(c):
        return [int(a) for a in c.attrs.axes] if c.attrs.axes is not None else list(range(ndim))[::-1]

    first, second = axes(inner), axes(call)
    composed = [first[a] for a in second]
    if composed == list(range(ndim)):
        return inner.args[0]
    return relax.op.permute_dims(inner.args[0], composed)


def max_pool_rows(bb, call):
    """A legalization of ``relax.nn.max_pool2d`` (NCHW float32, no dilation) with a horizontal
    stride: one task per output row, parallel over channels and rows. The window's input rows
    are first reduced into one padded row (unit-stride, vectorized by LLVM), then each output
    pixel takes the max of its window's columns of that row (LLVM vectorizes the stride-2
    reads as interleaved loads). TVM's kernel, as the default heuristics scheduled it, kept
    the strided reads scalar: a CRNN's 2x2 stride-2 pool of 64x60x160 took 0.15 ms alone, this
    one 0.06. Stride 1 along the rows (YOLO's SPPF: 5x5 over 10x10) keeps TVM's kernel, which is
    faster on such small maps."""
    import tvm
    from tvm import relax, tirx
    from tvm.script import tirx as T

    default = tvm.ir.Op.get("relax.nn.max_pool2d").get_attr("FLegalize")
    a = call.attrs
    x = call.args[0]
    shapes = _static_shapes(x, call)
    if (shapes is None or str(x.ty.dtype) != "float32" or str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW"
            or any(int(d) != 1 for d in a.dilation) or len(shapes[0]) != 4):  # fmt: skip
        return default(bb, call)
    (n, c, h, w), (_, _, oh, ow) = shapes
    kh, kw = (int(v) for v in a.pool_size)
    sh, sw = (int(v) for v in a.strides)
    pt, pl = int(a.padding[0]), int(a.padding[1])
    if sw < 2 or ow < 8:
        return default(bb, call)
    rows = n * c
    wp = max(w + pl, (ow - 1) * sw + kw)  # the padded row: -inf wherever the input is not
    ninf = tirx.const(float("-inf"), "float32")

    @T.prim_func(private=True, s_tir=True)  # (with a root block: RewriteDataflowReshape inspects one-input kernels)
    def max_pool_rows(xb: T.Buffer((rows, h, w), "float32"), y: T.Buffer((rows, oh, ow), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        with T.sblock("root"):
            for t in T.parallel(rows * oh):
                cm = T.decl_buffer((wp,), "float32")
                ch: T.int32 = t // oh
                oy: T.int32 = t % oh
                for i in range(wp):
                    cm[i] = ninf
                for ky in range(kh):
                    if 0 <= oy * sh + ky - pt and oy * sh + ky - pt < h:
                        for i in range(w):
                            cm[i + pl] = T.max(cm[i + pl], xb[ch, oy * sh + ky - pt, i])
                for ox in range(ow):
                    y[ch, oy, ox] = cm[ox * sw]
                    for kx in range(1, kw):
                        y[ch, oy, ox] = T.max(y[ch, oy, ox], cm[ox * sw + kx])

    gv = bb.add_func(max_pool_rows, "max_pool_rows")
    flat = bb.normalize(relax.op.reshape(x, (rows, h, w)))
    y = bb.emit(relax.call_tir(gv, [flat], relax.TensorType((rows, oh, ow), "float32")))
    return relax.op.reshape(y, (n, c, oh, ow))


# F(2x2, 3x3) (Lavin & Gray 2015): a 2x2 output tile from a 4x4 input tile in 16 products per
# input-output channel pair instead of 36. U = G g Gᵀ (weights, at compile time), V = Bᵀ d B.
_WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)


def conv_winograd(lanes: int, min_channels: int = 32, min_tiles: int = 64, max_workspace: int = 16 << 20):
    """A Relax pass: a float32 3x3 stride-1 convolution (no groups or dilation, constant weights)
    of at least ``min_channels`` input and output channels as Winograd's F(2x2, 3x3): each 2x2
    output tile from its 4x4 input tile in 16 products a channel pair instead of 36. Three
    kernels: the input tiles transformed (``Bᵀ d B``, by rows then columns, into
    ``[16, C, tiles]``, the tiles padded to whole vectors of ``lanes`` and room for a row of
    tiles' overrun), 16 matmuls by the weights transformed at compile time (``G g Gᵀ``,
    ``[16, O, C]``), and the output transform (``Aᵀ m A`` a tile, then interleaved into rows),
    into which the convolution's epilogue fuses.

    On 2 Zen 4 cores (``scripts/ab_revisions.py``, one conv + bias + ReLU a model, interleaved):
    256->256 over 15x40 3.88 -> 2.10 ms, 64->128 over 30x80 1.82 -> 1.13, 80->80 over 40x40
    1.01 -> 0.59, 32->32 over 40x40 0.23 -> 0.19; a CRNN (zoo:crnn-60x160) 11.13 -> 7.26 ms.
    Below 64 tiles (a 10x10 map: 25, padded to 32) 256->64 went 0.26 -> 0.31 ms, and with 16
    channels the transforms cost what the products save, so those keep the direct kernels. The
    products are summed in another order than a direct convolution's: within 1e-6 of the
    output's scale here (onnxruntime's direct sums as the reference)."""
    return _relax_pass("ConvWinograd", "relax.nn.conv2d",
                       lambda bb, call: _conv_winograd(bb, call, lanes, min_channels, min_tiles, max_workspace))


def _spread(rows: int, row: int, elem: int = 4) -> int:
    """Rows to add to ``rows`` rows of ``row`` elements so that the planes they make are no
    multiple of 4 KB apart (at least 256 bytes off one)."""
    for extra in range(4):
        off = (rows + extra) * row * elem % 4096
        if 256 <= off <= 3840:
            return extra
    return 0


def _conv_winograd(bb, call, lanes: int, min_channels: int, min_tiles: int, max_workspace: int):
    from tvm import relax, te, tirx
    from tvm.script import tirx as T

    ops = _conv_operands(call)
    if ops is None:
        return None
    a, x, w, (n, c, h, wd), (o, ci, kh, kw) = ops
    weight = constant_array(w)
    if (
        weight is None or weight.dtype != np.float32 or str(x.ty.dtype) != "float32" or _out_dtype(a) not in (None, "float32")
        or (kh, kw) != (3, 3) or int(a.groups) != 1 or ci != c or min(c, o) < min_channels
        or [int(s) for s in a.strides] != [1, 1] or any(int(d) != 1 for d in a.dilation)
        or str(a.kernel_layout) != "OIHW" or str(a.out_layout or "NCHW") != "NCHW"
    ):  # fmt: skip
        return None
    top, left, bottom, right = (int(p) for p in a.padding)
    ho, wo = h + top + bottom - 2, wd + left + right - 2
    if ho < 2 or wo < 2:
        return None
    th, tw = -(-ho // 2), -(-wo // 2)
    tiles = n * th * tw
    # The input transform writes a row of tiles as whole vectors of ``step`` (``twv``); what
    # passes the row's end lands where the next row goes, written over when that row is, so the
    # last row's needs room past ``tiles``. Those columns of V and M are never read back.
    step = 4
    twv = -(-tw // step) * step
    pp = -(-(tiles + twv - tw) // lanes) * lanes
    if tiles < min_tiles or 16 * c * pp * 4 > max_workspace:
        return None
    u = np.einsum("ay,oiyx,bx->aboi", _WINO_G, weight.astype(np.float64), _WINO_G)
    # V and M are 16 planes, one per tile position, each [channels, tiles]; 16 planes a multiple of
    # 4 KB apart share L1's sets (8 ways), and their rows evicted each other: a 64-channel 40x40
    # input transform ran 2x slower. A few padding rows set them apart.
    cv, cm = _spread(c, pp), _spread(o, pp)
    u = np.concatenate([u.reshape(16, o, c), np.zeros((16, cm, c))], axis=1).astype(np.float32)
    zero = tirx.const(0.0, "float32")

    # A channel's zero-padded input rows are held split into their even and odd columns
    # (``ph[f, y, q]`` is padded column 2q + f), so every tile's reads are unit-stride. Then, a
    # row of tiles at a time, Bᵀ d down the tile's 4 rows (both phases at once) and · B along
    # them, each loop whole vectors of ``twv`` tiles. (Copying the padded plane first and
    # splitting it after, with loops as long as a row of 10 or 20 tiles that LLVM vectorized with
    # scalar remainders, was slower: the kernel alone, two runs, 64 channels at 20x20 81 -> 48
    # and 70 -> 42 us, at 40x40 163 -> 113 and 235 -> 112, 128 at 28x28 182 -> 155 and 291 -> 188,
    # 64 at 56x56 361 -> 303 and 352 -> 325.)
    hp = 2 * th + 2
    wqa = twv + step  # phase columns, whole vectors: a row of tiles reads q up to twv
    # padded column 2q + f is input column 2q + f - left: valid for q in [lo[f], hi[f])
    lo = [max(0, -(-(left - f) // 2)) for f in (0, 1)]
    hi = [max(lo[f], min(wqa, (wd - 1 + left - f) // 2 + 1)) for f in (0, 1)]

    @T.prim_func(private=True, s_tir=True)
    def winograd_input(xb: T.Buffer((n, c, h, wd), "float32"), v: T.Buffer((16, c + cv, pp), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        with T.sblock("root"):
            for ch in T.parallel(c):
                ph = T.decl_buffer((2, hp, wqa), "float32")
                cols = T.decl_buffer((4, 2, wqa), "float32")
                for e, p in T.grid(16, pp - tiles):
                    v[e, ch, tiles + p] = zero
                for b in range(n):  # in order: a row's overrun is the next row's, of the next image too
                    for y in range(hp):
                        for f in range(2):
                            for q in T.vectorized(wqa):
                                ph[f, y, q] = zero
                        if top <= y and y - top < h:
                            for q in range(lo[0], hi[0]):
                                ph[0, y, q] = xb[b, ch, y - top, 2 * q - left]
                            for q in range(lo[1], hi[1]):
                                ph[1, y, q] = xb[b, ch, y - top, 2 * q + 1 - left]
                    for ty in range(th):
                        for f in range(2):
                            for q in T.vectorized(wqa):
                                cols[0, f, q] = ph[f, 2 * ty, q] - ph[f, 2 * ty + 2, q]
                                cols[1, f, q] = ph[f, 2 * ty + 1, q] + ph[f, 2 * ty + 2, q]
                                cols[2, f, q] = ph[f, 2 * ty + 2, q] - ph[f, 2 * ty + 1, q]
                                cols[3, f, q] = ph[f, 2 * ty + 1, q] - ph[f, 2 * ty + 3, q]
                        for r in range(4):
                            for tx in T.vectorized(twv):
                                v[r * 4, ch, (b * th + ty) * tw + tx] = cols[r, 0, tx] - cols[r, 0, tx + 1]
                                v[r * 4 + 1, ch, (b * th + ty) * tw + tx] = cols[r, 1, tx] + cols[r, 0, tx + 1]
                                v[r * 4 + 2, ch, (b * th + ty) * tw + tx] = cols[r, 0, tx + 1] - cols[r, 1, tx]
                                v[r * 4 + 3, ch, (b * th + ty) * tw + tx] = cols[r, 1, tx] - cols[r, 1, tx + 1]

    gv = bb.add_func(winograd_input, "winograd_input")
    vt = bb.emit(relax.call_tir(gv, [x], relax.TensorType((16, c + cv, pp), "float32")))

    def products(ut, vv):  # the 16 matmuls
        ci = te.reduce_axis((0, c), "ci")
        return te.compute((16, o + cm, pp), lambda e, k, p: te.sum(ut[e, k, ci] * vv[e, ci, p], axis=ci),
                          name="winograd_products")

    mt = bb.emit(bb.call_te(products, relax.const(u), vt, primfunc_name_hint="winograd_products"))

    def output(m):
        # Aᵀ m A as a stage of its own (WINOGRAD_TILES_STAGE): a tile's 4 outputs from its 16
        # products, as planes [dy * 2 + dx, O, tiles] read and written along the tiles, unit
        # stride; the CPU schedule computes a channel's under the output's parallel loop, into a
        # buffer that stays in L1 (backends.cpu._schedule_winograd_output). The output stage
        # interleaves those planes into its rows, and the epilogue fuses there. As one stage, each
        # output element summed from 9 products inside the row loop, YOLOv8n-320's output
        # transforms took 1.83 ms (profile_kernels), 1.66 ms so; ab_revisions: YOLOv8n-320 0.958x
        # and 0.959x, a 64-channel 3x3 conv + SiLU at 40x40 0.947x, at 20x20 0.946x, ReLU convs
        # (the CRNN's) 0.92-1.01x, the CRNN 0.998x.
        def tile(e4, k, p):
            dy, dx = e4 // 2, e4 % 2
            one = tirx.const(1.0, "float32")
            sy, sx = (tirx.Select(d == 0, one, -one) for d in (dy, dx))
            total = None
            for i in range(3):
                for j in range(3):
                    term = m[(i + dy) * 4 + j + dx, k, p]
                    if i and j:
                        term = term * (sy * sx)
                    elif i:
                        term = term * sy
                    elif j:
                        term = term * sx
                    total = term if total is None else total + term
            return total

        t = te.compute((4, o, pp), tile, name=WINOGRAD_TILES_STAGE)
        return te.compute((n, o, ho, wo), lambda bi, k, y, xx: t[(y % 2) * 2 + xx % 2, k, (bi * th + y // 2) * tw + xx // 2],
                          name="winograd_output")

    return bb.call_te(output, mt, primfunc_name_hint="winograd_output")
