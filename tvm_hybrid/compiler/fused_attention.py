"""Attention as one CPU kernel: ``softmax(Q·Kᵀ · scale + mask) · V`` as exporters write it.

Legalized op by op, attention is a transpose of each of Q, K and V into heads, a batch matmul
for the scores, a scale, a mask add and a softmax over a score tensor in memory, a second batch
matmul, and a transpose back to tokens: six kernels and two (heads x rows x keys) tensors.
Here each (batch, head, block of query rows) is one task of one kernel: the block's scores are
a register-tiled product (keys along the vectors), then scaled, masked and softmaxed row by row
while in cache (exp is TVM's polynomial ``fast_exp``; rows are normalized after ·V, on head-dim
values instead of keys), then multiplied by V (head dim along the vectors) and written straight
into the tokens-by-channels layout the projection after it reads. Kᵀ is read in place when its
keys are contiguous whole vectors; otherwise a first parallel loop copies each head's Kᵀ into a
workspace, zero-padded to whole vectors (once per head, not per task).

Q, K and V are read where they are: a reshape into heads, a transpose, a split of a fused QKV
projection and a squeeze are index arithmetic in the kernel (``_view``), not copies. A scalar
scale on the scores or on Q or K is folded into the kernel; a mask (additive, float32,
broadcast over batch, heads or rows: BERT's padding mask, a causal mask) is read in place.

Up to ``MAX_KEYS`` keys a task scores its rows' keys at once (the block stays in L2). Longer
rows go through the keys in blocks of ``KEY_BLOCK`` with an online softmax: each block's max
updates the row's running max, and the running sum and the ·V accumulators scale by
exp(old max - new max) before the block's terms are added (FlashAttention's recurrence).

What it takes (``fuse``): float32, static shapes, the softmax over the keys and used only by
the ·V matmul. Anything else is left as TVM's ops (``rewrites.softmax_rows`` then still takes
its softmax).
"""

from __future__ import annotations

import dataclasses
import math

MAX_KEYS = 1024  # keys whose scores a task holds at once; longer rows go in blocks of KEY_BLOCK
KEY_BLOCK = 512
_SCORE_BLOCK = 16384  # floats of one task's score block (64 KB)


@dataclasses.dataclass
class _View:
    """A tensor read in place: element ``idx`` of ``shape`` is ``base.flat[offset + Σ idx·strides]``,
    times ``scale``."""

    base: object
    offset: int
    shape: list[int]
    strides: list[int]
    scale: float = 1.0


def _row_major(shape) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _shape(expr) -> list[int] | None:
    from .rewrites import _static_shapes

    shapes = _static_shapes(expr)
    return list(shapes[0]) if shapes and shapes[0] is not None else None


def _scalar(expr) -> float | None:
    from .rewrites import constant_array

    value = constant_array(expr)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _bound(bb, expr):
    from tvm import relax

    return bb.lookup_binding(expr) if isinstance(expr, relax.Var) else None  # (None for parameters)


def _view(bb, expr, depth: int = 0) -> _View | None:
    """``expr`` as a view of the tensor it was reshaped, transposed, split, squeezed or scaled by
    a scalar from (the tensor itself when it was computed otherwise). None if not static float32."""
    from tvm import relax

    shape = _shape(expr)
    if shape is None or str(expr.ty.dtype) != "float32":
        return None
    own = _View(expr, 0, shape, _row_major(shape))
    bound = _bound(bb, expr)
    if bound is None or depth > 16:
        return own
    if isinstance(bound, relax.TupleGetItem):
        return _split_view(bb, bound, shape, depth) or own
    if not isinstance(bound, relax.Call) or not hasattr(bound.op, "name"):
        return own
    op, args = bound.op.name, bound.args
    if op in ("relax.multiply", "relax.divide"):
        for i, (x, c) in enumerate((args, args[::-1])):
            if op == "relax.divide" and i == 1:
                break
            value = _scalar(c)
            if value is not None and value != 0 and _shape(x) == shape:
                inner = _view(bb, x, depth + 1)
                if inner is not None:
                    inner.scale *= value if op == "relax.multiply" else 1.0 / value
                    return inner
        return own
    if op not in ("relax.permute_dims", "relax.reshape", "relax.squeeze", "relax.expand_dims"):
        return own
    inner = _view(bb, args[0], depth + 1)
    if inner is None:
        return own
    if op == "relax.permute_dims":
        axes = bound.attrs.axes
        axes = [int(a) for a in axes] if axes is not None else list(range(len(inner.shape)))[::-1]
        return _View(inner.base, inner.offset, [inner.shape[a] for a in axes], [inner.strides[a] for a in axes],
                     inner.scale)  # fmt: skip
    if op == "relax.reshape":
        strides = _reshaped_strides(inner.shape, inner.strides, shape)
        if strides is None:
            return own
        return _View(inner.base, inner.offset, shape, strides, inner.scale)
    # squeeze / expand_dims: the size-1 axes carry no stride that matters
    kept = [(n, s) for n, s in zip(inner.shape, inner.strides) if n != 1]
    if [n for n, _ in kept] != [n for n in shape if n != 1]:
        return own
    strides, it = [], iter(kept)
    for n in shape:
        strides.append(next(it)[1] if n != 1 else 0)
    return _View(inner.base, inner.offset, shape, strides, inner.scale)


def _reshaped_strides(old_shape, old_strides, new_shape) -> list[int] | None:
    """The strides of a view reshaped to ``new_shape`` without a copy, or None where it needs
    one (numpy's rule: each group of axes merged or split must be contiguous in memory)."""
    old = [(n, s) for n, s in zip(old_shape, old_strides) if n != 1]
    new = [n for n in new_shape if n != 1]
    strides = [0] * len(new)
    oi = ni = 0
    while ni < len(new) and oi < len(old):
        nprod, oprod, nj, oj = new[ni], old[oi][0], ni + 1, oi + 1
        while nprod != oprod:
            if nprod < oprod:
                nprod *= new[nj]
                nj += 1
            else:
                oprod *= old[oj][0]
                oj += 1
        if any(old[k][1] != old[k + 1][0] * old[k + 1][1] for k in range(oi, oj - 1)):
            return None
        strides[nj - 1] = old[oj - 1][1]
        for k in range(nj - 1, ni, -1):
            strides[k - 1] = strides[k] * new[k]
        ni, oi = nj, oj
    it = iter(strides)
    return [next(it) if n != 1 else 0 for n in new_shape]


def _split_view(bb, item, shape, depth) -> _View | None:
    """A piece of a ``split``: the whole's view, offset to the piece."""
    from .rewrites import _bound_call

    call = _bound_call(bb, item.tuple_value, "relax.split")
    if call is None:
        return None
    whole = _view(bb, call.args[0], depth + 1)
    if whole is None:
        return None
    axis = int(call.attrs.axis) % len(whole.shape)
    sections = call.attrs.indices_or_sections
    n = whole.shape[axis]
    if isinstance(sections, (int,)) or hasattr(sections, "value"):
        k = int(sections.value if hasattr(sections, "value") else sections)
        starts = [i * (n // k) for i in range(k)]
    else:
        starts = [0] + [int(i) for i in sections]
    start = starts[item.index]
    piece = list(whole.shape)
    piece[axis] = shape[axis] if len(shape) == len(piece) else piece[axis]
    if len(shape) != len(piece) or piece != shape:
        return None
    return _View(whole.base, whole.offset + start * whole.strides[axis], shape, list(whole.strides), whole.scale)


def _batch_strides(view: _View, batch: list[int]) -> list[int]:
    """The view's strides over the output's batch axes (0 where it broadcasts), or None."""
    lead = view.shape[:-2]
    if len(lead) > len(batch):
        if any(n != 1 for n in lead[: len(lead) - len(batch)]):
            return None
        lead, strides = lead[len(lead) - len(batch):], view.strides[len(view.shape) - 2 - len(batch): -2]
    else:
        strides = view.strides[:-2]
    pad = len(batch) - len(lead)
    out = [0] * pad
    for n, s, b in zip(lead, strides, batch[pad:]):
        if n == b:
            out.append(s)
        elif n == 1:
            out.append(0)
        else:
            return None
    return out


def _mask_view(expr, batch: list[int], rows: int, keys: int):
    """(expr, strides over batch axes, row stride, key stride) of an additive mask broadcast to
    [*batch, rows, keys], or None."""
    shape = _shape(expr)
    full = [*batch, rows, keys]
    if shape is None or str(expr.ty.dtype) != "float32" or len(shape) > len(full):
        return None
    shape = [1] * (len(full) - len(shape)) + shape
    strides = _row_major(shape)
    out = []
    for n, s, f in zip(shape, strides, full):
        if n == f and n != 1:
            out.append(s)
        elif n == 1:
            out.append(0)
        else:
            return None
    return expr, out[:-2], out[-2], out[-1]


def fuse(bb, call, uses, lanes: int):
    """The fused kernel for ``call`` (``matmul(softmax(...), V)``), or None to keep it."""
    from tvm import relax

    from .rewrites import _bound_call

    probs, v = call.args
    wanted = 1  # uses of the probabilities: the ·V matmul's (and isnan's)
    unnan = _nan_zeroed(bb, probs)  # where(isnan(p), 0, p): torch's SDPA export zeroes NaN rows
    if unnan is not None:
        if uses is not None and uses.get(probs, 0) > 1:
            return None
        probs, wanted = unnan, 2
    sm = _bound_call(bb, probs, "relax.nn.softmax")
    if sm is None:
        return None
    if uses is not None and uses.get(probs, 0) > wanted:  # the probabilities are wanted too
        return None
    out_shape = _shape(call)
    p_shape = _shape(probs)
    if out_shape is None or p_shape is None or len(p_shape) < 2 or str(call.ty.dtype) != "float32":
        return None
    if int(sm.attrs.axis) % len(p_shape) != len(p_shape) - 1:
        return None
    if call.attrs.out_dtype and str(call.attrs.out_dtype) not in ("", "float32"):
        return None
    rows, keys = p_shape[-2:]
    if len(out_shape) != len(p_shape):
        return None
    batch = out_shape[:-2]
    if p_shape[:-2] != batch:
        return None
    # scores [* scale] [+ mask], down to the Q·Kᵀ matmul
    x, mask, scale = sm.args[0], None, 1.0
    for _ in range(3):
        b = _bound(bb, x)
        if not isinstance(b, relax.Call) or not hasattr(b.op, "name"):
            return None
        name = b.op.name
        if name == "relax.matmul":
            break
        if name == "relax.add" and mask is None and scale == 1.0:  # (a scale after the mask scales it)
            a0, a1 = b.args
            if _shape(a0) == p_shape and _is_scores(bb, a0):
                x, m = a0, a1
            elif _shape(a1) == p_shape and _is_scores(bb, a1):
                x, m = a1, a0
            else:
                return None
            mask = _mask_view(m, batch, rows, keys)
            if mask is None:
                return None
            continue
        if name in ("relax.multiply", "relax.divide"):
            a0, a1 = b.args
            c = _scalar(a1)
            if c is None and name == "relax.multiply":
                c, a1, a0 = _scalar(a0), a0, a1
            if c is None or c == 0 or _shape(a0) != p_shape:
                return None
            scale *= c if name == "relax.multiply" else 1.0 / c
            x = a0
            continue
        return None
    else:
        return None
    qk = _bound_call(bb, x, "relax.matmul")
    if qk is None:
        return None
    if qk.attrs.out_dtype and str(qk.attrs.out_dtype) not in ("", "float32"):
        return None
    qv, kv, vv = _view(bb, qk.args[0]), _view(bb, qk.args[1]), _view(bb, v)
    if qv is None or kv is None or vv is None:
        return None
    if len(qv.shape) < 2 or len(kv.shape) < 2 or len(vv.shape) < 2:
        return None
    depth = qv.shape[-1]
    if qv.shape[-2] != rows or kv.shape[-2:] != [depth, keys] or vv.shape[-2] != keys:
        return None
    dv = vv.shape[-1]
    if out_shape[-1] != dv:
        return None
    # Kᵀ is read in place when its keys are contiguous and fill whole vectors; otherwise the
    # kernel first copies each head's Kᵀ, zero-padded to whole vectors of keys, into a workspace.
    k_direct = kv.strides[-1] == 1 and keys % lanes == 0 and keys <= MAX_KEYS
    qb, kb, vb = (_batch_strides(w, batch) for w in (qv, kv, vv))
    if qb is None or kb is None or vb is None:
        return None
    scale *= qv.scale * kv.scale
    # the output as tokens by heads when there are (batch, heads) axes: the transpose back is
    # then a view of it (``permutes_collapsed``), not a copy
    tokens = len(batch) == 2
    if tokens:
        nb, nh = batch
        ob = [rows * nh * dv, dv]
        orow = nh * dv
        stored = [nb, rows, nh, dv]
    else:
        ob = _row_major(batch + [rows, dv])[:-2]
        orow = dv
        stored = out_shape
    spec = _Spec(
        batch=batch, rows=rows, keys=keys, depth=depth, dv=dv, scale=scale, lanes=lanes,
        q=(qv.offset, qb, qv.strides[-2], qv.strides[-1]),
        k=(kv.offset, kb, kv.strides[-2], kv.strides[-1]),
        k_direct=k_direct,
        v=(vv.offset, vb, vv.strides[-2], vv.strides[-1]),
        o=(0, ob, orow, 1),
        mask=None if mask is None else (0, mask[1], mask[2], mask[3]),
        sizes=[_numel(w.base) for w in (qv, kv, vv)] + ([_numel(mask[0])] if mask else []) + [math.prod(stored)],
        scale_out=vv.scale,
        nan_to_zero=unnan is not None,
    )
    if max(spec.sizes) >= 2**31:  # the kernel indexes in int32
        return None
    func = attention_kernel(spec)
    gv = bb.add_func(func, "attention")
    flat = [bb.normalize(relax.op.reshape(w.base, (_numel(w.base),))) for w in (qv, kv, vv)]
    if mask:
        flat.append(bb.normalize(relax.op.reshape(mask[0], (_numel(mask[0]),))))
    out = bb.emit(relax.call_tir(gv, flat, relax.TensorType((math.prod(stored),), "float32")))
    out = bb.emit(relax.op.reshape(out, stored))
    if tokens:
        return relax.op.permute_dims(out, [0, 2, 1, 3])
    return out


def _nan_zeroed(bb, expr):
    """``p`` when ``expr`` is ``where(isnan(p), 0, p)``, else None."""
    from .rewrites import _bound_call

    where = _bound_call(bb, expr, "relax.where")
    if where is None:
        return None
    cond, zero, p = where.args
    isnan = _bound_call(bb, cond, "relax.isnan")
    if isnan is None:
        return None
    value = _scalar(zero)
    if value != 0.0 or not isnan.args[0].same_as(p):
        return None
    return p


def _is_scores(bb, expr) -> bool:
    """Whether ``expr`` is a matmul, or a matmul scaled by a scalar."""
    from tvm import relax

    for _ in range(3):
        b = _bound(bb, expr)
        if not isinstance(b, relax.Call) or not hasattr(b.op, "name"):
            return False
        if b.op.name == "relax.matmul":
            return True
        if b.op.name not in ("relax.multiply", "relax.divide"):
            return False
        a0, a1 = b.args
        expr = a0 if _scalar(a1) is not None else a1
    return False


def _numel(expr) -> int:
    return math.prod(_shape(expr))


@dataclasses.dataclass
class _Spec:
    """One attention kernel: batch axes, query rows, keys, head dims (Q·K and V), the softmax
    scale, the vector lanes, and per operand (offset, batch-axis strides, row stride, column
    stride) into its flat buffer: Q [rows, depth], Kᵀ [depth, keys], V [keys, dv], O [rows, dv],
    mask [rows, keys]. ``k_direct``: Kᵀ's keys are contiguous and whole vectors (else copied)."""

    batch: list[int]
    rows: int
    keys: int
    depth: int
    dv: int
    scale: float
    lanes: int
    q: tuple
    k: tuple
    v: tuple
    o: tuple
    mask: tuple | None
    sizes: list[int]
    k_direct: bool = True
    scale_out: float = 1.0
    nan_to_zero: bool = False


def _tiles(spec: _Spec):
    """(keys a task scores at once, padded to whole vectors; key vectors per tile, rows per score tile, rows per task, ·V lanes, ·V
    vectors, rows per ·V tile)."""
    lanes = spec.lanes
    kp = KEY_BLOCK if spec.keys > MAX_KEYS else -(-spec.keys // lanes) * lanes
    nvec = kp // lanes
    jv = min(4, nvec)  # (a tile of the nvec % jv vectors left over follows)
    rt = {4: 4, 3: 6, 2: 8, 1: 8}[jv]
    most = max(rt, min(64, _SCORE_BLOCK // kp) // rt * rt)
    # rows per task: the multiple of rt that wastes fewest padded rows, the larger on ties
    rb = min(range(rt, most + 1, rt), key=lambda r: (-(-spec.rows // r) * r - spec.rows, -r))
    dl = next(w for w in (lanes, 16, 8, 4, 2, 1) if w <= lanes and spec.dv % w == 0)
    dvv = spec.dv // dl
    rt2 = next(r for r in (8, 6, 4, 2, 1) if rb % r == 0 and r * dvv <= 16)
    return kp, jv, rt, rb, dl, dvv, rt2


def attention_kernel(spec: _Spec):
    """The kernel: (q, k, v[, mask]) flat -> o flat, one parallel task per (batch, row block)."""
    from tvm import tirx
    from tvm.script import tirx as T

    from .rewrites import _fexp

    lanes = spec.lanes
    kp, jv, rt, rb, dl, dvv, rt2 = _tiles(spec)
    nvec = kp // lanes
    n_batch = math.prod(spec.batch)
    blocks = -(-spec.rows // rb)
    rows, keys, depth, dv = spec.rows, spec.keys, spec.depth, spec.dv
    scale = float(spec.scale)
    out_scale = float(spec.scale_out)
    has_mask = spec.mask is not None
    dims = list(spec.batch)

    def batch_offset(n, operand):
        off, strides = operand[0], operand[1]
        expr = tirx.const(off, "int32")
        rest = n
        for size, stride in zip(reversed(dims), reversed(strides)):
            if stride:
                expr = expr + tirx.floormod(rest, size) * stride
            rest = tirx.floordiv(rest, size)
        return expr

    def at(operand, base, r, c):
        return base + r * operand[2] + c * operand[3]

    q_sp, k_sp, v_sp, o_sp = spec.q, spec.k, spec.v, spec.o
    m_sp = spec.mask if has_mask else (0, [0] * len(dims), 0, 0)
    sizes = spec.sizes
    ninf = tirx.const(float("-inf"), "float32")
    nan = tirx.const(float("nan"), "float32")

    def normalized(value, inv):
        # a row whose probabilities are NaN (every key masked with -inf, or a NaN score) is all
        # NaN: with ``nan_to_zero`` it is zeros, as where(isnan(p), 0, p) makes it
        if spec.nan_to_zero:
            return tirx.Select(tirx.isnan(inv), tirx.const(0.0, "float32"), value * inv)
        return value * inv

    def kt_of(k, kt):
        return k if k_direct else kt

    def exp_shifted(x, top):
        # exp(x - max); in blocks, 0 while the running max is -inf (x - max would be NaN)
        if blocked:
            return tirx.Select(top == ninf, tirx.const(0.0, "float32"), _fexp(x - top))
        return _fexp(x - top)

    def masked(m, mo, row, j):
        return m[at(m_sp, mo, row, j)] if has_mask else tirx.const(0.0, "float32")

    k_direct = spec.k_direct
    blocked = keys > MAX_KEYS  # online softmax over blocks of kp keys (Kᵀ then always copied)
    nkb = -(-keys // kp)
    kw = nkb * kp  # the workspace's padded keys
    kt_sp = k_sp if k_direct else (0, _row_major(dims + [depth, kw])[:-2], kw, 1)  # (the workspace)

    def valid(kb):  # keys of block kb
        return keys if not blocked else tirx.min(kp, keys - kb * kp)

    @T.macro
    def score_tile(q, k, kt, s, qo, ko, i0, it, c0, v0, nv):
        for r in T.unroll(rt):
            for u in T.unroll(nv):
                for l in T.vectorized(lanes):
                    s[it * rt + r, (v0 + u) * lanes + l] = T.float32(0)
        for d in range(depth):
            for r in T.unroll(rt):
                for u in T.unroll(nv):
                    for l in T.vectorized(lanes):
                        s[it * rt + r, (v0 + u) * lanes + l] = (
                            s[it * rt + r, (v0 + u) * lanes + l]
                            + q[at(q_sp, qo, T.min(i0 + it * rt + r, rows - 1), d)]
                            * kt_of(k, kt)[at(kt_sp, ko, d, c0 + (v0 + u) * lanes + l)])  # fmt: skip

    @T.macro
    def body(q, k, v, m, o):
        kt = T.decl_buffer((n_batch * depth * kw if not k_direct else 1,), "float32")
        if not k_direct:
            for n in T.parallel(n_batch):
                for j in range(kw):
                    for d in range(depth):
                        kt[n * depth * kw + d * kw + j] = T.if_then_else(
                            j < keys, k[at(k_sp, batch_offset(n, k_sp), d, T.min(j, keys - 1))], T.float32(0))
        for task in T.parallel(n_batch * blocks):
            s = T.decl_buffer((rb, kp), "float32")
            ob = T.decl_buffer((rb, dv), "float32")
            inv = T.decl_buffer((rb,), "float32")
            part = T.decl_buffer((lanes,), "float32")
            top = T.decl_buffer((rb,), "float32")  # each row's running max
            n: T.int32 = task // blocks
            i0: T.int32 = task % blocks * rb
            qo: T.int32 = batch_offset(n, q_sp)
            ko: T.int32 = batch_offset(n, kt_sp)
            vo: T.int32 = batch_offset(n, v_sp)
            mo: T.int32 = batch_offset(n, m_sp)
            oo: T.int32 = batch_offset(n, o_sp)
            if blocked:  # the running sums start empty
                for r in range(rb):
                    top[r] = ninf
                    inv[r] = T.float32(0)
                    for u in range(dvv):
                        for l in T.vectorized(dl):
                            ob[r, u * dl + l] = T.float32(0)
            for kb in range(nkb):
                # scores: rt rows x jv vectors of keys in registers, over the head dim (then the
                # key vectors left over, if jv does not divide them)
                for it in range(rb // rt):
                    for jo in range(nvec // jv):
                        score_tile(q, k, kt, s, qo, ko, i0, it, kb * kp, jo * jv, jv)
                    score_tile(q, k, kt, s, qo, ko, i0, it, kb * kp, nvec // jv * jv, nvec % jv)
                # softmax of each row: scale and mask with the row max, then exp and the row sum
                for r in range(rb):
                    for l in T.vectorized(lanes):
                        part[l] = ninf
                    for jo in range(valid(kb) // lanes):
                        for l in T.vectorized(lanes):
                            s[r, jo * lanes + l] = s[r, jo * lanes + l] * T.float32(scale) + masked(
                                m, mo, T.min(i0 + r, rows - 1), kb * kp + jo * lanes + l)
                            part[l] = T.max(part[l], s[r, jo * lanes + l])
                    for j in range(valid(kb) // lanes * lanes, valid(kb)):
                        s[r, j] = s[r, j] * T.float32(scale) + masked(m, mo, T.min(i0 + r, rows - 1), kb * kp + j)
                        part[0] = T.max(part[0], s[r, j])
                    for l in range(1, lanes):
                        part[0] = T.max(part[0], part[l])
                    if blocked:
                        # the new running max; what was summed so far scales by exp(old - new)
                        # (nothing was, while every key so far is -inf)
                        part[1] = T.max(top[r], part[0])
                        part[2] = T.if_then_else(top[r] == ninf, T.float32(0), _fexp(top[r] - part[1]))
                        top[r] = part[1]
                        inv[r] = inv[r] * part[2]
                        for u in range(dvv):
                            for l in T.vectorized(dl):
                                ob[r, u * dl + l] = ob[r, u * dl + l] * part[2]
                    else:
                        top[r] = part[0]
                    for l in T.vectorized(lanes):
                        part[l] = T.float32(0)
                    for jo in range(valid(kb) // lanes):
                        for l in T.vectorized(lanes):
                            s[r, jo * lanes + l] = exp_shifted(s[r, jo * lanes + l], top[r])
                            part[l] = part[l] + s[r, jo * lanes + l]
                    for j in range(valid(kb) // lanes * lanes, valid(kb)):
                        s[r, j] = exp_shifted(s[r, j], top[r])
                        part[0] = part[0] + s[r, j]
                    for l in range(1, lanes):
                        part[0] = part[0] + part[l]
                    if blocked:
                        inv[r] = inv[r] + part[0]
                    else:
                        inv[r] = part[0]
                # ·V: rt2 rows x the head dim's vectors in registers, over the keys
                for it in range(rb // rt2):
                    if not blocked:
                        for r in T.unroll(rt2):
                            for u in T.unroll(dvv):
                                for l in T.vectorized(dl):
                                    ob[it * rt2 + r, u * dl + l] = T.float32(0)
                    for j in range(valid(kb)):
                        for r in T.unroll(rt2):
                            for u in T.unroll(dvv):
                                for l in T.vectorized(dl):
                                    ob[it * rt2 + r, u * dl + l] = (
                                        ob[it * rt2 + r, u * dl + l]
                                        + s[it * rt2 + r, j] * v[at(v_sp, vo, kb * kp + j, u * dl + l)])  # fmt: skip
            for r in range(rb):
                # every key masked with -inf: softmax's 0/0, NaN (onnxruntime's too)
                inv[r] = T.if_then_else(top[r] == ninf, nan, T.float32(out_scale) / inv[r])
                if i0 + r < rows:
                    for u in range(dvv):
                        for l in T.vectorized(dl):
                            o[at(o_sp, oo, i0 + r, u * dl + l)] = normalized(ob[r, u * dl + l], inv[r])

    if has_mask:

        @T.prim_func(private=True)
        def attention(q: T.Buffer((sizes[0],), "float32"), k: T.Buffer((sizes[1],), "float32"),
                      v: T.Buffer((sizes[2],), "float32"), m: T.Buffer((sizes[3],), "float32"),
                      o: T.Buffer((sizes[4],), "float32")):  # fmt: skip
            T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
            body(q, k, v, m, o)

    else:

        @T.prim_func(private=True)
        def attention(q: T.Buffer((sizes[0],), "float32"), k: T.Buffer((sizes[1],), "float32"),
                      v: T.Buffer((sizes[2],), "float32"), o: T.Buffer((sizes[3],), "float32")):  # fmt: skip
            T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
            body(q, k, v, q, o)

    return attention


def attention_fused(lanes: int):
    """A Relax pass: every ``matmul(softmax(Q·Kᵀ [· scale] [+ mask]), V)`` that ``fuse`` takes
    becomes one ``attention`` kernel (``lanes``: the profile's float32 vector lanes)."""
    from .rewrites import _relax_pass

    return _relax_pass("AttentionFused", "relax.matmul", lambda bb, call, uses: fuse(bb, call, uses, lanes),
                       with_uses=True)  # fmt: skip
