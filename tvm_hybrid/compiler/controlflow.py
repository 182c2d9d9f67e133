"""Control flow made static at import: ``If`` on a condition known at compile time is replaced by
its branch, ``Loop`` with a known trip count and ``Scan`` are unrolled, and the recurrent ops
(RNN, GRU, LSTM) are unrolled into the matmuls and gates they are. What is left after this
(an ``If`` on a run-time condition) goes to TVM's frontend, which builds Relax control flow.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from ..errors import UnsupportedError
from .onnx_graph import attr as _attr
from .onnx_graph import opset, replace_nodes

#: Most nodes an unrolled loop may add (iterations × body nodes): beyond, the model is refused.
MAX_UNROLLED_NODES = 200_000


class _Names:
    def __init__(self, model: onnx.ModelProto):
        self.opset = opset(model)
        self.ids = itertools.count()
        self.inits: list[onnx.TensorProto] = []
        self.values = {t.name: t for t in model.graph.initializer}

    def fresh(self, hint: str) -> str:
        return f"{hint}__cf{next(self.ids)}"

    def const(self, value, hint: str) -> str:
        name = self.fresh(hint)
        t = numpy_helper.from_array(np.asarray(value), name)
        self.inits.append(t)
        self.values[name] = t
        return name

    def value(self, name: str) -> np.ndarray | None:
        t = self.values.get(name)
        return None if t is None else numpy_helper.to_array(t)


def _instantiate(body: onnx.GraphProto, bind: dict[str, str], suffix: str, names: _Names) -> tuple[list, dict]:
    """The body's nodes with its inputs bound (``bind``: body name -> outer name) and every name
    it defines made unique with ``suffix``; returns (nodes, body name -> outer name)."""
    env = dict(bind)
    for t in body.initializer:
        new = f"{t.name}{suffix}"
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = new
        names.inits.append(c)
        names.values[new] = c
        env[t.name] = new
    nodes = []
    for n in body.node:
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.input[:] = [env.get(i, i) if i else "" for i in n.input]
        for k, o in enumerate(n.output):
            if o:
                env[o] = f"{o}{suffix}"
                new.output[k] = env[o]
        new.name = f"{n.name or n.op_type}{suffix}"
        for a in new.attribute:  # names a nested subgraph reads from this body
            if a.type == AttributeProto.GRAPH:
                _rename_outer(a.g, env)
        nodes.append(new)
    return nodes, env


def _rename_outer(g: onnx.GraphProto, env: dict[str, str]) -> None:
    own = {vi.name for vi in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for n in g.node:
        n.input[:] = [env[i] if i in env and i not in own else i for i in n.input]
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                _rename_outer(a.g, {k: v for k, v in env.items() if k not in own})


def _static_if(node, names: _Names):
    cond = names.value(node.input[0])
    if cond is None:
        return None
    branch = _attr(node, "then_branch" if bool(np.asarray(cond).ravel()[0]) else "else_branch")
    nodes, env = _instantiate(branch, {}, names.fresh("_if"), names)
    for o, bo in zip(node.output, branch.output):
        if o:
            nodes.append(helper.make_node("Identity", [env.get(bo.name, bo.name)], [o], name=f"{o}__if_out"))
    return nodes


def _scan(node, names: _Names, shapes: dict):
    body = _attr(node, "body")
    m = _attr(node, "num_scan_inputs")
    ins = list(node.input)
    n_state = len(ins) - m
    states, scans = ins[:n_state], ins[n_state:]
    in_axes = list(_attr(node, "scan_input_axes", [0] * m))
    in_dirs = list(_attr(node, "scan_input_directions", [0] * m))
    n_scan_out = len(body.output) - n_state
    out_axes = list(_attr(node, "scan_output_axes", [0] * n_scan_out))
    out_dirs = list(_attr(node, "scan_output_directions", [0] * n_scan_out))
    if any(s not in shapes for s in scans):
        return None
    lengths = {shapes[s][a % len(shapes[s])] for s, a in zip(scans, in_axes)}
    if len(lengths) != 1:
        raise UnsupportedError(f"Scan node {node.name!r}: scan inputs of different lengths {sorted(lengths)}")
    steps = lengths.pop()
    _check_size(node, steps, len(body.node))
    nodes, cur = [], list(states)
    per_step: list[list[str]] = [[] for _ in range(n_scan_out)]
    for t in range(steps):
        bind = {vi.name: s for vi, s in zip(body.input[:n_state], cur)}
        for k, (s, vi) in enumerate(zip(scans, body.input[n_state:])):
            axis = in_axes[k] % len(shapes[s])
            idx = steps - 1 - t if in_dirs[k] else t
            sl = names.fresh(f"{vi.name}_t{t}")
            nodes.append(helper.make_node("Gather", [s, names.const(np.array(idx, np.int64), sl)], [sl], axis=axis))
            bind[vi.name] = sl
        body_nodes, env = _instantiate(body, bind, names.fresh(f"_scan{t}"), names)
        nodes += body_nodes
        outs = [env.get(o.name, o.name) for o in body.output]
        cur = outs[:n_state]
        for k in range(n_scan_out):
            per_step[k].append(outs[n_state + k])
    for o, c in zip(node.output[:n_state], cur):
        if o:
            nodes.append(helper.make_node("Identity", [c], [o]))
    for k, o in enumerate(node.output[n_state:]):
        if not o:
            continue
        seq = per_step[k][::-1] if out_dirs[k] else per_step[k]
        axis = out_axes[k]
        ups = []
        for j, name in enumerate(seq):
            u = names.fresh(f"{o}_u{j}")
            nodes.append(_unsqueeze(names, name, axis, u))
            ups.append(u)
        nodes.append(helper.make_node("Concat", ups, [o], axis=axis))
    return nodes


def _loop(node, names: _Names):
    body = _attr(node, "body")
    trip = names.value(node.input[0]) if node.input[0] else None
    cond = names.value(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(True)
    if trip is None or cond is None:
        return None
    steps = int(np.asarray(trip).ravel()[0])
    if not bool(np.asarray(cond).ravel()[0]):
        steps = 0
    n_state = len(node.input) - 2
    n_scan_out = len(body.output) - 1 - n_state
    cond_out = body.output[0].name
    cond_in = body.input[1].name
    producers = {o: n for n in body.node for o in n.output}
    p = producers.get(cond_out)
    passthrough = cond_out == cond_in or (p is not None and p.op_type == "Identity" and p.input[0] == cond_in)
    const_true = False
    if p is not None and p.op_type == "Constant":
        const_true = bool(numpy_helper.to_array(p.attribute[0].t).ravel()[0])
    if not (passthrough or const_true or any(t.name == cond_out for t in body.initializer)):
        raise UnsupportedError(f"Loop node {node.name!r}: its exit condition is computed in the body "
                               "(a data-dependent trip count); tvm-hybrid unrolls loops with a fixed trip count")  # fmt: skip
    if n_scan_out and steps == 0:
        raise UnsupportedError(f"Loop node {node.name!r}: zero iterations with scan outputs (empty, untyped)")
    _check_size(node, steps, len(body.node))
    nodes, cur = [], list(node.input[2:])
    per_step: list[list[str]] = [[] for _ in range(n_scan_out)]
    true = names.const(np.array(True), "loop_cond")
    for t in range(steps):
        bind = {body.input[0].name: names.const(np.array(t, np.int64), "iter"), body.input[1].name: true}
        bind.update({vi.name: s for vi, s in zip(body.input[2:], cur)})
        body_nodes, env = _instantiate(body, bind, names.fresh(f"_loop{t}"), names)
        nodes += body_nodes
        outs = [env.get(o.name, o.name) for o in body.output]
        cur = outs[1:1 + n_state]
        for k in range(n_scan_out):
            per_step[k].append(outs[1 + n_state + k])
    for o, c in zip(node.output[:n_state], cur):
        if o:
            nodes.append(helper.make_node("Identity", [c], [o]))
    for k, o in enumerate(node.output[n_state:]):
        if o:
            ups = []
            for j, name in enumerate(per_step[k]):
                u = names.fresh(f"{o}_u{j}")
                nodes.append(_unsqueeze(names, name, 0, u))
                ups.append(u)
            nodes.append(helper.make_node("Concat", ups, [o], axis=0))
    return nodes


def _unsqueeze(names: _Names, x: str, axis: int, out: str) -> onnx.NodeProto:
    """Unsqueeze as the model's opset spells it (axes an attribute before 13, an input since)."""
    if names.opset < 13:
        return helper.make_node("Unsqueeze", [x], [out], axes=[axis])
    return helper.make_node("Unsqueeze", [x, names.const(np.array([axis], np.int64), out)], [out])


def _check_size(node, steps: int, body_nodes: int) -> None:
    if steps * max(body_nodes, 1) > MAX_UNROLLED_NODES:
        raise UnsupportedError(
            f"{node.op_type} node {node.name!r}: {steps} iterations of a {body_nodes}-node body unroll to more "
            f"than {MAX_UNROLLED_NODES} nodes; tvm-hybrid unrolls loops (shorten the sequence with --input)"
        )


def static_control_flow(model: onnx.ModelProto, recurrences: bool = False) -> bool:
    """Replace If on a constant condition, Loop with constant trip count, Scan and the recurrent
    ops, in place; True when something changed (shapes need inferring again). An LSTM that the
    fused kernel takes (``fused_recurrence.fusable``) stays a node unless ``recurrences`` (what
    GPU backends ask for: ``unroll_recurrences``)."""
    from . import fused_recurrence, recurrent
    from .legalize import Ctx

    g = model.graph
    info = Ctx(model)
    shapes, types = info.shapes, info.types
    names = _Names(model)
    out, changed = [], False
    for node in g.node:
        new = None
        if node.domain in ("", "ai.onnx"):
            if node.op_type == "If":
                new = _static_if(node, names)
            elif node.op_type == "Scan" and opset(model) >= 9:
                new = _scan(node, names, shapes)
            elif node.op_type == "Loop":
                new = _loop(node, names)
            elif node.op_type in recurrent.OPS:
                if recurrences or not fused_recurrence.fusable(node, names, shapes, types):
                    new = recurrent.unroll(node, names, shapes, types)
        if new is None:
            out.append(node)
        else:
            out.extend(new)
            changed = True
    if changed:
        replace_nodes(g, out, names.inits)
    return changed

