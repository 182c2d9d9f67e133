"""Relax rewrites before legalization: conv_transpose_as_conv for every build; the ones a backend
asks for (Backend.rewrites), such as patch_conv_as_matmul on CPUs."""

from __future__ import annotations


def _relax_pass(name: str, op_name: str, rewrite_call):
    """A module pass applying ``rewrite_call(builder, call)`` (a new expression, or None to keep
    the call) to every call of ``op_name`` in the module's Relax functions."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == op_name:
                new = rewrite_call(self.builder_, call)
                return call if new is None else new
            return call

    @tvm.transform.module_pass(opt_level=0, name=name)
    def rewrite(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = Rewriter(mod).visit_expr(func)
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
        a.kernel_layout == "OIHW" and a.out_layout == "NCHW"
        and int(a.groups) == 1 and ci == c and kh * kw > 1
        and [int(s) for s in a.strides] == [kh, kw] and h % kh == 0 and wd % kw == 0
        and not any(int(p) for p in a.padding) and all(int(d) == 1 for d in a.dilation)
    )  # fmt: skip
    if not plain:
        return None
    hp, wp = h // kh, wd // kw
    out_dtype = str(a.out_dtype) if a.out_dtype is not None and str(a.out_dtype) else None
    xp = bb.emit(relax.op.reshape(x, [n, c, hp, kh, wp, kw]))
    xp = bb.emit(relax.op.reshape(relax.op.permute_dims(xp, [0, 2, 4, 1, 3, 5]), [n * hp * wp, c * kh * kw]))
    wm = bb.emit(relax.op.permute_dims(relax.op.reshape(w, [o, c * kh * kw]), [1, 0]))
    y = bb.emit(relax.op.matmul(xp, wm, out_dtype=out_dtype))
    return relax.op.permute_dims(relax.op.reshape(y, [n, hp, wp, o]), [0, 3, 1, 2])


def softmax_padded_to(lanes: int):
    """A Relax pass: a softmax along an axis that no useful vector divides (a ViT's 197 tokens)
    runs on the input padded to whole vectors of ``lanes`` with a large negative value (so the
    padding's exponentials are 0), then the valid part is sliced out. Its max and sum
    reductions then add in vectors instead of one scalar chain per row."""
    return _relax_pass("SoftmaxPaddedToVectors", "relax.nn.softmax", lambda bb, call: _pad_softmax(bb, call, lanes))


def _pad_softmax(bb, call, lanes: int):
    from tvm import relax

    x = call.args[0]
    shapes = _static_shapes(x)
    if not shapes or not shapes[0] or str(x.ty.dtype) != "float32":
        return None
    shape = list(shapes[0])
    axis = int(call.attrs.axis) % len(shape)
    n = shape[axis]
    best = next((d for d in range(min(n, lanes), 3, -1) if n % d == 0), 0)
    if n < 2 * lanes or 2 * best > lanes:
        return None
    width = [0] * (2 * len(shape))
    width[2 * axis + 1] = -n % lanes
    padded = bb.emit(relax.op.nn.pad(x, width, "constant", -1e30))
    y = bb.emit(relax.op.nn.softmax(padded, axis=axis))
    return relax.op.strided_slice(y, axes=[axis], begin=[0], end=[n])


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

    ops = _conv_operands(call)
    if ops is None:
        return None
    a, x, w, (n, ci, h, wd), (wi, co, kh, kw) = ops
    plain = (
        a.kernel_layout == "IOHW" and a.out_layout == "NCHW"
        and int(a.groups) == 1 and wi == ci
        and [int(s) for s in a.strides] == [kh, kw]
        and not any(int(p) for p in a.padding) and not any(int(p) for p in a.output_padding)
        and all(int(d) == 1 for d in a.dilation)
    )  # fmt: skip
    if not plain:
        return None
    w2 = bb.emit(relax.op.reshape(relax.op.permute_dims(w, [1, 2, 3, 0]), [co * kh * kw, ci, 1, 1]))
    out_dtype = str(a.out_dtype) if a.out_dtype is not None and str(a.out_dtype) else None
    z = bb.emit(relax.op.nn.conv2d(x, w2, out_dtype=out_dtype))
    z = bb.emit(relax.op.permute_dims(relax.op.reshape(z, [n, co, kh, kw, h, wd]), [0, 1, 4, 2, 5, 3]))
    return relax.op.reshape(z, [n, co, h * kh, wd * kw])
