"""An LSTM's or GRU's time loop as one CPU kernel (ONNX ``LSTM``/``GRU``, converted by ``converters``).

Unrolled (``recurrent``), a step is a small matmul, two gate kernels and their tensors, and the
launch and allocation of those cost more than their arithmetic: a CRNN's two bidirectional
LSTMs of 128 over 40 steps were some 1.9 ms of kernels a call. Here every step's input
projection is one matmul (the biases folded in), and the recurrence is one kernel: the
directions in parallel, each stepping through the sequence with ``h`` and ``c`` in a thread's
own buffers, ``h · Rᵀ`` accumulated into the gate pre-activations (vectors of the 4·hidden gate
columns), the gates, cell and hidden state in one vectorized pass. exp is TVM's polynomial
``fast_exp`` (LLVM has no vector exp; each element was a libm call), tanh(x) = 1 - 2/(e^2x + 1).
The same kernel onnxruntime and the like run, as a kernel of its own.

A GRU steps the same way: ``h · Rᵀ`` for its update and reset gates (and, with
``linear_before_reset``, its hidden gate), then with ``linear_before_reset`` 0 a second product
of ``r ⊙ h`` with the hidden gate's ``Rᵀ``.

What it takes (``fusable``): float32, the default activations (LSTM: Sigmoid, Tanh, Tanh; GRU:
Sigmoid, Tanh), any ``clip``, ``input_forget`` and peepholes (LSTM), ``linear_before_reset``
(GRU), initial states, either layout, forward, reverse or bidirectional, full-length sequences.
Anything else, and every recurrence on a GPU backend, is unrolled as before (``recurrent.unroll``).
"""

from __future__ import annotations

import numpy as np

from .rewrites import _fexp

_DEFAULT_ACTS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


def fusable(node, names, shapes: dict, types: dict) -> bool:
    """Whether the LSTM or GRU ``node`` compiles to the fused kernel (shapes known, float32, the
    default activations, full-length sequences)."""
    from onnx import TensorProto

    from .recurrent import _attr

    if node.op_type not in _DEFAULT_ACTS:
        return False
    ins = list(node.input) + [""] * (8 - len(node.input))
    x, w, r = ins[:3]
    if x not in shapes or w not in shapes or r not in shapes or names.value(w) is None or names.value(r) is None:
        return False
    if types.get(x) != TensorProto.FLOAT or any(not isinstance(d, int) or d <= 0 for d in shapes[x]):
        return False
    for i in (3, 7) if node.op_type == "LSTM" else (3,):  # B, P: constants the converter folds
        if ins[i] and names.value(ins[i]) is None:
            return False
    nd = 2 if _attr(node, "direction", "forward") == "bidirectional" else 1
    acts = [a.lower() for a in (_attr(node, "activations") or [])]
    if acts and acts != _DEFAULT_ACTS[node.op_type] * nd:
        return False
    if _attr(node, "activation_alpha") or _attr(node, "activation_beta"):
        return False
    if ins[4]:
        seq = shapes[x][1] if _attr(node, "layout", 0) else shapes[x][0]
        lens = names.value(ins[4])
        if lens is None or np.any(np.asarray(lens) != seq):
            return False
    return True


def _activations(clip):
    """(clip, sigmoid, tanh) as expressions: ``clip`` bounds an activation's input (ONNX's
    recurrence ``clip``; the identity without one), sigmoid clips its own, tanh(x) = 1 - 2/(e^2x + 1)."""
    from tvm import tirx

    one = tirx.const(1.0, "float32")

    def cl(v):
        if clip is None:
            return v
        return tirx.max(tirx.min(v, tirx.const(float(clip), "float32")), tirx.const(-float(clip), "float32"))

    def sig(v):
        return one / (one + _fexp(-cl(v)))

    def th(v):
        return one - tirx.const(2.0, "float32") / (_fexp(v + v) + one)

    return cl, sig, th


def lstm_kernel(seq: int, nd: int, batch: int, hidden: int, reverse: bool, clip, input_forget: bool,
                lanes: int):  # fmt: skip
    """The recurrence: (xw [nd, seq, batch, 4h] with biases, rt [nd, h, 4h], h0, c0 [nd, batch, h],
    p [nd, 3h]) -> (y [seq, nd, batch, h], y_h, y_c [nd, batch, h]); gates in ONNX's order
    i, o, f, c. Direction 1 (or a ``reverse`` node's only one) steps from the end."""
    from tvm.script import tirx as T

    H, G = hidden, 4 * hidden
    lanes = next(v for v in (lanes, 16, 8, 4, 2, 1) if v <= lanes and H % v == 0)
    hv, gv = H // lanes, G // lanes
    gu = next(u for u in (8, 4, 2, 1) if gv % u == 0)  # gate vectors accumulated together
    rv = 1 if reverse else 0
    iff = 1 if input_forget else 0
    cl, sig, th = _activations(clip)

    @T.prim_func(private=True)
    def lstm_steps(xw: T.Buffer((nd, seq, batch, G), "float32"), rt: T.Buffer((nd, H, G), "float32"),
                   h0: T.Buffer((nd, batch, H), "float32"), c0: T.Buffer((nd, batch, H), "float32"),
                   p: T.Buffer((nd, 3 * H), "float32"), y: T.Buffer((seq, nd, batch, H), "float32"),
                   yh: T.Buffer((nd, batch, H), "float32"), yc: T.Buffer((nd, batch, H), "float32")):  # fmt: skip
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        for d in T.parallel(nd):
            for b in range(batch):
                h = T.decl_buffer((H,), "float32")
                c = T.decl_buffer((H,), "float32")
                acc = T.decl_buffer((G,), "float32")
                for j0 in range(hv):
                    for j1 in T.vectorized(lanes):
                        h[j0 * lanes + j1] = h0[d, b, j0 * lanes + j1]
                        c[j0 * lanes + j1] = c0[d, b, j0 * lanes + j1]
                for t in range(seq):
                    tt: T.int32 = T.if_then_else(d + rv > 0, seq - 1 - t, t)
                    for g0 in range(gv):
                        for g1 in T.vectorized(lanes):
                            acc[g0 * lanes + g1] = xw[d, tt, b, g0 * lanes + g1]
                    for go in range(gv // gu):
                        for k in range(H):
                            for gi in T.unroll(gu):
                                for g1 in T.vectorized(lanes):
                                    acc[(go * gu + gi) * lanes + g1] = (acc[(go * gu + gi) * lanes + g1]
                                                                        + h[k] * rt[d, k, (go * gu + gi) * lanes + g1])  # fmt: skip
                    # No Let bindings in a vectorized loop (TVM's vectorizer miscompiles them):
                    # each gate is written back over its pre-activation.
                    for j0 in range(hv):
                        for j1 in T.vectorized(lanes):
                            acc[j0 * lanes + j1] = sig(acc[j0 * lanes + j1] + p[d, j0 * lanes + j1] * c[j0 * lanes + j1])
                            acc[2 * H + j0 * lanes + j1] = T.if_then_else(
                                iff == 1, T.float32(1) - acc[j0 * lanes + j1],
                                sig(acc[2 * H + j0 * lanes + j1] + p[d, 2 * H + j0 * lanes + j1] * c[j0 * lanes + j1]))  # fmt: skip
                            acc[3 * H + j0 * lanes + j1] = th(cl(acc[3 * H + j0 * lanes + j1]))
                            c[j0 * lanes + j1] = (acc[2 * H + j0 * lanes + j1] * c[j0 * lanes + j1]
                                                  + acc[j0 * lanes + j1] * acc[3 * H + j0 * lanes + j1])  # fmt: skip
                            acc[H + j0 * lanes + j1] = sig(acc[H + j0 * lanes + j1] + p[d, H + j0 * lanes + j1] * c[j0 * lanes + j1])
                            h[j0 * lanes + j1] = acc[H + j0 * lanes + j1] * th(c[j0 * lanes + j1])
                            y[tt, d, b, j0 * lanes + j1] = h[j0 * lanes + j1]
                for j0 in range(hv):
                    for j1 in T.vectorized(lanes):
                        yh[d, b, j0 * lanes + j1] = h[j0 * lanes + j1]
                        yc[d, b, j0 * lanes + j1] = c[j0 * lanes + j1]

    return lstm_steps


def gru_kernel(seq: int, nd: int, batch: int, hidden: int, reverse: bool, clip, linear_before_reset: bool,
               lanes: int):  # fmt: skip
    """The GRU recurrence: (xw [nd, seq, batch, 3h] with the input biases (and, without
    ``linear_before_reset``, the hidden gate's recurrent bias), rt [nd, h, 3h], h0 [nd, batch, h],
    rbh [nd, h]: the hidden gate's recurrent bias, inside ``r ⊙ (...)`` with
    ``linear_before_reset``) -> (y [seq, nd, batch, h], y_h [nd, batch, h]); gates z, r, h."""
    from tvm.script import tirx as T

    H, G = hidden, 3 * hidden
    lanes = next(v for v in (lanes, 16, 8, 4, 2, 1) if v <= lanes and H % v == 0)
    hv = H // lanes
    mv = (G if linear_before_reset else 2 * H) // lanes  # vectors of the first product's columns
    gu = next(u for u in (8, 4, 2, 1) if mv % u == 0)
    hu = next(u for u in (8, 4, 2, 1) if hv % u == 0)
    rv = 1 if reverse else 0
    lbr = 1 if linear_before_reset else 0
    cl, sig, th = _activations(clip)

    @T.prim_func(private=True)
    def gru_steps(xw: T.Buffer((nd, seq, batch, G), "float32"), rt: T.Buffer((nd, H, G), "float32"),
                  h0: T.Buffer((nd, batch, H), "float32"), rbh: T.Buffer((nd, H), "float32"),
                  y: T.Buffer((seq, nd, batch, H), "float32"), yh: T.Buffer((nd, batch, H), "float32")):  # fmt: skip
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        for d in T.parallel(nd):
            for b in range(batch):
                h = T.decl_buffer((H,), "float32")
                rh = T.decl_buffer((H,), "float32")
                acc = T.decl_buffer((G,), "float32")
                for j0 in range(hv):
                    for j1 in T.vectorized(lanes):
                        h[j0 * lanes + j1] = h0[d, b, j0 * lanes + j1]
                for t in range(seq):
                    tt: T.int32 = T.if_then_else(d + rv > 0, seq - 1 - t, t)
                    for g0 in range(mv):
                        for g1 in T.vectorized(lanes):
                            acc[g0 * lanes + g1] = T.float32(0)
                    for go in range(mv // gu):
                        for k in range(H):
                            for gi in T.unroll(gu):
                                for g1 in T.vectorized(lanes):
                                    acc[(go * gu + gi) * lanes + g1] = (acc[(go * gu + gi) * lanes + g1]
                                                                        + h[k] * rt[d, k, (go * gu + gi) * lanes + g1])  # fmt: skip
                    # z over its pre-activation, r over its, r ⊙ h for the second product.
                    for j0 in range(hv):
                        for j1 in T.vectorized(lanes):
                            acc[j0 * lanes + j1] = sig(xw[d, tt, b, j0 * lanes + j1] + acc[j0 * lanes + j1])
                            acc[H + j0 * lanes + j1] = sig(xw[d, tt, b, H + j0 * lanes + j1] + acc[H + j0 * lanes + j1])
                            rh[j0 * lanes + j1] = acc[H + j0 * lanes + j1] * h[j0 * lanes + j1]
                    if lbr == 0:
                        for j0 in range(hv):
                            for j1 in T.vectorized(lanes):
                                acc[2 * H + j0 * lanes + j1] = T.float32(0)
                        for go in range(hv // hu):
                            for k in range(H):
                                for gi in T.unroll(hu):
                                    for g1 in T.vectorized(lanes):
                                        acc[2 * H + (go * hu + gi) * lanes + g1] = (
                                            acc[2 * H + (go * hu + gi) * lanes + g1]
                                            + rh[k] * rt[d, k, 2 * H + (go * hu + gi) * lanes + g1])  # fmt: skip
                    for j0 in range(hv):
                        for j1 in T.vectorized(lanes):
                            acc[2 * H + j0 * lanes + j1] = th(cl(xw[d, tt, b, 2 * H + j0 * lanes + j1] + T.if_then_else(
                                lbr == 1, acc[H + j0 * lanes + j1] * (acc[2 * H + j0 * lanes + j1] + rbh[d, j0 * lanes + j1]),
                                acc[2 * H + j0 * lanes + j1])))  # fmt: skip
                            h[j0 * lanes + j1] = ((T.float32(1) - acc[j0 * lanes + j1]) * acc[2 * H + j0 * lanes + j1]
                                                  + acc[j0 * lanes + j1] * h[j0 * lanes + j1])  # fmt: skip
                            y[tt, d, b, j0 * lanes + j1] = h[j0 * lanes + j1]
                for j0 in range(hv):
                    for j1 in T.vectorized(lanes):
                        yh[d, b, j0 * lanes + j1] = h[j0 * lanes + j1]

    return gru_steps


def emit(bb, op: str, inputs, attr: dict, lanes: int = 16):
    """The Relax of an ONNX LSTM or GRU node (``converters``): the input projections as one
    matmul, then the recurrence kernel. Returns (Y, Y_h[, Y_c]) in the node's layout."""
    from tvm import relax

    from .rewrites import constant_array

    def ints(e):
        return [int(d) for d in e.ty.shape]

    def const(e):
        if e is None:
            return None
        value = constant_array(e)
        if value is None:
            raise ValueError(f"{op}'s W, R, B and P must be constants")
        return value

    def text(v, default):
        if v is None:
            return default
        return v.decode() if isinstance(v, bytes) else v

    gates = 4 if op == "LSTM" else 3
    x, w, r = inputs[0], const(inputs[1]), const(inputs[2])
    b = const(inputs[3]) if len(inputs) > 3 else None
    h0 = inputs[5] if len(inputs) > 5 else None
    c0 = inputs[6] if len(inputs) > 6 and op == "LSTM" else None
    peep = const(inputs[7]) if len(inputs) > 7 and op == "LSTM" else None
    layout = int(attr.get("layout", 0))
    direction = text(attr.get("direction"), "forward")
    nd = 2 if direction == "bidirectional" else 1
    hidden = int(attr.get("hidden_size") or w.shape[1] // gates)
    gh = gates * hidden
    lbr = op == "GRU" and bool(attr.get("linear_before_reset", 0))
    if layout:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
    seq, batch, size = ints(x)
    # every step's input projection at once, both directions: [nd, seq*batch, G*h]
    wt = relax.const(np.ascontiguousarray(w.transpose(0, 2, 1)).astype("float32"))
    xw = bb.emit(relax.op.matmul(relax.op.reshape(x, (1, seq * batch, size)), wt))
    rbh = np.zeros((nd, hidden), "float32")
    if b is not None:
        wb, rb = b[:, :gh].astype("float32"), b[:, gh:].astype("float32")
        if lbr:  # the hidden gate's recurrent bias goes inside r ⊙ (h·R_hᵀ + Rb_h)
            rbh = np.ascontiguousarray(rb[:, 2 * hidden :])
            rb = np.concatenate([rb[:, : 2 * hidden], np.zeros_like(rbh)], axis=1)
        xw = bb.emit(relax.op.add(xw, relax.const((wb + rb).reshape(nd, 1, gh))))
    xw = bb.emit(relax.op.reshape(xw, (nd, seq, batch, gh)))
    rt = relax.const(np.ascontiguousarray(r.transpose(0, 2, 1)).astype("float32"))

    def state(s):
        if s is None:
            return relax.const(np.zeros((nd, batch, hidden), "float32"))
        return bb.emit(relax.op.permute_dims(s, [1, 0, 2])) if layout else s

    f32 = "float32"
    ys = relax.TensorType((seq, nd, batch, hidden), f32)
    hs = relax.TensorType((nd, batch, hidden), f32)
    if op == "LSTM":
        p = np.zeros((nd, 3 * hidden), f32) if peep is None else peep.astype(f32).reshape(nd, 3 * hidden)
        func = lstm_kernel(seq, nd, batch, hidden, direction == "reverse", attr.get("clip"),
                           bool(attr.get("input_forget", 0)), lanes)  # fmt: skip
        gv = bb.add_func(func, "lstm_steps")
        out = bb.emit(relax.call_tir(gv, [xw, rt, state(h0), state(c0), relax.const(p)], [ys, hs, hs]))
    else:
        func = gru_kernel(seq, nd, batch, hidden, direction == "reverse", attr.get("clip"), lbr, lanes)
        gv = bb.add_func(func, "gru_steps")
        out = bb.emit(relax.call_tir(gv, [xw, rt, state(h0), relax.const(rbh)], [ys, hs]))
    outs = [bb.emit(relax.TupleGetItem(out, i)) for i in range(3 if op == "LSTM" else 2)]
    if layout:
        outs = [bb.emit(relax.op.permute_dims(outs[0], [2, 0, 1, 3]))] + [
            bb.emit(relax.op.permute_dims(o, [1, 0, 2])) for o in outs[1:]]  # fmt: skip
    return relax.Tuple(outs)
