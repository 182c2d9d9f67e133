"""KServe / Open Inference Protocol v2 tensors: JSON and the binary tensor data extension.

Shared by the runtime's cloud client and the server; numpy and the standard library only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
# tvm-hybrid serve's extensions, read by the runtime's adaptive cut choice (other v2 servers lack
# them; the runtime then counts their time as link time): per infer, the milliseconds the request
# waited for a worker and computed; on /v2/health/ready, "IN_FLIGHT/WORKERS".
QUEUE_HEADER = "Inference-Queue-Ms"
COMPUTE_HEADER = "Inference-Compute-Ms"
LOAD_HEADER = "Inference-Load"

_TO_V2 = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}  # fmt: skip
_FROM_V2 = {v: k for k, v in _TO_V2.items()}


class ProtocolError(ValueError):
    """A malformed v2 request or response (the server answers 400)."""


def v2_datatype(dtype: str) -> str:
    try:
        return _TO_V2[str(np.dtype(dtype))]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} has no v2 datatype") from None


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return np.dtype(_FROM_V2[datatype])
    except KeyError:
        raise ProtocolError(f"unknown v2 datatype {datatype!r}; known: {', '.join(_FROM_V2)}") from None


def encode(tensors: dict[str, np.ndarray], *, binary: bool, key: str = "inputs",
           parameters: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """A v2 request or response body and its headers; ``binary`` uses the binary extension."""
    doc: dict[str, Any] = dict(extra or {})
    items, blobs = [], []
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # not ascontiguousarray: it makes a scalar 1-d
        item = {"name": name, "shape": list(arr.shape), "datatype": v2_datatype(str(arr.dtype))}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = arr.reshape(-1).tolist()
        items.append(item)
    doc[key] = items
    if parameters:
        doc["parameters"] = parameters
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def decode(body: bytes, header_length: str | None, *, key: str = "inputs",
           max_elements: int = 1 << 31) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """Parse a v2 body (JSON, or JSON + binary blobs); returns the JSON document and the tensors."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit a {len(body)}-byte body")
        head, rest = body[:n], memoryview(body)[n:]
    else:
        head, rest = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except ValueError as e:
        raise ProtocolError(f"body is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise ProtocolError(f"body needs a list of {key!r}")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in doc[key]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"every {key} entry needs a name")
        name = item["name"]
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of non-negative integers")
        count = int(np.prod(shape, dtype=np.int64))
        if count > max_elements:
            raise ProtocolError(f"tensor {name!r}: {count} elements is more than allowed")
        dtype = numpy_dtype(item.get("datatype", ""))
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(rest):
                raise ProtocolError(f"tensor {name!r}: binary_data_size {size!r} does not match shape {shape} {dtype}")
            arr = np.frombuffer(rest[offset : offset + size], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
            offset += size
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise ProtocolError(f"tensor {name!r} has neither data nor binary_data_size")
            try:
                arr = np.asarray(data, dtype=dtype).reshape(shape)
            except (ValueError, TypeError) as e:
                raise ProtocolError(f"tensor {name!r}: data does not fit shape {shape} {dtype}: {e}") from None
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} given twice")
        tensors[name] = arr
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes of binary data belong to no tensor")
    return doc, tensors
