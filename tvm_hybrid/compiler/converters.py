"""Converters added to TVM's ONNX frontend, the way it is extended: a class per op with
``_impl_vN`` methods, registered in the frontend's convert map (``install``, idempotent); an
entry here replaces TVM's own for that op."""

from __future__ import annotations

_INSTALLED = False


def _converters() -> dict:
    import tvm
    from tvm import relax, topi
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    from .rewrites import constant_array

    class CumProd(fe.OnnxOpConverter):
        """CumProd (opset 26): TVM's cumprod kernel, reversed with flips; the axis must be a
        constant (``--input NAME=VALUE`` fixes one given as an input)."""

        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            data = inputs[0]
            axis = constant_array(fe.get_constant(inputs[1], params))
            if axis is None:
                raise ValueError("CumProd's axis must be a compile-time constant")
            axis = int(axis.ravel()[0])
            reverse = attr.get("reverse", 0) != 0
            if reverse:
                data = bb.emit_te(topi.flip, data, axis=axis)
            out = bb.emit_te(topi.cumprod, data, axis, None, attr.get("exclusive", 0) != 0)
            if reverse:
                out = bb.emit_te(topi.flip, out, axis=axis)
            return out

    class Clip(fe.Clip):
        """Clip with its bounds as inputs (opset 11+) as Relax's maximum and minimum ops, where
        TVM's converter emits their TOPI kernels (the same kernels once legalized): Relax
        passes see the ops (``channels_last`` carries a conv's ReLU6 into its island)."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            out = inputs[0]
            if inputs[1] is not None:
                out = bb.emit(relax.op.maximum(out, cls._sanitize_nan_clip_bound(bb, inputs[1], for_min=True)))
            if inputs[2] is not None:
                out = bb.emit(relax.op.minimum(out, cls._sanitize_nan_clip_bound(bb, inputs[2], for_min=False)))
            return out

    class Upsample(fe.OnnxOpConverter):
        """Upsample: scales from the attribute (opset 7) or a constant input (opset 9; TVM's
        converter reads only the attribute); nearest rounds down, as ONNX's Upsample does."""

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            scales = attr.get("scales")
            if scales is None and len(inputs) > 1:
                c = constant_array(fe.get_constant(inputs[1], params))
                if c is not None:
                    scales = c.tolist()
            if scales is None:
                raise ValueError("Upsample's scales must be a compile-time constant")
            shape = [int(x) for x in inputs[0].ty.shape]
            if len(shape) != 4 or scales[0] != 1 or scales[1] != 1:
                raise ValueError("Upsample is converted for NCHW inputs scaled in H and W only")
            mode = attr.get("mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            method = {"nearest": "nearest_neighbor", "linear": "linear", "bilinear": "linear"}.get(mode)
            if method is None:
                raise ValueError(f"Upsample mode {mode!r}")
            size = [int(d * s) for d, s in zip(shape[2:], scales[2:])]
            return relax.op.image.resize2d(inputs[0], roi=None, size=relax.ShapeExpr(size), layout="NCHW",
                                           method=method, coordinate_transformation_mode="asymmetric",
                                           rounding_method="floor" if method == "nearest_neighbor" else "")  # fmt: skip

    class BitCast(fe.OnnxOpConverter):
        """BitCast (opset 26) between types of one width: each element's bits read as the other
        type (``tir.reinterpret``); a bool is a byte of 0 or 1."""

        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            from tvm import te

            x = inputs[0]
            src, dst = str(x.ty.dtype), fe.get_type(attr["to"])
            if src == "bool" or dst == "bool":
                if {src, dst} - {"bool", "uint8", "int8"}:
                    raise ValueError(f"BitCast from {src} to {dst}: the widths differ")
                return relax.op.astype(x, dst) if src == "bool" else relax.op.not_equal(x, relax.const(0, src))
            if tvm.DataType(src).bits != tvm.DataType(dst).bits:
                raise ValueError(f"BitCast from {src} to {dst}: the widths differ (the shape would change)")
            return bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tvm.tirx.reinterpret(dst, t(*i)), "bitcast"), x)

    class LSTM(fe.OnnxOpConverter):
        """LSTM (TVM's frontend has none): one input-projection matmul and the fused recurrence
        kernel (``fused_recurrence``); import leaves only the LSTMs it takes as nodes."""

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            from .fused_recurrence import emit

            return emit(bb, "LSTM", list(inputs), attr)

    class GRU(fe.OnnxOpConverter):
        """GRU, the same way as LSTM."""

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            from .fused_recurrence import emit

            return emit(bb, "GRU", list(inputs), attr)

    return {"CumProd": CumProd, "Clip": Clip, "Upsample": Upsample, "BitCast": BitCast, "LSTM": LSTM, "GRU": GRU}


def install() -> None:
    """Add our converters to the frontend's map (the map is rebuilt on every call, so its
    builder is wrapped)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    original = fe._get_convert_map
    extra = _converters()

    def convert_map():
        return {**original(), **extra}

    fe._get_convert_map = convert_map
    _INSTALLED = True
