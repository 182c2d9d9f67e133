"""Narrow element types (float8, float4, int4, int2) and the byte-wide types that carry them.

ONNX has tensor types no compiler kernel computes on: the float8 formats, float4 (E2M1), the
E8M0 scale type and the 4- and 2-bit integers. An artifact keeps every such tensor in a byte per
element: the float formats as their bit patterns in ``uint8``, the integers as their values in
``int8`` / ``uint8`` (``compiler.narrow`` rewrites the model so). Callers still see the model's own
types: the runtime takes and returns ``ml_dtypes`` arrays (the types numpy lacks; ``onnx`` and
TVM depend on it) and converts at the boundary with ``to_carrier`` / ``from_carrier``.
"""

from __future__ import annotations

import numpy as np

#: narrow dtype name (numpy's, with ml_dtypes) -> (carrier dtype name, "bits" | "value")
NARROW: dict[str, tuple[str, str]] = {
    "float8_e4m3fn": ("uint8", "bits"),
    "float8_e4m3fnuz": ("uint8", "bits"),
    "float8_e5m2": ("uint8", "bits"),
    "float8_e5m2fnuz": ("uint8", "bits"),
    "float8_e8m0fnu": ("uint8", "bits"),
    "float4_e2m1fn": ("uint8", "bits"),
    "int4": ("int8", "value"),
    "uint4": ("uint8", "value"),
    "int2": ("int8", "value"),
    "uint2": ("uint8", "value"),
}


def np_dtype(name: str) -> np.dtype:
    """numpy's dtype for a name, narrow ones included (registered by importing ml_dtypes)."""
    if name in NARROW:
        import ml_dtypes  # noqa: F401  (registers the names with numpy)
    return np.dtype(name)


def carrier(name: str) -> str:
    """The dtype an artifact keeps a tensor of dtype ``name`` in (``name`` itself when not narrow)."""
    return NARROW[name][0] if name in NARROW else name


def to_carrier(arr: np.ndarray, name: str) -> np.ndarray:
    """An array of narrow dtype ``name`` as its carrier (bit patterns, or values); others unchanged."""
    if name not in NARROW:
        return arr
    kind, how = NARROW[name]
    arr = np.asarray(arr, order="C")  # (ascontiguousarray makes a scalar 1-d)
    return arr.view(np.uint8) if how == "bits" else arr.astype(kind)


def from_carrier(arr: np.ndarray, name: str) -> np.ndarray:
    """The carrier of a narrow dtype ``name`` back as that dtype; others unchanged."""
    if name not in NARROW:
        return arr
    kind, how = NARROW[name]
    arr = np.asarray(arr, dtype=kind, order="C")
    return arr.view(np_dtype(name)) if how == "bits" else arr.astype(np_dtype(name))
