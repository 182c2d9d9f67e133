"""Weight-only group quantization: matmul and embedding weights kept packed, dequantized in the kernel.

``compile --weights q4`` (or ``q8``) is what makes a language model fit a phone (MLC-LLM's
q4f32_1, llama.cpp's Q4_1): every constant weight of a matmul (``x @ W``, W of at least
``MIN_ELEMENTS``) and every embedding table (``take(table, ids)``) is quantized per group of
``GROUP`` values along its reduction axis, asymmetric (``w = scale * q + min``, q unsigned), and
stays that way in the artifact: 4-bit values two to a byte — byte j of a group holds values j
and j+16, so one 16-byte load unpacks into two 16-lane vectors — or 8-bit, one a byte, with a
float32 scale and min per group. Activations stay float32.

Kernels (CPU). 4-bit matmul weights whose N is a multiple of PANEL are stored in panels of 32
columns side by side (``to_panels``), so a vector of columns loads from contiguous bytes: few
rows (decode: one token) run a fused dequantize-GEMV over column vectors; more rows (prefill) a
fused dequantize-GEMM — each panel dequantized once into an L2-sized float32 buffer, then 8x2
register tiles down the activations (prefill of 128 tokens: ``scripts/bench_llm.py``). Other
weights keep the row layout: a GEMV reducing into 16 lanes per row, a row-layout GEMM, or (no
vector divides N) the whole weight dequantized before the backend's matmul. Embedding tables
(and an output layer that is their transpose: tied weights) are kept at 8 bits even with q4, as
llama.cpp does; lookups read the packed table.

The quantized weights become parameters of ``main`` after its inputs (``apply`` returns them in
order), so no later pass folds them back into float32 constants.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ..errors import UnsupportedError, UsageError

GROUP = 32
MODES = {"q4": 4, "q8": 8}
#: Weights smaller than this stay float32 (norm scales, biases, small projections).
MIN_ELEMENTS = 1 << 12
#: Matmuls with at most this many rows use a GEMV kernel; more, a GEMM.
GEMV_ROWS = 8
#: Columns of a weight panel (two 16-lane vectors).
PANEL = 32


def check_mode(mode: str | None, profile=None) -> None:
    """A known mode (UsageError), and one the profile's backend has kernels for (UnsupportedError)."""
    if mode is not None and mode not in MODES:
        raise UsageError(f"bad --weights {mode!r}: one of {', '.join(MODES)} (or leave it out for float32)")
    if mode is not None and profile is not None:
        from . import backends

        if not backends.for_profile(profile).cpu:
            raise UnsupportedError(f"--weights {mode}: quantized-weight kernels exist for CPU targets only, "
                                   f"not {profile.name}")  # fmt: skip


def packed_bytes(elements: int, bits: int | None) -> int:
    """What a 2-D weight of ``elements`` values takes in the artifact at ``bits`` (None: float32):
    the packed values and a float32 scale and min per group."""
    if bits is None or elements < MIN_ELEMENTS:
        return 4 * elements
    return elements * bits // 8 + (elements // GROUP) * 8


@dataclasses.dataclass
class Quantized:
    bits: int
    packed: np.ndarray  # uint8 [N, K/2] (4 bits) or [N, K] (8 bits)
    scale: np.ndarray  # float32 [N, K/GROUP]
    zero: np.ndarray  # float32 [N, K/GROUP]: the group's minimum
    #: "rows": as above; "panels" (4-bit matmul weights, N a multiple of PANEL): packed
    #: [N/PANEL, K/GROUP, 16, PANEL], scale and zero [N/PANEL, K/GROUP, PANEL] — a panel's
    #: columns side by side, so kernels load a vector of columns from contiguous bytes.
    layout: str = "rows"

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes


def quantize(w: np.ndarray, bits: int) -> Quantized:
    """``w`` [N, K] (K a multiple of GROUP) quantized per group of GROUP along K."""
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP).astype(np.float32)
    lo, hi = groups.min(-1), groups.max(-1)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    scale[scale == 0] = 1.0
    q = np.clip(np.rint((groups - lo[..., None]) / scale[..., None]), 0, levels).astype(np.uint8)
    if bits == 4:
        packed = (q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)).reshape(n, k // 2)
    else:
        packed = q.reshape(n, k)
    return Quantized(bits, np.ascontiguousarray(packed), scale.astype(np.float32), lo.astype(np.float32))


def to_panels(q: Quantized) -> Quantized:
    """A 4-bit row-layout weight in the panel layout (N a multiple of PANEL)."""
    n, g = q.scale.shape
    b = q.packed.reshape(n // PANEL, PANEL, g, GROUP // 2)  # [panel, lane, group, j]
    packed = np.ascontiguousarray(b.transpose(0, 2, 3, 1))  # [panel, group, j, lane]
    sc = np.ascontiguousarray(q.scale.reshape(n // PANEL, PANEL, g).transpose(0, 2, 1))
    ze = np.ascontiguousarray(q.zero.reshape(n // PANEL, PANEL, g).transpose(0, 2, 1))
    return Quantized(q.bits, packed, sc, ze, "panels")


def dequantize(q: Quantized) -> np.ndarray:
    """The float32 [N, K] weights ``q`` stands for (what the kernels compute with)."""
    if q.layout == "panels":
        p, g, _, lanes = q.packed.shape
        rows = Quantized(q.bits, q.packed.transpose(0, 3, 1, 2).reshape(p * lanes, g * GROUP // 2),
                         q.scale.transpose(0, 2, 1).reshape(p * lanes, g), q.zero.transpose(0, 2, 1).reshape(p * lanes, g))  # fmt: skip
        return dequantize(rows)
    n, g = q.scale.shape
    if q.bits == 4:
        b = q.packed.reshape(n, g, GROUP // 2)
        vals = np.concatenate([b & 15, b >> 4], axis=-1)
    else:
        vals = q.packed.reshape(n, g, GROUP)
    return (q.scale[..., None] * vals.astype(np.float32) + q.zero[..., None]).reshape(n, g * GROUP)


def _weight_value(te, tirx, W, S, Z, bits, n, g, h, j):
    """The dequantized weight at row n, group g, half h (0, 1), lane j (0..15)."""
    if bits == 4:
        q = (W[n, g * 16 + j] >> (h * 4).astype("uint8")) & tirx.const(15, "uint8")
    else:
        q = W[n, g * GROUP + h * 16 + j]
    return S[n, g] * q.astype("float32") + Z[n, g]


def _placeholders(te, n: int, k: int, bits: int):
    g = k // GROUP
    W = te.placeholder((n, k // 2 if bits == 4 else k), "uint8", "w")
    S = te.placeholder((n, g), "float32", "scale")
    Z = te.placeholder((n, g), "float32", "zero")
    return W, S, Z


def gemv_kernel(m: int, n: int, k: int, bits: int):
    """y[m, n] = x[m, :] . dequant(W)[n, :], scheduled: rows of W in parallel (blocks of 4), each
    reduced into 16 vector lanes (rfactor) over its groups, the lanes summed at the end."""
    from tvm import s_tir, te, tirx

    X = te.placeholder((m, k), "float32", "x")
    W, S, Z = _placeholders(te, n, k, bits)
    g = te.reduce_axis((0, k // GROUP), "g")
    h = te.reduce_axis((0, 2), "h")
    j = te.reduce_axis((0, 16), "j")
    Y = te.compute(
        (m, n),
        lambda i, r: te.sum(X[i, g * GROUP + h * 16 + j] * _weight_value(te, tirx, W, S, Z, bits, r, g, h, j),
                            axis=[g, h, j]),
        "qgemv",
    )  # fmt: skip
    sch = s_tir.Schedule(te.create_prim_func([X, W, S, Z, Y]))
    blk = sch.get_sblock("qgemv")
    mi, ni, gl, hl, jl = sch.get_loops(blk)
    rf = sch.rfactor(jl, factor_axis=2)
    no, nb = sch.split(ni, [None, 4 if n % 4 == 0 else 1])
    sch.reorder(no, mi, nb)
    sch.parallel(no)
    sch.compute_at(rf, nb)
    jr, *red = sch.get_loops(rf)[3:]  # under (no, mi, nb): the lane, then groups and halves (unit loops dropped)
    sch.reorder(*red, jr)
    sch.vectorize(jr)
    sch.decompose_reduction(rf, red[0])
    return sch.mod["main"]


def _panel_placeholders(te, n: int, k: int):
    g = k // GROUP
    P = te.placeholder((n // PANEL, g, GROUP // 2, PANEL), "uint8", "w")
    S = te.placeholder((n // PANEL, g, PANEL), "float32", "scale")
    Z = te.placeholder((n // PANEL, g, PANEL), "float32", "zero")
    return P, S, Z


def _panel_value(tirx, P, S, Z, p, g, h, j, lane):
    q = (P[p, g, j, lane] >> (h * 4).astype("uint8")) & tirx.const(15, "uint8")
    return S[p, g, lane] * q.astype("float32") + Z[p, g, lane]


def panel_gemv_kernel(m: int, n: int, k: int):
    """y[m, n] from 4-bit panels, few rows (decode): panels in parallel, each accumulating its
    PANEL columns as vectors over the groups (contiguous bytes a group row, no lane sums)."""
    from tvm import s_tir, te, tirx

    X = te.placeholder((m, k), "float32", "x")
    P, S, Z = _panel_placeholders(te, n, k)
    g = te.reduce_axis((0, k // GROUP), "g")
    h = te.reduce_axis((0, 2), "h")
    j = te.reduce_axis((0, GROUP // 2), "j")
    Y = te.compute(
        (m, n // PANEL, PANEL),
        lambda i, p, lane: te.sum(X[i, g * GROUP + h * 16 + j] * _panel_value(tirx, P, S, Z, p, g, h, j, lane),
                                  axis=[g, h, j]),
        "qpgemv",
    )  # fmt: skip
    sch = s_tir.Schedule(te.create_prim_func([X, P, S, Z, Y]))
    blk = sch.get_sblock("qpgemv")
    mi, pi, li, gl, hl, jl = sch.get_loops(blk)
    sch.reorder(pi, mi, gl, hl, jl, li)
    sch.parallel(pi)
    sch.vectorize(li)
    sch.decompose_reduction(blk, gl)
    return sch.mod["main"]


def panel_gemm_kernel(m: int, n: int, k: int, lanes: int = 16):
    """y[m, n] from 4-bit panels, many rows (prefill): each panel dequantized once into a float32
    [K, PANEL] buffer (vector loads of contiguous bytes), then register tiles of rows down m."""
    from tvm import s_tir, te, tirx

    width = min(lanes, 16)
    budget = 16 if lanes >= 16 else 8  # accumulator registers: half of AVX-512's 32, of AVX2's or SSE's 16
    rows = next(r for r in (8, 4, 2, 1) if r * (PANEL // width) <= budget and m % r == 0)
    X = te.placeholder((m, k), "float32", "x")
    P, S, Z = _panel_placeholders(te, n, k)
    D = te.compute((n // PANEL, k, PANEL),
                   lambda p, c, lane: _panel_value(tirx, P, S, Z, p, c // GROUP, (c % GROUP) // 16, c % 16, lane),
                   "qpanel")  # fmt: skip
    kr = te.reduce_axis((0, k), "k")
    Y = te.compute((m, n), lambda i, col: te.sum(X[i, kr] * D[col // PANEL, kr, col % PANEL], axis=kr), "qpgemm")
    sch = s_tir.Schedule(te.create_prim_func([X, P, S, Z, Y]))
    y, d = sch.get_sblock("qpgemm"), sch.get_sblock("qpanel")
    mi, ni, kl = sch.get_loops(y)
    no, nc, nv = sch.split(ni, [None, PANEL // width, width])
    mo, mr = sch.split(mi, [None, rows])
    sch.reorder(no, mo, kl, mr, nc, nv)
    sch.parallel(no)
    sch.compute_at(d, no)
    sch.vectorize(sch.split(sch.get_loops(d)[-1], [None, width])[-1])
    sch.vectorize(nv)
    sch.unroll(mr)
    sch.unroll(nc)
    sch.decompose_reduction(y, kl)
    return sch.mod["main"]


def gemm_tile(m: int, n: int, lanes: int) -> tuple[int, int, int] | None:
    """(rows, columns of vectors, lanes) of the register tile for an [m, n] output, or None when
    no vector width divides n (then the weights are dequantized whole before the matmul)."""
    rows_max = 8 if lanes >= 16 else 4  # 16 (8 x 2) of 32 zmm registers; 8 of 16 ymm or NEON's 32
    for cols, width in ((2, lanes), (1, lanes), (1, 8), (1, 4)):
        if width <= lanes and n % (cols * width) == 0:
            rows = next(r for r in (rows_max, 4, 2, 1) if r <= rows_max and m % r == 0)
            return rows, cols, width
    return None


def gemm_kernel(m: int, n: int, k: int, bits: int, lanes: int = 16):
    """y[m, n] = x[m, :] . dequant(W)[n, :] for many rows (prefill): the n axis in parallel
    panels of ``cols x lanes`` columns, each panel's weights dequantized once into a float32
    [K, panel] buffer (L2-sized) and reused by every register tile of ``rows`` rows down m.
    For row-layout weights (q8, or N not a multiple of PANEL); 4-bit panels use
    ``panel_gemm_kernel``."""
    from tvm import s_tir, te, tirx

    rows, cols, width = gemm_tile(m, n, lanes)
    X = te.placeholder((m, k), "float32", "x")
    W, S, Z = _placeholders(te, n, k, bits)
    D = te.compute((k, n), lambda c, r: _weight_value(te, tirx, W, S, Z, bits, r, c // GROUP, (c % GROUP) // 16, c % 16),
                   "qpanel")  # fmt: skip
    kr = te.reduce_axis((0, k), "k")
    Y = te.compute((m, n), lambda i, j: te.sum(X[i, kr] * D[kr, j], axis=kr), "qgemm")
    sch = s_tir.Schedule(te.create_prim_func([X, W, S, Z, Y]))
    y, d = sch.get_sblock("qgemm"), sch.get_sblock("qpanel")
    mi, ni, kl = sch.get_loops(y)
    no, nc, nv = sch.split(ni, [None, cols, width])
    mo, mr = sch.split(mi, [None, rows])
    sch.reorder(no, mo, kl, mr, nc, nv)
    sch.parallel(no)
    sch.compute_at(d, no)
    _, dn = sch.get_loops(d)[-2:]
    sch.vectorize(sch.split(dn, [None, width])[-1])
    sch.vectorize(nv)
    sch.unroll(mr)
    sch.unroll(nc)
    sch.decompose_reduction(y, kl)
    return sch.mod["main"]


def dequant_kernel(n: int, k: int, bits: int):
    """The float32 [K, N] matrix (transposed: what ``matmul(x, W)`` reads) of packed [N, K]."""
    from tvm import s_tir, te, tirx

    W, S, Z = _placeholders(te, n, k, bits)
    Y = te.compute(
        (k, n),
        lambda c, r: _weight_value(te, tirx, W, S, Z, bits, r, c // GROUP, (c % GROUP) // 16, c % 16),
        "qdequant",
    )
    sch = s_tir.Schedule(te.create_prim_func([W, S, Z, Y]))
    blk = sch.get_sblock("qdequant")
    c, r = sch.get_loops(blk)
    co, ci = sch.split(c, [None, GROUP])
    ro, ri = sch.split(r, [None, 16 if n % 16 == 0 else 1])
    sch.reorder(co, ro, ci, ri)
    sch.parallel(co)
    sch.vectorize(ri)
    return sch.mod["main"]


def take_kernel(rows: int, n: int, k: int, bits: int):
    """out[i, :] = dequant(W)[ids[i], :]: an embedding lookup from a packed table."""
    from tvm import s_tir, te, tirx

    ids = te.placeholder((rows,), "int64", "ids")
    W, S, Z = _placeholders(te, n, k, bits)

    def value(i, c):
        r = tirx.max(tirx.min(ids[i], tirx.const(n - 1, "int64")), tirx.const(0, "int64"))
        return _weight_value(te, tirx, W, S, Z, bits, r, c // GROUP, (c % GROUP) // 16, c % 16)

    Y = te.compute((rows, k), value, "qtake")
    sch = s_tir.Schedule(te.create_prim_func([ids, W, S, Z, Y]))
    i, c = sch.get_loops(sch.get_sblock("qtake"))
    _, ci = sch.split(c, [None, 16])
    sch.vectorize(ci)
    return sch.mod["main"]


@dataclasses.dataclass
class Report:
    matmuls: int = 0
    embeddings: int = 0
    float_bytes: int = 0  # what the quantized weights were, as float32
    packed_bytes: int = 0


def apply(mod, mode: str, tied: frozenset[str] = frozenset(), lanes: int = 16):
    """(module, arrays, report): ``main``'s eligible weights quantized per ``mode`` ("q4", "q8"),
    each a (packed, scale, zero) triple of parameters appended after the inputs, in the order of
    ``arrays``. ``tied``: digests (``digest``) of embedding tables of the whole model, so an
    output layer tied to one is kept at 8 bits even when the table is in another part of a
    split model. ``lanes``: float32 lanes of the target's vectors (the prefill kernel's tile).
    Raises UsageError when nothing in the model is eligible."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    check_mode(mode)
    bits = MODES[mode]
    report = Report()
    func = mod["main"]

    import tvm

    def const_2d(e):
        return isinstance(e, tvm.ir.expr.Constant) and len(e.value.shape) == 2 and str(e.value.dtype) == "float32"

    # Embedding tables first: an output matmul whose weight is a table's transpose shares it.
    tables = {}
    def find_tables(e):  # noqa: E306
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.take" and const_2d(e.args[0]):
            arr = e.args[0].value.numpy()
            tables[_digest(arr)] = arr

    relax.analysis.post_order_visit(func.body, find_tables)

    @mutator
    class Quantize(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.params, self.arrays, self.by_digest = [], [], {}

        def weight(self, w: np.ndarray, wbits: int, panels: bool = False, digest: str | None = None):
            key = (digest or _digest(w), wbits, panels)
            if key not in self.by_digest:
                q = quantize(w, wbits)
                if panels:
                    q = to_panels(q)
                i = len(self.by_digest)
                vs = []
                for name, arr in (("packed", q.packed), ("scale", q.scale), ("zero", q.zero)):
                    v = relax.Var(f"q{i}_{name}", relax.TensorType(arr.shape, str(arr.dtype)))
                    self.params.append(v)
                    self.arrays.append(arr)
                    vs.append(v)
                self.by_digest[key] = vs
                report.float_bytes += w.nbytes
                report.packed_bytes += q.nbytes
            return self.by_digest[key]

        def visit_call_(self, call):
            call = super().visit_call_(call)
            op = getattr(call.op, "name", "")
            if op == "relax.matmul":
                return self.matmul(call)
            if op == "relax.take":
                return self.take(call)
            return call

        def matmul(self, call):
            x, w = call.args
            if isinstance(w, relax.Call) and getattr(w.op, "name", "") == "relax.permute_dims" and const_2d(w.args[0]):
                axes = w.attrs.axes
                if axes is not None and [int(a) for a in axes] != [1, 0]:
                    return call
                wt = w.args[0].value.numpy()  # [N, K] already
            elif const_2d(w):
                wt = np.ascontiguousarray(w.value.numpy().T)
            else:
                return call
            n, k = wt.shape
            xs = _static_shape(x)
            if xs is None or xs[-1] != k or k % GROUP or n * k < MIN_ELEMENTS or str(x.ty.dtype) != "float32":
                return call
            rows = int(np.prod(xs[:-1])) if len(xs) > 1 else 1
            d = _digest(wt)
            wbits = 8 if d in tables or d in tied else bits
            panels = wbits == 4 and n % PANEL == 0
            packed, scale, zero = self.weight(wt, wbits, panels, d)
            bb = self.builder_
            flat = bb.normalize(relax.op.reshape(x, (rows, k)))
            if panels and rows <= GEMV_ROWS:
                kern, name, shape = panel_gemv_kernel(rows, n, k), "q4_gemv", (rows, n // PANEL, PANEL)
            elif panels:
                kern, name, shape = panel_gemm_kernel(rows, n, k, lanes), "q4_gemm", (rows, n)
            elif rows <= GEMV_ROWS:
                kern, name, shape = gemv_kernel(rows, n, k, wbits), f"q{wbits}_gemv", (rows, n)
            elif gemm_tile(rows, n, lanes) is not None:
                kern, name, shape = gemm_kernel(rows, n, k, wbits, lanes), f"q{wbits}_gemm", (rows, n)
            else:  # no vector divides N: the weight dequantized whole, then the backend's matmul
                gv = bb.add_func(_scheduled(dequant_kernel(n, k, wbits)), f"q{wbits}_dequantize")
                deq = bb.emit(relax.call_tir(gv, [packed, scale, zero], relax.TensorType((k, n), "float32")))
                kern = None
                y = bb.emit(relax.op.matmul(flat, deq))
            if kern is not None:
                gv = bb.add_func(_scheduled(kern), name)
                y = bb.emit(relax.call_tir(gv, [flat, packed, scale, zero], relax.TensorType(shape, "float32")))
                if shape != (rows, n):  # the panel GEMV's [rows, panels, PANEL] is [rows, n] in memory
                    y = bb.emit(relax.op.reshape(y, (rows, n)))
            report.matmuls += 1
            return relax.op.reshape(y, (*xs[:-1], n)) if len(xs) != 2 else y

        def take(self, call):
            table, ids = call.args
            if not const_2d(table) or int(call.attrs.axis if call.attrs.axis is not None else 0) != 0:
                return call
            arr = table.value.numpy()
            n, k = arr.shape
            ishape = _static_shape(ids)
            if ishape is None or k % GROUP or n * k < MIN_ELEMENTS or "int" not in str(ids.ty.dtype):
                return call
            rows = int(np.prod(ishape)) if ishape else 1
            packed, scale, zero = self.weight(arr, 8)
            bb = self.builder_
            flat = bb.normalize(relax.op.reshape(relax.op.astype(ids, "int64"), (rows,)))
            gv = bb.add_func(_scheduled(take_kernel(rows, n, k, 8)), "q8_take")
            y = bb.emit(relax.call_tir(gv, [flat, packed, scale, zero], relax.TensorType((rows, k), "float32")))
            report.embeddings += 1
            return relax.op.reshape(y, (*ishape, k))

    q = Quantize(mod)
    body = q.visit_expr(func.body)
    if not q.params:
        raise UsageError(f"--weights {mode}: no matmul or embedding weight of {MIN_ELEMENTS} values or more "
                         f"(with an inner size a multiple of {GROUP}) in the model; nothing to quantize")
    out = q.builder_.get()
    out["main"] = relax.Function(list(func.params) + q.params, body, func.ret_ty, func.is_pure, func.attrs)
    return out, q.arrays, report


def _scheduled(func):
    # Opaque: FuseOps must not merge the kernel with its neighbours (that would drop the schedule).
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8).without_attr("global_symbol")


def _static_shape(e) -> tuple[int, ...] | None:
    shape = getattr(e.ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def embedding_digests(model) -> frozenset[str]:
    """The digests of an ONNX model's embedding tables (2-D float initializers a Gather reads)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = set()
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input and node.input[0] in inits:
            t = inits[node.input[0]]
            if len(t.dims) == 2 and t.data_type == 1:
                out.add(_digest(numpy_helper.to_array(t).astype(np.float32)))
    return frozenset(out)


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(str(arr.shape).encode() + np.ascontiguousarray(arr).tobytes()).hexdigest()
