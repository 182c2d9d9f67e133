"""What the ONNX import passes (importer, expand, legalize, controlflow, recurrent) ask of a graph:
a node's attribute, the model's opset, static shapes; and swapping a graph's node list."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of the node's attribute ``name`` (bytes for strings), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every typed tensor whose shape inference fixed every dim (graph inputs, intermediates, outputs)."""
    shapes = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[vi.name] = tuple(dims)
    return shapes


def replace_nodes(g: onnx.GraphProto, nodes: list, inits: list) -> None:
    """The graph's nodes become ``nodes``; ``inits`` join its initializers."""
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
