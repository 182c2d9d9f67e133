"""Channels-last islands on CPUs: where convolutions that compute with their output channels as
the vectors (``rewrites.conv_form`` "chv": 1x1 and 3x3 convs onto small maps, ResNet-50's and
MobileNetV2's 14x14 and 7x7 stages, YOLO's 20x20 and 10x10 ones) follow each other, with
depthwise convs and elementwise ops between them, the activations between stay
``[batch, pixel, channel]`` ("flat NHWC") instead of going back to NCHW after every conv.

A channel-vector conv sums ``[pixel, channel]`` tiles; in NCHW its epilogue wrote them back
transposed, one strided store a lane, and the next conv read NCHW again. In an island the
conv's output is its sums' own layout, the epilogue (bias, clip, residual add) runs over
contiguous vectors, the depthwise convs between vectorize over channels, and layouts change
only at the island's edges (a transpose where the graph enters, and where a value leaves).

The pass runs before legalization and emits the kernels itself (``bb.call_te``); every other
op is left as it was, reading the NCHW value, which the pass keeps as a transpose of the flat
one that dead-code elimination removes where nothing reads it.
"""

from __future__ import annotations

import numpy as np

#: Elementwise ops carried into an island (their other operands per channel, or flat too).
_UNARY = ("relax.clip", "relax.nn.relu", "relax.sigmoid", "relax.nn.silu", "relax.tanh", "relax.nn.gelu")
_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum")


def channels_last(lanes: int, min_channels: int = 32):
    """The Relax pass (a module pass over every Relax function)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Islands(PyExprMutator):
        """``starts``: the convolutions that may open an island (None: any); ``self.parent`` and
        ``self.convs`` record each island (named by the conv that opened it) and its convolutions."""

        def __init__(self, mod, starts=None):
            super().__init__(mod)
            self.starts = starts
            self.flat = {}  # NCHW var -> (flat var, h, w): the same value as [n, h * w, c]
            self.island = {}  # NCHW var -> the island it was computed in
            self.parent = {}  # island -> the island it joined (union-find)
            self.convs = {}  # island -> its convolutions
            self.tuples = {}  # NCHW tuple var (a split's) -> (flat tuple var, h, w)

        def root(self, k):
            while self.parent[k] is not k:
                k = self.parent[k]
            return k

        def visit_dataflow_block_(self, block):
            self.flat, self.island, self.tuples = {}, {}, {}  # (a block's dataflow vars are its own)
            return super().visit_dataflow_block_(block)

        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.tuples:
                tf, h, w = self.tuples[value.tuple_value]
                fv = self.builder_.emit(relax.TupleGetItem(tf, value.index))
                return self.record(binding, value, (fv, h, w), [value.tuple_value])
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
                return super().visit_var_binding_(binding)
            value = self.visit_expr(value)
            if value.op.name == "relax.split":  # a tuple (kept for other uses); its items join the island
                self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
                made = _split_flat(self.builder_, value, self.flat)
                if made is not None:
                    self.tuples[binding.var] = made
                    self.island[binding.var] = self.island[value.args[0]]
                return
            may_start = self.starts is None or binding.var in self.starts
            made = _island_value(self.builder_, value, self.flat, lanes, min_channels, may_start)
            if made is None:
                self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
                return
            inputs = value.args[0].fields if value.op.name == "relax.concat" else value.args
            self.record(binding, value, made, inputs)
            if value.op.name == "relax.nn.conv2d":
                self.convs[self.island[binding.var]] += 1

        def record(self, binding, value, made, inputs):
            """Bind ``binding.var`` to the NCHW form of the flat value ``made`` (for the ops outside
            the island), and put it in the island of ``inputs`` (joining theirs), or a new one."""
            fv, h, w = made
            n, _, c = (int(d) for d in fv.ty.shape)
            t = self.builder_.emit(relax.op.permute_dims(fv, [0, 2, 1]))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(relax.op.reshape(t, (n, c, h, w)))))
            self.flat[binding.var] = made
            joined = {self.root(self.island[a]) for a in inputs if a in self.island}
            if not joined:
                self.parent[binding.var], self.convs[binding.var] = binding.var, 0
                joined = {binding.var}
            first, *rest = joined
            for k in rest:
                self.parent[k] = first
                self.convs[first] += self.convs.pop(k)
            self.island[binding.var] = first

    def islands(mod, func, starts=None):
        rw = Islands(mod, starts)
        return rw, rw.visit_expr(func)

    @tvm.transform.module_pass(opt_level=0, name="ChannelsLastIslands")
    def rewrite(mod, _ctx):
        mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                # A conv alone in its island would only move its transpose to its input: islands
                # of two convolutions or more (a dry run finds them).
                trial, out = islands(mod, func)
                starts = {k for k in trial.parent if trial.convs[trial.root(k)] >= 2}
                if not starts:
                    continue
                # (every island qualifies: the dry run's result is the one a second run would give)
                rw, mod[gv] = (trial, out) if len(starts) == len(trial.parent) else islands(mod, func, starts)
                have = list(mod.functions)
                for new_gv, new_func in rw.builder_.get().functions.items():
                    if not any(new_gv.same_as(g) for g in have) and not isinstance(new_func, relax.Function):
                        mod[new_gv] = new_func
        return relax.transform.DeadCodeElimination()(mod)

    return rewrite


def _shape(e) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in e.ty.shape)
    except (AttributeError, TypeError, ValueError):
        return None


def _to_flat(bb, x):
    """``[n, h * w, c]`` of an NCHW value."""
    from tvm import relax

    n, c, h, w = _shape(x)
    t = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    return bb.emit(relax.op.reshape(t, (n, h * w, c)))


def _per_channel(bb, e, c: int):
    """An NCHW operand that broadcasts per channel (``[1, c, 1, 1]``, ``[c, 1, 1]``, one value)
    as its flat form (``[1, 1, c]``, or the value itself); else None."""
    import tvm
    from tvm import relax

    shape = _shape(e)
    if shape is None or str(e.ty.dtype) != "float32":
        return None
    if int(np.prod(shape)) == 1:
        return e
    full = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else None
    if full is None or full[0] != 1 or full[1] != c or full[2:] != (1, 1):
        return None
    if isinstance(e, tvm.ir.GenericConst):
        return relax.const(e.value.numpy().reshape(1, 1, c))
    return bb.emit(relax.op.reshape(e, (1, 1, c)))


def _island_value(bb, call, flat: dict, lanes: int, min_channels: int, may_start: bool = True):
    """The call computed in an island, as (flat var, h, w), or None to keep it as it is.
    ``may_start``: a channel-vector conv whose input is not in an island opens one."""
    from tvm import relax

    from .rewrites import _conv_channel_vectors, conv_form

    op = call.op.name
    if op == "relax.nn.conv2d":
        form = conv_form(call, lanes, min_channels)
        x = call.args[0]
        if form is not None and form[0] == "chv" and (x in flat or may_start):
            _, x, w, pad, s, ho, wo = form
            xf = flat[x][0] if x in flat else _to_flat(bb, x)
            conv = _conv_channel_vectors(bb, xf, w.value.numpy(), pad, s, ho, wo, hw=_shape(x)[2:])
            return bb.emit(conv), ho, wo
        if x in flat:
            return _depthwise_flat(bb, call, flat[x][0], lanes)
        return None
    if op == "relax.concat":
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
        if not fields or int(call.attrs.axis) not in (1, -3) or any(f not in flat for f in fields):
            return None
        hw = {flat[f][1:] for f in fields}
        if len(hw) != 1 or len(_shape(call)) != 4:
            return None
        h, w = hw.pop()
        return bb.emit(relax.op.concat([flat[f][0] for f in fields], axis=2)), h, w
    if op == "relax.nn.max_pool2d":
        x = call.args[0]
        return _max_pool_flat(bb, call, flat[x][0]) if x in flat else None
    if op in _UNARY:
        x = call.args[0]
        if x not in flat:
            return None
        fv, h, w = flat[x]
        return bb.emit(relax.Call(call.op, [fv, *call.args[1:]], call.attrs, call.ty_args)), h, w
    if op in _BINARY:
        a, b = call.args
        ins = [e for e in (a, b) if e in flat]
        if not ins or _shape(call) is None or len(_shape(call)) != 4:
            return None
        _, h, w = flat[ins[0]]
        c = _shape(call)[1]
        args = []
        for e in (a, b):
            if e in flat:
                if flat[e][1:] != (h, w) or _shape(e) != _shape(call):
                    return None
                args.append(flat[e][0])
            else:
                pc = _per_channel(bb, e, c)
                if pc is None:
                    return None
                args.append(pc)
        return bb.emit(relax.Call(call.op, args, call.attrs, call.ty_args)), h, w
    return None


def _depthwise_flat(bb, call, xf, lanes: int):
    """A depthwise conv (one channel a group, constant weight) over a flat NHWC input whose
    channels make whole vectors, as (flat var, ho, wo); else None."""
    import tvm
    from tvm import relax, te, tirx

    from .rewrites import _out_dtype

    x, w = call.args
    at = call.attrs
    xs, ws = _shape(x), _shape(w)
    if xs is None or ws is None or not isinstance(w, tvm.ir.GenericConst):
        return None
    n, c, h, wd = xs
    o, ci, kh, kw = ws
    strides = [int(v) for v in at.strides]
    s = strides[0]
    if (
        (at.data_layout, at.kernel_layout, str(at.out_layout or "NCHW")) != ("NCHW", "OIHW", "NCHW")
        or int(at.groups) != c or o != c or ci != 1 or c % lanes or strides != [s, s] or s not in (1, 2)
        or any(int(d) != 1 for d in at.dilation) or str(x.ty.dtype) != "float32" or str(w.ty.dtype) != "float32"
        or _out_dtype(at) not in (None, "float32")
    ):  # fmt: skip
        return None
    pad = [int(p) for p in at.padding]
    ho, wo = (h + pad[0] + pad[2] - kh) // s + 1, (wd + pad[1] + pad[3] - kw) // s + 1
    if ho <= 0 or wo <= 0:
        return None
    packed = relax.const(np.ascontiguousarray(w.value.numpy()[:, 0].transpose(1, 2, 0)))  # [ky, kx, c]
    top, left = pad[0], pad[1]
    zero = tirx.const(0.0, "float32")

    def compute(data, wk):
        ry = te.reduce_axis((0, kh), "ry")
        rx = te.reduce_axis((0, kw), "rx")

        def tap(b, p, ch):
            # the padding read in place: the condition is one a pixel and tap, the same for every
            # channel of a vector (a padded copy was a serial pass over the whole input first)
            y, xx = (p // wo) * s + ry - top, (p % wo) * s + rx - left
            inside = tirx.all(y >= 0, y < h, xx >= 0, xx < wd)
            at = tirx.max(tirx.min(y, h - 1), 0) * wd + tirx.max(tirx.min(xx, wd - 1), 0)
            return tirx.if_then_else(inside, data[b, at, ch], zero)

        return te.compute(
            (n, ho * wo, c), lambda b, p, ch: te.sum(tap(b, p, ch) * wk[ry, rx, ch], axis=[ry, rx]), name="dwconv_nhwc"
        )

    return bb.emit(bb.call_te(compute, xf, packed, primfunc_name_hint="dwconv2d_nhwc")), ho, wo


def _split_flat(bb, call, flat: dict):
    """A split of an island's value along its channels, as (flat tuple var, h, w); else None."""
    from tvm import relax

    x = call.args[0]
    if x not in flat or int(call.attrs.axis) not in (1, -3) or len(_shape(x) or ()) != 4:
        return None
    xf, h, w = flat[x]
    parts = call.attrs.indices_or_sections
    parts = int(parts) if not hasattr(parts, "__len__") else [int(i) for i in parts]
    return bb.emit(relax.op.split(xf, parts, axis=2)), h, w


def _max_pool_flat(bb, call, xf):
    """A max pool (NCHW, no dilation, floor mode) over a flat NHWC input, as (flat var, ho, wo);
    else None. Padding reads as -inf, as in TVM's own kernel."""
    from tvm import te, tirx

    at = call.attrs
    xs = _shape(call.args[0])
    if (
        xs is None or len(xs) != 4 or str(at.layout) != "NCHW" or str(at.out_layout or "NCHW") != "NCHW"
        or any(int(d) != 1 for d in at.dilation) or bool(at.ceil_mode) or str(call.args[0].ty.dtype) != "float32"
    ):  # fmt: skip
        return None
    n, c, h, wd = xs
    kh, kw = (int(k) for k in at.pool_size)
    sy, sx = (int(k) for k in at.strides)
    pad = [int(p) for p in at.padding]
    ho, wo = (h + pad[0] + pad[2] - kh) // sy + 1, (wd + pad[1] + pad[3] - kw) // sx + 1
    if ho <= 0 or wo <= 0:
        return None
    top, left = pad[0], pad[1]
    ninf = tirx.const(float("-inf"), "float32")

    def compute(data):
        shape = (n, h + pad[0] + pad[2], wd + pad[1] + pad[3], c)
        src = te.compute(shape, lambda b, y, xx, ch: tirx.if_then_else(
            tirx.all(y >= top, y < top + h, xx >= left, xx < left + wd),
            data[b, (y - top) * wd + xx - left, ch], ninf), name="pad")  # fmt: skip
        ry = te.reduce_axis((0, kh), "ry")
        rx = te.reduce_axis((0, kw), "rx")
        return te.compute(
            (n, ho * wo, c),
            lambda b, p, ch: te.max(src[b, (p // wo) * sy + ry, (p % wo) * sx + rx, ch], axis=[ry, rx]),
            name="max_pool_nhwc",
        )  # fmt: skip

    return bb.emit(bb.call_te(compute, xf, primfunc_name_hint="max_pool2d_nhwc")), ho, wo
