"""RNN, GRU and LSTM unrolled into the ops they are made of (TVM's Relax frontend has no
converter for them). The input projection of every time step is one matmul; each step adds the
recurrent matmul and the gates. Only ops that mean the same in every opset since 7 are emitted
(Gather, MatMul, Reshape, Concat, elementwise; Slice from opset 10), so the model's opset stays
as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedError
from .onnx_graph import attr

OPS = {"RNN", "GRU", "LSTM"}
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


class _Emit:
    def __init__(self, names, hint: str, dtype):
        self.names, self.hint, self.dtype = names, hint, dtype
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.names.fresh(f"{self.hint}_{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def const(self, value, dtype=None) -> str:
        return self.names.const(np.asarray(value, dtype or self.dtype), self.hint)

    def idx(self, value) -> str:
        return self.names.const(np.asarray(value, np.int64), self.hint)

    def cols(self, x: str, start: int, size: int) -> str:
        """x[..., start:start + size]: a Slice (a strided view for TVM) from opset 10, where its
        bounds became inputs; a Gather of the columns before."""
        if self.names.opset >= 10:
            return self.op("Slice", [x, self.idx([start]), self.idx([start + size]), self.idx([-1])])
        return self.op("Gather", [x, self.idx(np.arange(start, start + size))], axis=-1)

    def act(self, kind: str, x: str, alpha, beta) -> str:
        k = kind.lower()
        if k == "sigmoid":
            return self.op("Sigmoid", [x])
        if k == "tanh":
            return self.op("Tanh", [x])
        if k == "relu":
            return self.op("Relu", [x])
        if k == "leakyrelu":
            return self.op("LeakyRelu", [x], alpha=0.01 if alpha is None else alpha)
        if k == "elu":
            return self.op("Elu", [x], alpha=1.0 if alpha is None else alpha)
        if k == "softsign":
            return self.op("Softsign", [x])
        if k == "softplus":
            return self.op("Softplus", [x])
        if k == "hardsigmoid":
            return self.op("HardSigmoid", [x], alpha=0.2 if alpha is None else alpha, beta=0.5 if beta is None else beta)
        if k == "thresholdedrelu":
            a = 1.0 if alpha is None else alpha
            keep = self.op("Cast", [self.op("Greater", [x, self.const(a)])], to=helper.np_dtype_to_tensor_dtype(self.dtype))
            return self.op("Mul", [x, keep])
        if k == "scaledtanh":
            a, b = (1.0 if alpha is None else alpha), (1.0 if beta is None else beta)
            return self.op("Mul", [self.const(a), self.op("Tanh", [self.op("Mul", [x, self.const(b)])])])
        if k == "affine":
            a, b = (1.0 if alpha is None else alpha), (0.0 if beta is None else beta)
            return self.op("Add", [self.op("Mul", [x, self.const(a)]), self.const(b)])
        raise UnsupportedError(f"recurrent activation {kind!r} is not an ONNX RNN activation")


def _attr(node, name, default=None):
    """``onnx_graph.attr`` with strings (and lists of them) decoded."""
    v = attr(node, name, default)
    if isinstance(v, list):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v.decode() if isinstance(v, bytes) else v


def unroll(node: onnx.NodeProto, names, shapes: dict, types: dict):
    """The node's steps as plain ops, or None when its input shapes are not known yet."""
    op = node.op_type
    ins = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, seq_lens, h0 = ins[:6]
    c0, peep = (ins[6], ins[7]) if op == "LSTM" else ("", "")
    if x not in shapes or w not in shapes:
        return None
    layout = _attr(node, "layout", 0)
    xs = shapes[x]
    seq, batch = (xs[1], xs[0]) if layout else (xs[0], xs[1])
    hidden = _attr(node, "hidden_size") or shapes[w][1] // _GATES[op]
    direction = _attr(node, "direction", "forward")
    nd = 2 if direction == "bidirectional" else 1
    gates = _GATES[op]
    acts = _attr(node, "activations") or _DEFAULT_ACTS[op] * nd
    per = len(_DEFAULT_ACTS[op])
    alphas = list(_attr(node, "activation_alpha", []) or [])
    betas = list(_attr(node, "activation_beta", []) or [])
    clip = _attr(node, "clip")
    if seq_lens:
        lens = names.value(seq_lens)
        if lens is None or np.any(np.asarray(lens) != seq):
            raise UnsupportedError(f"{op} node {node.name!r}: sequence_lens shorter than the sequence (padded batches) "
                                   "are not compiled; give full-length sequences")  # fmt: skip
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(_elem(names, types, x, node)))
    e = _Emit(names, f"{node.name or op}", dtype)
    if layout:
        x = e.op("Transpose", [x], perm=[1, 0, 2])
    fns, k_act = [], 0
    for d in range(nd):
        fn = []
        for j in range(per):
            fn.append((acts[d * per + j] if d * per + j < len(acts) else _DEFAULT_ACTS[op][j],
                       alphas[k_act] if k_act < len(alphas) else None, betas[k_act] if k_act < len(betas) else None))  # fmt: skip
            k_act += 1
        fns.append(fn)
    if nd == 2 and fns[0] == fns[1]:
        _both_directions(e, node, op, x, w, r, b, h0, c0, peep, seq, batch, hidden, fns[0], clip, layout, xs[2])
        return e.nodes
    ys, hs, cs = [], [], []
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        fn = fns[d]
        wd = e.op("Transpose", [e.op("Gather", [w, e.idx(d)], axis=0)], perm=[1, 0])  # [in, G*h]
        rd = e.op("Transpose", [e.op("Gather", [r, e.idx(d)], axis=0)], perm=[1, 0])  # [h, G*h]
        xw = e.op("MatMul", [x, wd])  # [seq, batch, G*h]: every step's input projection at once
        wb = rb = None
        if b:
            bd = e.op("Gather", [b, e.idx(d)], axis=0)
            wb, rb = e.cols(bd, 0, gates * hidden), e.cols(bd, gates * hidden, gates * hidden)
        # initial states are [directions, batch, h], batch-first (layout 1) [batch, directions, h]
        h = e.op("Gather", [h0, e.idx(d)], axis=layout) if h0 else e.const(np.zeros((batch, hidden)))
        c = (e.op("Gather", [c0, e.idx(d)], axis=layout) if c0 else e.const(np.zeros((batch, hidden)))) if op == "LSTM" else None
        pd = e.op("Gather", [peep, e.idx(d)], axis=0) if peep else None
        steps = range(seq - 1, -1, -1) if reverse else range(seq)
        out = {}
        for t in steps:
            xt = e.op("Gather", [xw, e.idx(t)], axis=0)  # [batch, G*h]
            h, c = _step(e, node, xt, h, c, rd, wb, rb, pd, hidden, fn, clip)
            out[t] = h
        ys.append([out[t] for t in range(seq)])
        hs.append(h)
        cs.append(c)
    outs = list(node.output) + [""] * (3 - len(node.output))
    y, yh, yc = outs[:3]
    if y:
        per_t = []
        for t in range(seq):
            parts = [e.op("Reshape", [ys[d][t], e.idx([1, 1, batch, hidden])]) for d in range(nd)]
            per_t.append(parts[0] if nd == 1 else e.op("Concat", parts, axis=1))
        _named(e, e.op("Concat", per_t, axis=0) if seq > 1 else per_t[0], y, layout, [2, 0, 1, 3])
    for name, finals in ((yh, hs), (yc, cs)):
        if name:
            parts = [e.op("Reshape", [f, e.idx([1, batch, hidden])]) for f in finals]
            _named(e, parts[0] if nd == 1 else e.op("Concat", parts, axis=0), name, layout, [1, 0, 2])
    return e.nodes


def _both_directions(e: _Emit, node, op, x, w, r, b, h0, c0, peep, seq, batch, hidden, fn, clip, layout, size):
    """A bidirectional node's two directions stepped together: each step is one (batched) matmul
    and one set of gate ops over a leading direction axis of 2, the backward direction reading
    the sequence reversed. Half the kernels a step (a CRNN's BiLSTM was some 4 small kernels and
    as many tensor allocations a step and direction, their launch costs most of its time)."""
    gates = _GATES[op]
    rev = e.idx(np.arange(seq - 1, -1, -1))

    def shaped(t, *dims):
        return e.op("Reshape", [t, e.idx(list(dims))])

    x2 = e.op("Concat", [shaped(x, 1, seq, batch, size), shaped(e.op("Gather", [x, rev], axis=0), 1, seq, batch, size)],
              axis=0)  # [2, seq, batch, in]; the backward half in its own step order  # fmt: skip
    w2 = shaped(e.op("Transpose", [w], perm=[0, 2, 1]), 2, 1, size, gates * hidden)
    rd = e.op("Transpose", [r], perm=[0, 2, 1])  # [2, h, G*h]
    xw = e.op("MatMul", [x2, w2])  # [2, seq, batch, G*h]: every step's input projection at once
    wb = rb = None
    if b:
        b3 = shaped(b, 2, 1, 2 * gates * hidden)
        wb, rb = e.cols(b3, 0, gates * hidden), e.cols(b3, gates * hidden, gates * hidden)

    def initial(t):  # [2, batch, h]; batch-first (layout 1) states are [batch, 2, h]
        if not t:
            return e.const(np.zeros((2, batch, hidden)))
        return e.op("Transpose", [t], perm=[1, 0, 2]) if layout else t

    h = initial(h0)
    c = initial(c0) if op == "LSTM" else None
    pd = shaped(peep, 2, 1, 3 * hidden) if peep else None
    steps = []
    for t in range(seq):
        xt = e.op("Gather", [xw, e.idx(t)], axis=1)  # [2, batch, G*h]
        h, c = _step(e, node, xt, h, c, rd, wb, rb, pd, hidden, fn, clip)
        steps.append(h)
    outs = list(node.output) + [""] * (3 - len(node.output))
    y, yh, yc = outs[:3]
    if y:
        parts = [shaped(s, 1, 2, batch, hidden) for s in steps]
        hs = e.op("Concat", parts, axis=0) if seq > 1 else parts[0]  # [seq, 2, batch, h] in step order
        fwd = e.op("Gather", [hs, e.idx([0])], axis=1)
        bwd = e.op("Gather", [e.op("Gather", [hs, e.idx([1])], axis=1), rev], axis=0)
        _named(e, e.op("Concat", [fwd, bwd], axis=1), y, layout, [2, 0, 1, 3])  # [seq, 2, batch, h]
    for name, final in ((yh, h), (yc, c)):
        if name:
            _named(e, final, name, layout, [1, 0, 2])


def _named(e: _Emit, value: str, name: str, layout: int, perm: list[int]) -> None:
    """``value`` as the node's output ``name``: as it is, or transposed by ``perm`` to the
    batch-first order of a ``layout`` 1 node."""
    if layout:
        e.op("Transpose", [value], name, perm=perm)
    else:
        e.op("Identity", [value], name)


def _step(e: _Emit, node, xt, h, c, rd, wb, rb, pd, hidden, fn, clip):
    """One time step of ``node`` from its input projection ``xt``: (new h, new c or None)."""
    if node.op_type == "GRU":
        return _gru_step(e, node, xt, h, rd, wb, rb, hidden, fn, clip)
    if node.op_type == "LSTM":
        return _lstm_step(e, node, xt, h, c, rd, wb, rb, pd, hidden, fn, clip)
    pre = e.op("Add", [xt, e.op("MatMul", [h, rd])])
    if wb is not None:
        pre = e.op("Add", [pre, e.op("Add", [wb, rb])])
    return e.act(fn[0][0], _clip(e, pre, clip), fn[0][1], fn[0][2]), None


def _elem(names, types, x, node):
    t = names.values.get(x)
    if t is not None:
        return t.data_type
    elem = types.get(x)
    if not elem:
        raise UnsupportedError(f"{node.op_type} node {node.name!r}: the type of {x!r} is unknown")
    return elem


def _clip(e: _Emit, x: str, clip) -> str:
    if clip is None:
        return x
    return e.op("Max", [e.op("Min", [x, e.const(clip)]), e.const(-clip)])


def _gru_step(e: _Emit, node, xt, h, rd, wb, rb, hidden, fn, clip):
    (f, fa, fb), (g, ga, gb) = fn[0], fn[1]
    lbr = _attr(node, "linear_before_reset", 0)
    hr = e.op("MatMul", [h, rd])  # [batch, 3h]: z, r, h gates
    gate = {}
    for k, name in enumerate(("z", "r")):
        pre = e.op("Add", [e.cols(xt, k * hidden, hidden), e.cols(hr, k * hidden, hidden)])
        if wb is not None:
            pre = e.op("Add", [pre, e.op("Add", [e.cols(wb, k * hidden, hidden), e.cols(rb, k * hidden, hidden)])])
        gate[name] = e.act(f, _clip(e, pre, clip), fa, fb)
    xh = e.cols(xt, 2 * hidden, hidden)
    if lbr:
        rh = e.cols(hr, 2 * hidden, hidden)
        if rb is not None:
            rh = e.op("Add", [rh, e.cols(rb, 2 * hidden, hidden)])
        pre = e.op("Add", [xh, e.op("Mul", [gate["r"], rh])])
    else:
        rh_w = e.cols(rd, 2 * hidden, hidden)  # R_h^T: [h, h]
        pre = e.op("Add", [xh, e.op("MatMul", [e.op("Mul", [gate["r"], h]), rh_w])])
        if rb is not None:
            pre = e.op("Add", [pre, e.cols(rb, 2 * hidden, hidden)])
    if wb is not None:
        pre = e.op("Add", [pre, e.cols(wb, 2 * hidden, hidden)])
    cand = e.act(g, _clip(e, pre, clip), ga, gb)
    one = e.const(1.0)
    new_h = e.op("Add", [e.op("Mul", [e.op("Sub", [one, gate["z"]]), cand]), e.op("Mul", [gate["z"], h])])
    return new_h, None


def _lstm_step(e: _Emit, node, xt, h, c, rd, wb, rb, pd, hidden, fn, clip):
    (f, fa, fb), (g, ga, gb), (hh, ha, hb) = fn[0], fn[1], fn[2]
    hr = e.op("MatMul", [h, rd])  # [batch, 4h]: i, o, f, c gates

    def pre(k):
        p = e.op("Add", [e.cols(xt, k * hidden, hidden), e.cols(hr, k * hidden, hidden)])
        if wb is not None:
            p = e.op("Add", [p, e.op("Add", [e.cols(wb, k * hidden, hidden), e.cols(rb, k * hidden, hidden)])])
        return p

    pi = pre(0)
    if pd is not None:
        pi = e.op("Add", [pi, e.op("Mul", [e.cols(pd, 0, hidden), c])])
    i = e.act(f, _clip(e, pi, clip), fa, fb)
    if _attr(node, "input_forget", 0):
        fg = e.op("Sub", [e.const(1.0), i])
    else:
        pf = pre(2)
        if pd is not None:
            pf = e.op("Add", [pf, e.op("Mul", [e.cols(pd, 2 * hidden, hidden), c])])
        fg = e.act(f, _clip(e, pf, clip), fa, fb)
    cand = e.act(g, _clip(e, pre(3), clip), ga, gb)
    new_c = e.op("Add", [e.op("Mul", [fg, c]), e.op("Mul", [i, cand])])
    po = pre(1)
    if pd is not None:
        po = e.op("Add", [po, e.op("Mul", [e.cols(pd, hidden, hidden), new_c])])
    o = e.act(f, _clip(e, po, clip), fa, fb)
    new_h = e.op("Mul", [o, e.act(hh, new_c, ha, hb)])
    return new_h, new_c
