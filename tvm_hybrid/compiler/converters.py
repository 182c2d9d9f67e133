"""Converters added to TVM's ONNX frontend, the way it is extended: a class per op with
``_impl_vN`` methods, registered in the frontend's convert map (``install``, idempotent)."""

from __future__ import annotations

_INSTALLED = False


def _converters() -> dict:
    import tvm
    from tvm import relax, topi
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    class CumProd(fe.OnnxOpConverter):
        """CumProd (opset 26): TVM's cumprod kernel, reversed with flips; the axis must be a
        constant (``--input NAME=VALUE`` fixes one given as an input)."""

        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            data = inputs[0]
            axis = fe.get_constant(inputs[1], params)
            if isinstance(axis, tvm.ir.GenericConst):
                axis = axis.value.numpy()
            elif isinstance(axis, relax.Constant):
                axis = axis.data.numpy()
            else:
                raise ValueError("CumProd's axis must be a compile-time constant")
            axis = int(axis.ravel()[0])
            reverse = attr.get("reverse", 0) != 0
            if reverse:
                data = bb.emit_te(topi.flip, data, axis=axis)
            out = bb.emit_te(topi.cumprod, data, axis, None, attr.get("exclusive", 0) != 0)
            if reverse:
                out = bb.emit_te(topi.flip, out, axis=axis)
            return out

    return {"CumProd": CumProd}


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
