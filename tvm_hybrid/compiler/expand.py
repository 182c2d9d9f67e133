"""ONNX-level expansion of ops TVM's Relax frontend cannot take as they stand.

ONNX defines many ops as functions of simpler ones (SoftmaxCrossEntropyLoss, Attention, Swish,
Celu, LayerNormalization…): the schema carries the body. Where the frontend has no converter for
an op, or its converter does not implement the standard op (TVM's ``Attention`` converter is
com.microsoft's), the node is replaced by its function body, as ONNX's own "_expanded" node tests
do, until only ops the frontend converts are left.
"""

from __future__ import annotations

import logging
from typing import Callable

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, helper

from .onnx_graph import attr, opset, replace_nodes

log = logging.getLogger(__name__)

#: Op types the frontend has a converter for that implements a different op (another domain's).
_MISMATCHED = {"Attention"}
#: Rounds of expansion (a body may hold function ops of its own).
_MAX_ROUNDS = 8


def _schema(op_type: str, opset: int, domain: str = ""):
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def needs_expansion(node: NodeProto, supported: set[str], used: set[str], types: dict | None = None) -> bool:
    """Whether the frontend cannot convert ``node`` as it is (``used``: tensor names some node
    or graph output reads; ``types``: TypeProtos by tensor name)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type not in supported or node.op_type in _MISMATCHED:
        return True
    # TVM's LayerNormalization converter returns Y only, not Mean and InvStdDev.
    if node.op_type == "LayerNormalization" and any(o in used for o in node.output[1:] if o):
        return True
    # ONNX infers no shape for some function ops (GroupNormalization-21, MeanVarianceNormalization):
    # through their bodies it does.
    if types and all(_static(types.get(i)) for i in node.input if i) and \
            not all(_static(types.get(o)) for o in node.output if o):  # fmt: skip
        return True
    # TVM's rms_norm kernel fails to build when every axis is normalized (axis 0).
    if node.op_type == "RMSNormalization" and types and node.input[0] in types:
        rank = len(types[node.input[0]].tensor_type.shape.dim)
        axis = attr(node, "axis", -1)
        if rank and axis % rank == 0:
            return True
    return False


def _static(t) -> bool:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in t.tensor_type.shape.dim)


def function_body(node: NodeProto, opset: int, input_types: list[onnx.TypeProto]) -> FunctionProto | None:
    """The op's function body at ``opset`` (the newest defined at or below it), or None."""
    schema = _schema(node.op_type, opset, node.domain)
    if schema is None:
        return None
    versions = [v for v in schema.function_opset_versions if v <= opset]
    ctx_versions = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    fp = FunctionProto()
    if ctx_versions and (not versions or max(ctx_versions) >= max(versions)):
        if any(t is None for t in input_types):
            return None
        with_defaults = _with_defaults(node, schema)
        try:
            data = schema.get_context_dependent_function_with_opset_version(
                max(ctx_versions), with_defaults.SerializeToString(), [t.SerializeToString() for t in input_types]
            )
        except Exception as e:  # the schema's builder refuses these inputs
            log.debug("no body for %s: %s", node.op_type, e)
            return None
        fp.ParseFromString(data)
    elif versions:
        fp.ParseFromString(schema.get_function_with_opset_version(max(versions)))
    else:
        return None
    return fp if fp.node else None


def _with_defaults(node: NodeProto, schema) -> NodeProto:
    """The node with every attribute the schema gives a default for set explicitly."""
    out = NodeProto()
    out.CopyFrom(node)
    have = {a.name for a in node.attribute}
    for name, spec in schema.attributes.items():
        if name not in have and spec.default_value and spec.default_value.type != AttributeProto.UNDEFINED:
            out.attribute.append(spec.default_value)
    return out


def inline(node: NodeProto, body: FunctionProto, prefix: str, schema) -> list[NodeProto] | None:
    """The body's nodes wired to ``node``'s inputs and outputs, internal names prefixed, attribute
    references resolved (to the node's attribute or the schema's default). None when the body
    has subgraphs (not renamed here)."""
    node = _with_defaults(node, schema) if schema is not None else node
    names = {}
    for i, name in enumerate(body.input):
        names[name] = node.input[i] if i < len(node.input) else ""
    for i, name in enumerate(body.output):
        if i < len(node.output) and node.output[i]:
            names[name] = node.output[i]
    attrs = {a.name: a for a in node.attribute}

    def rename(n: str) -> str:
        if n in names:
            return names[n]
        return "" if n == "" else prefix + n

    out = []
    for inner in body.node:
        new = NodeProto()
        new.CopyFrom(inner)
        del new.input[:]
        del new.output[:]
        del new.attribute[:]
        new.input.extend(rename(n) for n in inner.input)
        new.output.extend(rename(n) for n in inner.output)
        new.name = prefix + (inner.name or inner.op_type)
        for a in inner.attribute:
            if a.HasField("ref_attr_name"):
                new.attribute.extend(_referenced(a, attrs))
                continue
            if a.type == AttributeProto.GRAPHS:
                return None
            if a.type == AttributeProto.GRAPH:
                b = AttributeProto()
                b.CopyFrom(a)
                _rename_subgraph(b.g, rename, attrs, prefix)
                new.attribute.append(b)
                continue
            new.attribute.append(a)
        out.append(new)
    return out


def _referenced(a: AttributeProto, attrs: dict) -> list[AttributeProto]:
    """A body attribute that refers to the node's (``ref_attr_name``), resolved: the node's
    value under the body's name, or nothing when the node does not set it."""
    if a.ref_attr_name not in attrs:
        return []
    b = AttributeProto()
    b.CopyFrom(attrs[a.ref_attr_name])
    b.name = a.name
    return [b]


def _rename_subgraph(g: onnx.GraphProto, outer: Callable[[str], str], attrs: dict, prefix: str) -> None:
    """Rename a body node's subgraph in place: its own names get the prefix, names it reads from
    the body are renamed as the body's are, attribute references resolved."""
    own = {}
    for vi in [*g.input, *g.output]:
        own[vi.name] = vi.name = prefix + vi.name
    for t in g.initializer:
        own[t.name] = t.name = prefix + t.name
    for n in g.node:
        for o in n.output:
            if o:
                own.setdefault(o, prefix + o)

    def rename(name: str) -> str:
        return own.get(name) or (outer(name) if name else "")

    for n in g.node:
        n.input[:] = [rename(i) for i in n.input]
        n.output[:] = [rename(o) for o in n.output]
        keep = []
        for a in n.attribute:
            if a.HasField("ref_attr_name"):
                keep.extend(_referenced(a, attrs))
                continue
            if a.type == AttributeProto.GRAPH:
                _rename_subgraph(a.g, rename, attrs, prefix)
            keep.append(a)
        del n.attribute[:]
        n.attribute.extend(keep)
    for vi in g.value_info:
        vi.name = rename(vi.name)


def expand_functions(model: onnx.ModelProto, supported: set[str], infer: Callable,
                     also: Callable[[NodeProto, dict], bool] | None = None) -> onnx.ModelProto:  # fmt: skip
    """Replace every node the frontend cannot take by its ONNX function body, re-inferring shapes
    between rounds (``infer``); ``also(node, types)``: other nodes to expand. Nodes with no body
    are left for the caller to report."""
    version = opset(model)
    for round_ in range(_MAX_ROUNDS):
        g = model.graph
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        types = {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}
        for t in g.initializer:
            types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
        new_nodes: list[NodeProto] = []
        changed = False
        for i, node in enumerate(g.node):
            if needs_expansion(node, supported, used, types) or (also is not None and also(node, types)):
                body = function_body(node, version, [types.get(x) if x else onnx.TypeProto() for x in node.input])
                nodes = None
                if body is not None:
                    prefix = f"{node.name or node.op_type}__{round_}_{i}__"
                    nodes = inline(node, body, prefix, _schema(node.op_type, version, node.domain))
                if nodes:
                    log.debug("expanded %s (%s) into %d nodes", node.name, node.op_type, len(nodes))
                    new_nodes.extend(nodes)
                    changed = True
                    continue
            new_nodes.append(node)
        if not changed:
            return model
        replace_nodes(g, new_nodes, [])
        # A body may use ops from a newer opset than the model imports (the function's own
        # opset_import); the schema versions chosen above are at the model's opset, so it holds.
        model = infer(model)
    return model
