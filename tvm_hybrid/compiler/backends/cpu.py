"""The CPU backend (LLVM: x86, ARM): default schedules for kernels no tuning database covers,
a TVM VM library linked by the host's or the profile's cross compiler."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

from ... import hostcpu
from ...targets import TargetProfile
from ..rewrites import DEQUANTIZE_STAGE, WINOGRAD_TILES_STAGE
from .base import Backend

log = logging.getLogger(__name__)

# Attributes that mark a PrimFunc as already scheduled (by a tuning database or by hand).
_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled", "tvm_hybrid.tuned")

@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """What the heuristic schedule needs to know about the CPU."""

    lanes: int  # f32 lanes of one SIMD register
    max_rows: int = 8  # register-tile rows (output channels) a reduction keeps in flight
    max_cols: int = 2  # register-tile columns (vectors of pixels) a reduction keeps in flight
    accumulators: int = 12  # vector registers the accumulator tile may take
    # Below this many multiply-adds (an element of a spatial kernel counts as 4), waking the
    # thread pool costs more than it saves. 1 << 17 is some 10 us of work; at 1 << 20, kernels
    # of 0.1-0.3 ms ran on one core of two (det's 10x10 depthwise convs, the padding before
    # its 40x40 head conv): PP-OCRv4 det 9.5 -> 8.9 ms, cls 0.64-0.66 -> 0.57-0.63 ms in three
    # runs on 2 Xeon cores (`scripts/ab_schedules.py --variant parallel_min_work=1048576`).
    parallel_min_work: int = 1 << 17
    unroll_max_step: int = 64
    #: Row tiles go innermost (``_rows_innermost``) when the broadcast operand is at most this big,
    rows_inner_max_bytes: int = 256 << 10
    #: and each output takes at least this long a reduction.
    rows_inner_min_reduction: int = 32
    #: Compute a reduction's elementwise consumer inside its register tiles (off on the retry of
    #: a kernel whose consumer region is wider than a tile: it then runs as a pass of its own).
    attach_epilogues: bool = True
    #: Rows of independent accumulators for a reduction whose read no row reuses (depthwise
    #: convs); 1 keeps one accumulator vector a tile.
    ilp_rows: int = 4
    #: Split a reduction of at least four times this into blocks of it (0: never), the row
    #: tiles running inside each block (see ``_schedule_reduction``).
    k_block: int = 0
    #: A convolution's reduction with its row tiles innermost goes in blocks of this many input
    #: channels (with all their taps; 0: never): one block of the weights, in L1, serves every
    #: row tile before the next is read (see ``_schedule_reduction``).
    conv_k_block: int = 32
    #: Columns of the panels a constant matmul weight is packed in at compile time (0: never;
    #: ``_pack_weight``). One width for every CPU level, so the builds of a portable artifact
    #: share one packed copy of each weight.
    weight_panel: int = 32


class ScheduleRefused(Exception):
    """The heuristic would produce a wrong or pointless schedule for this kernel."""


def cpu_config(target) -> CpuConfig:
    """The schedule settings for an llvm target, from its mcpu and mattr."""
    features = hostcpu.x86_features(
        {"mcpu": str(target.attrs.get("mcpu", "") or ""), "mattr": [str(a) for a in (target.attrs.get("mattr") or [])]}
    )  # an unknown CPU counts as SSE: 4 lanes
    if "avx512f" in features:
        # 32 zmm registers: up to 8 columns, as many as the 24 accumulators allow. An 80-wide
        # row is 5 vectors, so 4 rows x 5 columns (9 loads for 20 FMAs) instead of 8 x 1 (9 for
        # 8): PP-OCRv4 det 9.8 -> 8.9 ms on 2 cores of a Xeon with AVX-512 (one column: 0.72x
        # onnxruntime, five: 0.65x; `scripts/ab_schedules.py --model det --variant max_cols=1`).
        # AVX-512 CPUs have 1 MB of L2 or more (Skylake-SP on; Zen 4): row tiles go innermost
        # while the broadcast operand is up to 1 MB (256 KB elsewhere), so a ViT's 197x384
        # activations cycle through L2 and each weight panel stays there: on 2 Zen 4 cores
        # ViT-S/16 26.2 -> 22.8 ms, PP-OCRv4 det 4.90 -> 4.18, MiniLM-L3 3.55 -> 3.46, YOLOv8n
        # 9.56 -> 9.47, cls and MiniLM-L3 8x128 unchanged (`scripts/ab_schedules.py --variant
        # rows_inner_max_bytes=1048576`, one run a model).
        # A reduction of 1024 or more with its row tiles innermost (a transformer's FFN down
        # projection, 1536 long) goes in blocks of 256: the weight block and the activation's
        # columns for it stay in L2 across the row tiles. paraphrase-MiniLM-L3 10.33 -> 9.95 and
        # 8.46 -> 8.37 ms in two runs (`scripts/ab_schedules.py --model minilm-l3 --variant
        # k_block=256`, against 0); over 512 (ViT-S/16's 768-long patch matmul too) it lost.
        # With blocks, what cycles through L2 is one block's columns of the activation, so that
        # is what rows_inner_max_bytes is held against (``_rows_innermost``): ViT-S/16's 197x1536
        # (1.2 MB) had kept its rows outermost, all of the 2.4 MB weight streamed past each row
        # tile; on 2 Xeon (Emerald Rapids) vCPUs 86.3 -> 68.7 ms (`scripts/ab_revisions.py HEAD
        # WORKTREE --model zoo:vit-s16`), the kernel alone 2.77 -> 1.83 ms.
        return CpuConfig(lanes=16, accumulators=24, max_cols=8, rows_inner_max_bytes=1 << 20, k_block=256)
    if "avx" in features:
        return CpuConfig(lanes=8)
    return CpuConfig(lanes=4)


def apply_default(mod, profile: TargetProfile, cfg: CpuConfig | None = None):
    """Give every PrimFunc not yet scheduled a heuristic CPU schedule (llvm targets only).

    Functions a tuning database scheduled are left alone. A kernel whose structure the
    heuristic does not handle keeps TVM's unscheduled lowering; the build never fails here.
    The result depends only on the module and the target, so builds are reproducible.
    ``cfg`` replaces the target's settings (``scripts/ab_schedules.py`` compares them).
    A kernel that reads a constant matmul weight in panels (``_pack_weight``) is passed it
    packed so, from a constant made here; the module then holds only the packed copy.
    """
    import tvm
    from tvm import relax

    target = profile.tvm()
    if target.kind.name != "llvm":
        return mod
    cfg = cfg or cpu_config(target)
    relax_funcs = any(isinstance(f, relax.Function) for f in mod.functions.values())
    constant = _constant_params(mod) if cfg.weight_panel and relax_funcs else {}
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
            continue
        if constant.get(gv):  # weights _pack_weight may pack
            func = func.with_attr(_CONSTANT_ATTR, sorted(constant[gv]))
        try:
            try:
                new = schedule_func(func, cfg)
            except ScheduleRefused:  # an epilogue wider than a tile: its own pass, after the tiles
                new = schedule_func(func, dataclasses.replace(cfg, attach_epilogues=False))
        except Exception as e:  # an s_tir primitive refused: keep the unscheduled kernel
            log.debug("default schedule failed for %s: %s", gv.name_hint, str(e).splitlines()[0][:200])
            continue
        if new is not None:
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
    if not updates:
        return mod
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
    for gv, func in updates.items():
        mod[gv] = func  # on the copy: the caller's module stays as it was
    log.debug("default schedules for %d kernels", len(updates))
    if relax_funcs and any(_PACKED_ATTR in (f.attrs or {}) for f in updates.values()):
        mod = _pack_weights(mod)
    return mod


def _constant_params(mod) -> dict:
    """GlobalVar of a kernel -> indices of its parameters that every call passes a constant."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict = {}

    def visit(e):
        if not isinstance(e, relax.Call):
            return
        if e.op.same_as(call_tir):
            fields = e.args[1].fields if isinstance(e.args[1], relax.Tuple) else ()
            here = {i for i, a in enumerate(fields) if isinstance(a, tvm.ir.GenericConst)}
            out[e.args[0]] = out[e.args[0]] & here if e.args[0] in out else here
        else:  # called some other way (call_tir_inplace…): left as it is
            out.update({a: set() for a in e.args if isinstance(a, tvm.ir.GlobalVar)})

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return out


_CONSTANT_ATTR = "tvm_hybrid.constant_params"  # while scheduling: the parameters every call passes a constant
_PACKED_ATTR = "tvm_hybrid.packed_weight"  # [parameter index, panel columns] of a kernel
_PACKED_BLOCK = "tvm_hybrid.packed_param"  # while scheduling, on the block that reads it: the parameter index


def _pack_weights(mod):
    """Each call of a kernel that reads a weight in panels (``_pack_weight``) passes that
    constant packed: ``[K, N]`` -> ``[N/panel, K, panel]``, computed here, once per constant."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    packed = {gv: tuple(int(v) for v in f.attrs[_PACKED_ATTR]) for gv, f in mod.functions.items()
              if f.attrs is not None and _PACKED_ATTR in f.attrs}  # fmt: skip
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @mutator
    class Pack(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.done = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or call.args[0] not in packed:
                return call
            index, panel = packed[call.args[0]]
            args = list(call.args[1].fields)
            w = args[index]
            if not isinstance(w, tvm.ir.GenericConst):
                raise ValueError(f"{call.args[0].name_hint}: weight {index} is not a constant")
            key = w.__chandle__()
            if key not in self.done:
                value = w.value.numpy()
                k, n = value.shape
                self.done[key] = relax.const(np.ascontiguousarray(value.reshape(k, n // panel, panel).transpose(1, 0, 2)))
            args[index] = self.done[key]
            return relax.Call(call.op, [renamed[call.args[0]], relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)

    # New global vars for the kernels: a global var keeps the signature it was made with.
    bb = relax.BlockBuilder()
    renamed = {gv: bb.add_func(mod[gv], gv.name_hint) for gv in packed}
    pack = Pack(mod)
    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = pack.visit_expr(func)
        funcs[renamed.get(gv, gv)] = func
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)


def _is_scheduled(func) -> bool:
    attrs = func.attrs
    return attrs is not None and any(k in attrs and bool(attrs[k]) for k in _SCHEDULED_ATTRS)


def schedule_func(func, cfg: CpuConfig):
    """A scheduled copy of ``func``, or None when the heuristic does not apply."""
    from tvm import s_tir

    from .. import int8

    sch = s_tir.Schedule(func)
    if int8.is_int8_kernel(sch):
        int8.schedule(sch, cfg.parallel_min_work)
        return sch.mod["main"]
    blocks = _child_blocks(sch)
    if blocks is None:
        return None
    _inline(sch, blocks)
    _deinterleave_strided(sch)
    _fuse_pixels(sch, cfg)
    for block in _child_blocks(sch) or []:
        _pad_vector_axis(sch, block, cfg)
    blocks = _child_blocks(sch)
    done: set[str] = set()
    for block in blocks:
        if sch.get(block).name_hint == WINOGRAD_TILES_STAGE:
            done.update(_schedule_winograd_output(sch, block))
    for block in blocks:
        name = sch.get(block).name_hint
        if name in done:
            continue
        if _is_reduction(sch, block):
            attached = _schedule_reduction(sch, block, cfg)
            done.update(attached)
        else:
            _schedule_spatial(sch, block, cfg)
        done.add(name)
    packed = None
    for b in sch.get_child_blocks(sch.get_sblock(sch.mod["main"].body.block.name_hint)):
        if _PACKED_BLOCK in sch.get(b).annotations:
            packed = [int(sch.get(b).annotations[_PACKED_BLOCK]), cfg.weight_panel]
            sch.unannotate(b, _PACKED_BLOCK)
    func = sch.mod["main"]
    if func.attrs is not None and _CONSTANT_ATTR in func.attrs:
        func = func.without_attr(_CONSTANT_ATTR)
    return func.with_attr(_PACKED_ATTR, packed) if packed else func


# -- analysis ------------------------------------------------------------------------------


def _child_blocks(sch):
    """The blocks directly under the root, each alone in its own loop nest, or None."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    blocks = list(sch.get_child_blocks(root))
    for b in blocks:
        block = sch.get(b)
        loops = sch.get_loops(b)
        if len(loops) != len(block.iter_vars):
            return None
        for loop, iv in zip(loops, block.iter_vars):
            if not _same_int(sch.get(loop).extent, iv.dom.extent):
                return None
    return blocks


def _same_int(a, b) -> bool:
    try:
        return int(a) == int(b)
    except (TypeError, ValueError):
        return False


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == 2 for iv in sch.get(block).iter_vars)


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _has_call(expr, names: tuple[str, ...]) -> bool:
    """Whether ``expr`` calls an op whose name contains one of ``names``."""
    import tvm

    found = [False]

    def visit(e):
        if isinstance(e, tvm.ir.Call) and any(n in str(getattr(e.op, "name", e.op)) for n in names):
            found[0] = True

    _walk(expr, visit)
    return found[0]


# Child fields of TIR expression nodes; TVM 0.27 has no Python expression visitor for them.
_CHILD_FIELDS = ("args", "indices", "a", "b", "value", "condition", "true_value", "false_value")


def _walk(node, visit) -> None:
    """Pre-order walk over a TIR expression tree."""
    import tvm

    stack = [node]
    while stack:
        e = stack.pop()
        visit(e)
        if isinstance(e, tvm.ir.Op):
            continue
        for field in _CHILD_FIELDS:
            child = getattr(e, field, None)
            if child is None:
                continue
            if isinstance(child, tvm.ir.expr.Expr):
                stack.append(child)
            elif isinstance(child, Sequence):
                stack.extend(c for c in child if isinstance(c, tvm.ir.expr.Expr))


def _expr_size(expr) -> int:
    """Nodes in a TIR expression tree (repeated subtrees counted each time)."""
    count = [0]

    def visit(_):
        count[0] += 1

    _walk(expr, visit)
    return count[0]


# -- inlining ------------------------------------------------------------------------------


def _inline(sch, blocks) -> None:
    """Inline injective producers into their consumers, so a fused kernel is one loop nest.

    A producer that a reduction reads is inlined only when it is cheap and unconditional
    (a transpose, a cast): a reduction reads each input many times, and a padding
    ``if_then_else`` inside its inner loop stops vectorization. Those stay separate stages.
    """
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for b in blocks:
        block = sch.get(b)
        if block.name_hint in outputs or _is_reduction(sch, b) or block.name_hint in (DEQUANTIZE_STAGE, WINOGRAD_TILES_STAGE):
            continue
        if not _is_simple_store(block):
            continue
        consumers = sch.get_consumers(b)
        if any(_is_reduction(sch, c) for c in consumers):
            if _has_call(block.body.value, ("if_then_else", "exp", "sigmoid", "tanh", "erf", "log", "sqrt", "pow")):
                continue
        # A concat (a choice between sources) stays a stage of its own before a consumer that
        # reads it many times over (a polynomial sigmoid: some 20 reads an element), which
        # would repeat the choice at every read (a YOLOv8 head's class scores: 2.3 ms).
        if _has_call(block.body.value, ("if_then_else",)) and any(
            _reads_of(sch.get(c), block.writes[0].source) > 2 for c in consumers
        ):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # not inlinable (e.g. read twice with different indices by a reduction)
            pass


def _reads_of(block, buf=None) -> int:
    """How many times a simple-store block's value loads from ``buf`` (None: from any buffer)."""
    import tvm

    if not _is_simple_store(block):
        return 0
    count = [0]

    def visit(e):
        if isinstance(e, tvm.ir.expr.TensorLoad) and (buf is None or e.source.same_as(buf)):
            count[0] += 1

    _walk(block.body.value, visit)
    return count[0]


def _is_simple_store(block) -> bool:
    import tvm

    return isinstance(block.body, tvm.tirx.BufferStore) and block.init is None


# -- strided windows -----------------------------------------------------------------------


def _deinterleave_strided(sch) -> int:
    """Store a stride-s convolution's padded input as s column phases, so its window reads
    are unit-stride and vectorize (a stride-2 conv reads every other column otherwise).

    The padding stage a strided convolution reads (an intermediate this kernel writes)
    gets the layout ``[..., w] -> [..., w % s, w // s]``, and iterates in it: it writes
    contiguously and reads strided, once; the convolution's read ``[..., x * s + r]``
    becomes ``[..., r % s, x + r // s]``, stride 1 along ``x``. Returns how many buffers
    changed.
    """
    blocks = _child_blocks(sch)
    if blocks is None:
        return 0
    root = sch.get(sch.get_sblock(sch.mod["main"].body.block.name_hint))
    writers = {}
    for b in blocks:
        stmt = sch.get(b)
        if len(stmt.writes) == 1 and not _is_reduction(sch, b):
            writers.setdefault(stmt.writes[0].source.name, []).append(b)
    changed = 0
    for b in blocks:
        if not _is_reduction(sch, b):
            continue
        stmt = sch.get(b)
        spatial = {iv.var.name: iv.var for iv in stmt.iter_vars if iv.iter_type == 0}
        for r in stmt.reads:
            buf = r.source
            producer = writers.get(buf.name, [])
            if len(producer) != 1 or not any(a.same_as(buf) for a in root.alloc_buffers):
                continue
            stride = _strided_by(r.region[-1].min, spatial.values())
            if stride is None or not _same_int(buf.shape[-1], buf.shape[-1]) or int(buf.shape[-1]) % stride:
                continue
            if len(sch.get_consumers(producer[0])) != 1:
                continue
            # Only where the read can be reused across output channels in registers: a
            # depthwise conv (its input depends on every output axis) measured no faster.
            if not any(_same_int(iv.dom.extent, iv.dom.extent) and int(iv.dom.extent) > 1 and not _uses_var(r, iv.var)
                       for iv in stmt.iter_vars if iv.iter_type == 0):  # fmt: skip
                continue
            sch.transform_layout(producer[0], ("write", 0), _phase_map(len(buf.shape), stride))
            sch.transform_block_layout(producer[0], _phase_map(len(sch.get(producer[0]).iter_vars), stride))
            changed += 1
            break
    return changed


def _phase_map(ndim: int, s: int):
    """``[..., w] -> [..., w % s, w // s]``."""
    return _index_map(lambda *v: [*v[: ndim - 1], v[ndim - 1] % s, v[ndim - 1] // s], ndim)


def _index_map(fn, ndim: int):
    """An IndexMap of ``ndim`` indices (``fn`` takes them as ``*v``)."""
    import tvm

    return tvm.tirx.IndexMap.from_func(fn, ndim=ndim)


def _strided_by(expr, spatial_vars) -> int | None:
    """s when ``expr`` is ``x * s`` or ``x * s + r`` for a spatial variable x and a constant s >= 2."""
    import tvm

    if isinstance(expr, tvm.tirx.Add):
        for a, other in ((expr.a, expr.b), (expr.b, expr.a)):
            s = _strided_by(a, spatial_vars)
            if s is not None and not any(_expr_uses(other, v) for v in spatial_vars):
                return s
        return None
    if isinstance(expr, tvm.tirx.Mul) and isinstance(expr.b, tvm.tirx.IntImm) and int(expr.b.value) >= 2:
        if any(expr.a.same_as(v) for v in spatial_vars):
            return int(expr.b.value)
    return None


# -- pixel fusion --------------------------------------------------------------------------


def _fuse_pixels(sch, cfg: CpuConfig) -> bool:
    """Make the rows x columns of a pointwise convolution one pixel axis, when that gives
    fuller vectors: a 20x20 feature map's rows split into 5-lane vectors (two instructions
    for 5 lanes on AVX2), its 400 pixels into 8-lane ones (PP-OCRv4 det's 192-channel 1x1
    convs: 2.7x faster).

    Applies to a kernel with one reduction whose output and every input read along the
    pixels index them as ``[..., y, x]`` over a buffer of the same height and width (a
    1x1, stride-1, unpadded window); every other block is elementwise over those pixels.
    The reduction's iteration space, its other blocks' and the intermediate result buffer
    become ``[..., y * W + x]``; parameters keep their shapes (their indices become
    ``f // W, f % W``, which simplify back to ``f`` in memory). Returns whether it applied.
    """
    blocks = _child_blocks(sch)
    if blocks is None:
        return False
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return False
    red = sch.get(reductions[0])
    ivs = list(red.iter_vars)
    spatial = [iv for iv in ivs if iv.iter_type == 0]
    if len(spatial) < 2 or len(red.writes) != 1:
        return False
    y, x = spatial[-2], spatial[-1]
    try:
        h, w = int(y.dom.extent), int(x.dom.extent)
    except (TypeError, ValueError):
        return False
    if _lanes_per_op(h * w, cfg.lanes) <= _lanes_per_op(w, cfg.lanes):
        return False
    unit = [iv.var for iv in ivs if iv.iter_type == 2 and _same_int(iv.dom.extent, 1)]

    def pixel_indexed(region) -> bool:
        idx = [rg.min for rg in region.region]
        uses = [_expr_uses(e, y.var) or _expr_uses(e, x.var) for e in idx]
        if not any(uses):
            return True
        shape = region.source.shape
        return (
            len(idx) >= 2 and not any(uses[:-2])
            and _same_int(shape[-2], h) and _same_int(shape[-1], w)
            and _is_plus_unit(idx[-2], y.var, unit) and _is_plus_unit(idx[-1], x.var, unit)
        )  # fmt: skip

    write = red.writes[0]
    if not (write.region[-2].min.same_as(y.var) and write.region[-1].min.same_as(x.var)):
        return False
    if not all(pixel_indexed(r) for r in red.reads):
        return False
    others = [b for b in blocks if not b.same_as(reductions[0])]
    for b in others:
        ext = [iv.dom.extent for iv in sch.get(b).iter_vars]
        if len(ext) < 2 or not (_same_int(ext[-2], h) and _same_int(ext[-1], w)):
            return False

    pos_y, pos_x = ivs.index(y), ivs.index(x)
    keep = [i for i, iv in enumerate(ivs) if not any(iv.var.same_as(u) for u in unit)]

    def red_map(*v):
        out = []
        for i in keep:
            if i != pos_x:
                out.append(v[i] * w + v[pos_x] if i == pos_y else v[i])
        return out

    def trailing(ndim: int):  # [..., y, x] -> [..., y * w + x]
        return _index_map(lambda *v: [*v[: ndim - 2], v[ndim - 2] * w + v[ndim - 1]], ndim)

    root = sch.get(sch.get_sblock(sch.mod["main"].body.block.name_hint))
    if any(buf.same_as(write.source) for buf in root.alloc_buffers):
        sch.transform_layout(reductions[0], ("write", 0), trailing(len(write.region)))
    sch.transform_block_layout(reductions[0], _index_map(red_map, len(ivs)))
    for b in others:
        sch.transform_block_layout(b, trailing(len(sch.get(b).iter_vars)))
    return True


def _is_plus_unit(expr, var, unit) -> bool:
    """Whether ``expr`` is ``var``, or ``var`` plus extent-1 reduction variables (a 1x1 window)."""
    import tvm

    if expr.same_as(var):
        return True
    if isinstance(expr, tvm.tirx.Add):
        if any(expr.b.same_as(u) for u in unit):
            return _is_plus_unit(expr.a, var, unit)
        if any(expr.a.same_as(u) for u in unit):
            return _is_plus_unit(expr.b, var, unit)
    return False


def _lanes_per_op(extent: int, lanes: int) -> float:
    """Useful lanes per SIMD instruction when an axis of ``extent`` is cut into vectors."""
    width = _vector_width(extent, lanes)
    return width / _vector_ops(width, lanes) if width else 1.0


# -- reductions ----------------------------------------------------------------------------


def _schedule_reduction(sch, block, cfg: CpuConfig) -> set[str]:
    """Register-tile a reduction: parallel outer spatial tiles, reduction loops, then a
    (rows x lanes) tile of accumulators with the lanes vectorized.

    Returns the names of consumer blocks computed inside its tiles.
    """
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    ivs = list(stmt.iter_vars)
    spatial = [(lp, iv) for lp, iv in zip(loops, ivs) if iv.iter_type == 0]
    reduce = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == 2]
    if not spatial or len(spatial) + len(reduce) != len(loops):
        return set()
    inner_var = next((iv.var for lp, iv in reversed(spatial) if _extent(sch, lp) > 1), spatial[-1][1].var)
    dominant = _dominant_read(stmt, inner_var)

    # Vector axis: the innermost spatial axis of extent > 1, when it is the output's last index
    # and the dominant read's too (contiguous, or strided for a strided convolution).
    vec = None
    for i in range(len(spatial) - 1, -1, -1):
        lp, iv = spatial[i]
        if _extent(sch, lp) > 1:
            if _flat_unit_stride(stmt.writes[0], iv.var) and _in_last_index(dominant, iv.var):
                vec = i
            break
    lanes = 0
    if vec is not None:
        lanes = _vector_width(_extent(sch, spatial[vec][0]), cfg.lanes)
    elif reduce and _vectorize_reduction(sch, block, spatial, reduce, cfg):
        return set()
    # A strided read (stride-2 convolution) would become one scalar load a lane under TVM's
    # vectorizer; left as a serial innermost loop, LLVM vectorizes it with shuffles instead.
    tvm_vectorize = bool(lanes) and _flat_unit_stride(dominant, spatial[vec][1].var)
    # Row axis: the largest other spatial axis the dominant read does not depend on (its
    # values are reused across rows while they sit in registers).
    row = None
    if lanes:
        best = 1
        for i, (lp, iv) in enumerate(spatial):
            if i == vec or dominant is None or _uses_var(dominant, iv.var):
                continue
            if _extent(sch, lp) > best:
                best, row = _extent(sch, lp), i
    rows, cols = 1, 1
    if row is not None and tvm_vectorize:
        rows, cols = _register_tile(_extent(sch, spatial[row][0]), _extent(sch, spatial[vec][0]) // lanes, lanes, cfg)
    elif tvm_vectorize and vec > 0 and _extent(sch, spatial[vec - 1][0]) > 1 and cfg.ilp_rows > 1:
        # No axis whose values the read reuses (a depthwise conv: each channel reads its own
        # map): rows of the axis outside the vectors still give independent accumulators, so
        # the FMAs of a tap do not wait on each other.
        row = vec - 1
        rows = _row_factor(_extent(sch, spatial[row][0]), cfg.ilp_rows)

    outer, inner = [], []
    row_outer = None
    for i, (lp, _) in enumerate(spatial):
        if i == vec and lanes:
            o, c, v = sch.split(lp, factors=[None, cols, lanes])
            outer.append(o)
            vec_cols, vec_inner = c, v
        elif i == row and rows > 1:
            o, r = sch.split(lp, factors=[None, rows])
            outer.append(o)
            row_outer = o
            inner.append(r)
        else:
            outer.append(lp)
    if lanes:
        inner += [vec_cols, vec_inner]
    if row_outer is not None and _rows_innermost(sch, stmt, dominant, reduce, spatial, (row, vec), cfg,
                                                 (_extent(sch, row_outer), _extent(sch, outer[vec]))):
        outer = [lp for lp in outer if not lp.same_as(row_outer)] + [row_outer]
    sch.reorder(*outer, *reduce, *inner)
    # A long reduction with the row tiles innermost: blocks of it under the outer tiles, the row
    # tiles inside each, so a block of the vector operand stays in cache for all rows (``_k_block``).
    # The outer loops left to run in parallel then exclude the row tiles.
    blocked = None
    if lanes and len(outer) >= 2 and row_outer is not None and outer[-1].same_as(row_outer) and (
        block_k := _k_block(sch, reduce, cfg, math.prod(_extent(sch, lp) for lp in outer[:-1]))
    ):
        ko, ki = sch.split(reduce[0], factors=[None, block_k])
        sch.reorder(ko, row_outer)
        blocked = ko
        reduce = [ki, *reduce[1:]]

    attached: set[str] = set()
    consumers = sch.get_consumers(block)
    if (
        cfg.attach_epilogues
        and len(consumers) == 1
        and inner
        and not _is_reduction(sch, consumers[0])
        # Elementwise over the result (a conv's bias/BN/activation), not a broadcast back
        # over the reduced axis (softmax's exp), which no tile of this block covers.
        and _domain_size(sch.get(consumers[0])) == _domain_size(stmt, spatial_only=True)
    ):
        at = outer[-2] if blocked is not None else outer[-1]  # (blocked: after the last k block)
        sch.reverse_compute_at(consumers[0], at, preserve_unit_loops=False)
        cl = sch.get_loops(consumers[0])[len(outer) - (blocked is not None) :]
        # The epilogue must cover exactly the tile: a wider region would read accumulators
        # other tiles own and race with them on the output. s_tir does not check this.
        tile = rows * cols * max(lanes, 1) * (_extent(sch, row_outer) if blocked is not None else 1)
        extents = [_const_extent(sch, lp) for lp in cl]
        if None in extents or math.prod(extents) != tile:
            raise ScheduleRefused(f"epilogue region of {sch.get(block).name_hint} is not its tile")
        if lanes and cl and extents[-1] == cols * lanes:
            sch.vectorize(sch.split(cl[-1], factors=[None, lanes])[-1] if cols > 1 else cl[-1])
        attached.add(sch.get(consumers[0]).name_hint)

    work = _work(sch, block)
    if blocked is not None:
        outer = outer[:-1]
    pad = _plane_pad(sch, block, dominant, spatial, outer) if blocked is None else None
    if pad is not None:
        producer, k = pad
        fused = sch.fuse(*outer[:k]) if k > 1 else outer[0]
        sch.compute_at(producer, fused, preserve_unit_loops=False)
        # A row of the copy stays a loop, which LLVM vectorizes (its selects masked loads);
        # the kernel's unroll pragma would unroll a short one into scalar code.
        sch.annotate(sch.get_loops(producer)[1], "pragma_auto_unroll_max_step", 0)
        attached.add(sch.get(producer).name_hint)
    else:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if work >= cfg.parallel_min_work and _extent(sch, fused) > 1:
        sch.parallel(fused)
    sch.annotate(fused, "pragma_auto_unroll_max_step", cfg.unroll_max_step)
    sch.annotate(fused, "pragma_unroll_explicit", 1)
    if tvm_vectorize:
        sch.vectorize(vec_inner)  # before decompose_reduction: the update block alone is no reduction
    if blocked is not None:
        sch.decompose_reduction(block, blocked)
    elif reduce:
        sch.decompose_reduction(block, reduce[0])
    if tvm_vectorize and cfg.weight_panel:
        _pack_weight(sch, block, dominant, stmt, spatial[vec][1].var, cfg.weight_panel)
    return attached


def _plane_pad(sch, block, dominant, spatial, outer):
    """(padding block, k) when ``block`` is a depthwise convolution (or a pool) reading a padded
    copy of its input that this kernel writes: the copy is then made one plane at a time, inside
    the first ``k`` outer loops (the ones the window's rows and columns do not index: batch and
    channel), which become the parallel loop. Each plane is read back from L1/L2 right after it
    is written; a copy of the whole map went out to memory and came back (MobileNetV2's 96 x
    112 x 112 stride-2 depthwise conv reads 4.8 MB, and its copy was 5 MB more each way).

    One core, ``ab_revisions``: that conv 0.70x the time, a 144 x 56 x 56 stride-1 one 0.92x;
    MobileNetV2 0.97x (0.92x on two cores), PP-OCR cls 0.98x, PP-OCRv4 det 0.98x; a 3x3 max
    pool of 32 x 40 x 40 0.94x, the average pool 1.02x.
    """
    if dominant is None or len(dominant.region) < 3:
        return None
    if not all(_uses_var(dominant, iv.var) for _, iv in spatial if int(iv.dom.extent) > 1):
        return None
    producers = [b for b in sch.get_producers(block) if sch.get(b).writes[0].source.same_as(dominant.source)]
    if len(producers) != 1 or len(sch.get_consumers(producers[0])) != 1:
        return None
    pstmt = sch.get(producers[0])
    if _is_reduction(sch, producers[0]) or not _has_call(pstmt.body.value, ("if_then_else",)):
        return None
    # The leading axes that index the copy without a window (each of their indices reads one
    # element a block: batch, channel), in front of the loop order.
    taps = [iv.var for iv in sch.get(block).iter_vars if iv.iter_type == 2 and int(iv.dom.extent) > 1]
    k = 0
    for lp, iv in spatial:
        index = [r.min for r in dominant.region if _expr_uses(r.min, iv.var)]
        if any(_expr_uses(i, t) for i in index for t in taps) or not outer[k].same_as(lp):
            break
        k += 1
    # Enough planes to share among threads (else the map's rows are the parallel work).
    if k == 0 or math.prod(_extent(sch, lp) for lp in outer[:k]) < _PLANE_PAD_MIN_PLANES:
        return None
    return producers[0], k


_PLANE_PAD_MIN_PLANES = 16


def _pack_weight(sch, block, dominant, stmt, vec_var, panel: int) -> bool:
    """Read a constant matmul weight ``w[k, n]`` (the vectorized operand) in panels of ``panel``
    columns, ``[N/panel, K, panel]``: the kernel's parameter changes layout, and ``apply_default``
    passes each call the weight packed so at compile time (``_pack_weights``). Only parameters
    that every call of the kernel passes a constant qualify (``_CONSTANT_ATTR``).

    In [K, N] each step of the reduction reads a tile's columns from a row N floats away from
    the last: a new page each step, and rows a multiple of 4 KB apart (1536 floats: ViT-S/16's
    FFN) land in a few L1 sets and evict each other. In a panel the rows a tile reads follow each
    other. On 2 Xeon (Emerald Rapids) vCPUs, ViT-S/16's kernels alone: QKV 384->1152 1.06 ->
    0.94 ms, the FFN up projection with GELU 1.40 -> 1.24 ms, the down projection (in k blocks
    already) 1.33 -> 1.31 ms; in the model (``scripts/ab_revisions.py HEAD WORKTREE``) ViT-S/16
    0.915x, MiniLM-L3 0.968x, int8 MiniLM-L6 0.984x, the conv models unchanged (none packed).
    An int8 weight that the kernel dequantizes as it reads (``rewrites.int8_weights``) is packed
    the same way and stays int8: int8 MiniLM-L6 0.916x in two A/B runs (under 128 rows only, now:
    with more, ``rewrites._DEQUANTIZE_ONCE_ROWS``, the weight is dequantized in a stage first).
    """
    func = sch.mod["main"]
    free = func.attrs.get(_CONSTANT_ATTR) if func.attrs is not None else None
    buf = dominant.source if dominant is not None else None
    if not free or buf is None or len(buf.shape) != 2 or str(buf.dtype) not in ("float32", "int8", "uint8"):
        return False
    param = next((i for i, p in enumerate(func.params) if p.same_as(buf)), None)
    if param not in {int(i) for i in free}:
        return False
    k, n = (r.min for r in dominant.region)
    reduce_vars = [iv.var for iv in stmt.iter_vars if iv.iter_type == 2]
    if not (n.same_as(vec_var) and any(k.same_as(v) for v in reduce_vars)):
        return False
    cols = _const(buf.shape[1])
    if cols is None or cols % panel or cols < 2 * panel or _buffer_bytes(buf) < _PACK_MIN_BYTES:
        return False
    root = sch.get_sblock(func.body.block.name_hint)
    if sum(any(r.source.same_as(buf) for r in sch.get(b).reads) for b in sch.get_child_blocks(root)) != 1:
        return False  # (another block reads the weight as it is)
    index = next(i for i, r in enumerate(sch.get(block).reads) if r.source.same_as(buf))
    sch.transform_layout(block, ("read", index), lambda kk, nn: (nn // panel, kk, nn % panel))
    sch.annotate(block, _PACKED_BLOCK, param)
    return True


#: A weight smaller than this sits in L1 or close to it: packing it changes little.
_PACK_MIN_BYTES = 64 << 10


def _const(expr) -> int | None:
    try:
        return int(expr)
    except (TypeError, ValueError):
        return None


def _pad_vector_axis(sch, block, cfg: CpuConfig) -> bool:
    """Pad a reduction whose innermost output axis no useful vector divides (a ViT's 197 tokens,
    prime: Q·Kᵀ ran as scalars at 10 GFLOP/s) to the next multiple of the register's lanes, with
    ``pad_einsum``: zero-padded copies of the inputs, the reduction over whole vectors, and the
    valid part copied out. Einsum-shaped blocks only; anything else is left as it is."""
    stmt = sch.get(block)
    ivs = list(stmt.iter_vars)
    spatial = [i for i, iv in enumerate(ivs) if iv.iter_type == 0]
    if not spatial or not any(iv.iter_type == 2 for iv in ivs):
        return False
    ext = int(ivs[spatial[-1]].dom.extent)
    if ext < 2 * cfg.lanes or 2 * _vector_width(ext, cfg.lanes) > cfg.lanes:
        return False
    padding = [1] * len(ivs)
    padding[spatial[-1]] = cfg.lanes
    try:
        sch.pad_einsum(block, padding)
    except Exception:  # not an einsum (indices that are not plain iterators, several writes…)
        return False
    return True


def _vectorize_reduction(sch, block, spatial, reduce, cfg: CpuConfig) -> bool:
    """Vectorize a reduction along memory (a global average pool, a row sum or max, a
    matrix-vector product) with ``rfactor``: partial results in one vector of lanes, summed
    at the end. Without it each output is a serial chain of scalar adds, one add latency per
    element (PP-OCRv4 det's 80x80 mean: 0.64 -> 0.08 ms). Returns whether it applied.
    """
    import tvm

    stmt = sch.get(block)
    r_var = stmt.iter_vars[len(spatial) + len(reduce) - 1].var
    if stmt.iter_vars[-1].iter_type != 2 or not isinstance(stmt.body, tvm.tirx.BufferStore):
        return False
    update = stmt.body.value
    if not isinstance(update, (tvm.tirx.Add, tvm.tirx.Max, tvm.tirx.Min)):
        return False
    acc = update.a
    if not (isinstance(acc, tvm.ir.expr.TensorLoad) and acc.source.same_as(stmt.body.buffer)):
        return False
    dominant = _dominant_read(stmt, r_var)
    extent = _extent(sch, reduce[-1])
    lanes = _vector_width(extent, cfg.lanes)
    if dominant is None or not lanes or lanes < cfg.lanes // 2 or not _flat_unit_stride(dominant, r_var):
        return False
    _, lane_loop = sch.split(reduce[-1], factors=[None, lanes])
    rf = sch.rfactor(lane_loop, factor_axis=len(stmt.writes[0].region))
    loops = sch.get_loops(rf)
    outer = loops[: len(spatial)]
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if _work(sch, rf) >= cfg.parallel_min_work and _extent(sch, fused) > 1:
        sch.parallel(fused)
    loops = sch.get_loops(rf)
    sch.vectorize(loops[-1])
    sch.decompose_reduction(rf, loops[1])
    return True


def _rows_innermost(sch, stmt, dominant, reduce, spatial, tile_axes, cfg: CpuConfig, tiles) -> bool:
    """Whether the row tiles (output channels) should be the innermost of the outer loops.

    Row tiles outermost stream the dominant read (the activation) once per tile of output
    channels; innermost, each pixel tile's input window is read from L1 by every channel
    tile, and the weights cycle through L2 instead. That wins when the activation is larger
    than L2, the weights fit in it and each output takes a long reduction: PP-OCRv4 det's
    96->24 3x3 convs at 80x80 (2.6 MB input, 83 KB weights) went from 5.6 and 5.0 ms to 4.6
    and 4.4 ms in the model on one thread. With few input channels it lost (a 16->32 1x1
    conv at 160x160: the output is then written to many channel planes at once); from 32 it
    wins: YOLOv8n-320, whose 48->32 1x1 conv at 80x80 this changes, 21.39 -> 21.03 ms on 2 Zen 4
    cores (``scripts/ab_schedules.py --model zoo:yolov8n-320 --variant rows_inner_min_reduction=64``).
    """
    other = max(
        (r for r in stmt.reads
         if not r.source.same_as(dominant.source) and not r.source.same_as(stmt.writes[0].source)),
        key=lambda r: _buffer_bytes(r.source), default=None,
    )  # fmt: skip
    # The spatial axes other than the tile's stay outside it, so what cycles through L2 is a
    # slice of this read per value of those that index it: one sequence's 128x384 rows of a
    # batch of 8, not all 1024 (paraphrase-MiniLM-L3 at 8x128, whose 1.5 MB of activations had
    # kept the rows of its 384->1536 FFN outermost, each 4-row tile streaming the 2.4 MB
    # weight: 55.7 -> 42.6 ms, `scripts/ab_revisions.py`).
    weights = _touched_bytes(stmt, other) if other is not None else 0
    for i, (lp, iv) in enumerate(spatial):
        if weights and i not in tile_axes and _uses_var(other, iv.var):
            weights //= _extent(sch, lp)
    if _k_blocks(sch, reduce, cfg):  # what cycles through L2 is then one block's columns of it
        weights = weights * cfg.k_block // _extent(sch, reduce[0])
    streamed = _buffer_bytes(dominant.source)
    if streamed < 1 << 20 or math.prod(_extent(sch, lp) for lp in reduce) < cfg.rows_inner_min_reduction:
        return False
    if weights <= cfg.rows_inner_max_bytes:
        return True
    # Neither fits: stream the one that costs far less. Rows outermost stream the dominant read
    # once a row tile; innermost, this one once a column tile. A 1024-row matmul flattened to
    # 2-D (no batch axis to slice by): 384->1536, 256 tiles of 4 rows x 2.4 MB of weight
    # against 16 tiles of 96 columns x 1.5 MB of activations.
    row_tiles, col_tiles = tiles
    return 4 * col_tiles * weights < row_tiles * streamed


def _k_block(sch, reduce, cfg: CpuConfig, parallel: int) -> int:
    """The blocks (0: none) that a reduction with its row tiles innermost is split into along
    its outermost loop: ``cfg.k_block`` for a matmul's one loop (``_k_blocks``), and
    ``cfg.conv_k_block`` input channels, all of their taps, for a convolution's (channels,
    ky, kx) — whole blocks, at least two, and at least 4 column tiles (``parallel``) left to
    share among the threads.

    ResNet-50's 3x3 256->256 conv at 14x14 (2.4 MB of weights) ran at 72 GFLOP/s on 2 Xeon
    (Emerald Rapids) vCPUs: each tile of 4 pixels x 64 channels read its 590 KB of weights from
    L2. In blocks of 32 channels (74 KB) the pixel tiles share each block: 2.54 -> 1.20 ms
    (blocks of 8 to 128 channels: 1.20-1.29 ms). Its 1x1 convs onto 14x14 and 7x7 maps, alone:
    0.65-0.78x in blocks of 64 channels, 0.66-0.97x in blocks of 128 or 256; in the model,
    blocks of 32 ran 0.90x of blocks of 64 (each kernel alone, and the model, interleaved in one
    process)."""
    if len(reduce) == 1:
        return cfg.k_block if _k_blocks(sch, reduce, cfg) else 0
    channels = _extent(sch, reduce[0])
    b = cfg.conv_k_block
    return b if b and channels >= 2 * b and channels % b == 0 and parallel >= 4 else 0


def _k_blocks(sch, reduce, cfg: CpuConfig) -> bool:
    """Whether a reduction over ``reduce`` with its row tiles innermost goes in blocks of
    ``cfg.k_block`` (one reduction loop, at least four blocks long, whole blocks)."""
    return bool(cfg.k_block) and len(reduce) == 1 and _extent(sch, reduce[0]) >= 4 * cfg.k_block \
        and _extent(sch, reduce[0]) % cfg.k_block == 0  # fmt: skip


def _touched_bytes(stmt, region) -> int:
    """The bytes of ``region``'s buffer that ``stmt`` can read: at most the product of the
    extents of the block's axes that index it (a stride-2 1x1 conv reads a quarter of its
    input), at most the whole buffer."""
    n = math.prod(_size(iv.dom.extent) for iv in stmt.iter_vars if _uses_var(region, iv.var))
    return _element_bytes(region.source) * min(_buffer_elements(region.source), n)


def _buffer_bytes(buf) -> int:
    return _element_bytes(buf) * _buffer_elements(buf)


def _element_bytes(buf) -> int:
    return max(1, buf.dtype.bits // 8)


def _buffer_elements(buf) -> int:
    return math.prod(_size(d) for d in buf.shape)


def _size(extent) -> int:
    """A shape dimension or loop extent as an int; a symbolic one counts as large."""
    return int(extent) if _same_int(extent, extent) else 1 << 20


def _dominant_read(stmt, var):
    """The largest read that ``var`` (the innermost spatial axis) indexes: the activation of a
    convolution, the right-hand side of a matmul. None when no read uses it."""
    best, best_size = None, -1
    for r in stmt.reads:
        if r.source.same_as(stmt.writes[0].source) or not _uses_var(r, var):
            continue
        size = _buffer_elements(r.source)
        if size > best_size:
            best, best_size = r, size
    return best


def _flat_unit_stride(region, var) -> bool:
    """Whether the buffer offset ``region`` starts at is ``var`` plus terms free of it: stride 1
    along ``var`` in memory (``x[c, f // 20, f % 20]`` is, along ``f``)."""
    from tvm.sym.analyzer import Analyzer

    return _unit_stride(Analyzer().simplify(_flat_index(region)), var)


def _flat_index(region):
    """The element offset a buffer region starts at, row-major."""
    flat = 0
    for rng, dim in zip(region.region, region.source.shape):
        flat = flat * dim + rng.min
    return flat


def _uses_var(region, var) -> bool:
    return any(_expr_uses(rng.min, var) for rng in region.region)


def _unit_stride(expr, var) -> bool:
    """Whether ``expr`` is ``var`` plus terms free of it (stride 1 along ``var``)."""
    import tvm

    if expr.same_as(var):
        return True
    if isinstance(expr, (tvm.tirx.Add, tvm.tirx.Sub)):
        a_uses, b_uses = _expr_uses(expr.a, var), _expr_uses(expr.b, var)
        if a_uses and not b_uses:
            return _unit_stride(expr.a, var)
        if b_uses and not a_uses and isinstance(expr, tvm.tirx.Add):
            return _unit_stride(expr.b, var)
    return False


def _expr_uses(expr, var) -> bool:
    found = [False]

    def visit(e):
        if e.same_as(var):
            found[0] = True

    _walk(expr, visit)
    return found[0]


def _in_last_index(region, var) -> bool:
    return region is not None and _expr_uses(region.region[-1].min, var)


def _vector_width(extent: int, lanes: int) -> int:
    """The widest vector, at most one register, that divides ``extent``; 0 below 4 lanes.

    It need not be a power of two (a 10-lane vector is an 8 and a 2 to LLVM), but it must not
    exceed a register: wider vectors come out several times slower.
    """
    for d in range(min(extent, lanes), 3, -1):
        if extent % d == 0:
            return d
    return 0


def _vector_ops(width: int, lanes: int) -> int:
    """SIMD instructions LLVM needs for one ``width``-lane vector: full registers plus the
    power-of-two pieces of the remainder."""
    return max(1, width // lanes + bin(width % lanes).count("1"))


def _register_tile(row_extent: int, vectors: int, lanes: int, cfg: CpuConfig) -> tuple[int, int]:
    """Rows x vector columns of the accumulator tile: the most multiply-adds per load.

    Each step of the reduction loads one input vector per column and broadcasts one weight per
    row, then issues rows x columns FMAs: one column of 8 rows is 9 loads for 8 FMAs,
    load-bound on AVX2's 16 registers; 6 rows x 2 columns is 8 loads for 12 (PP-OCRv4 det's
    3x3 head convs: 1.8x faster). Only full-register vectors get more than one column: with a
    partial one (a 20-wide row as two 5-lane vectors) the two-column tile measured slower.
    Columns must divide their axis, rows do so where that leaves a useful tile (``_row_factor``);
    the tile must fit the accumulator registers.
    """
    ops = _vector_ops(lanes, cfg.lanes)
    best, best_score = (1, 1), 0.0
    for cols in range(1, (cfg.max_cols if lanes == cfg.lanes else 1) + 1):
        if vectors % cols:
            continue
        max_rows = min(cfg.max_rows, cfg.accumulators // (ops * cols))
        if max_rows < 1:
            break
        rows = _row_factor(row_extent, max_rows)
        score = rows * cols * ops / (rows + cols * ops)
        if score > best_score + 1e-9:
            best, best_score = (rows, cols), score
    return best


def _row_factor(extent: int, max_rows: int) -> int:
    """Rows of the register tile: the largest divisor of ``extent`` up to ``max_rows`` — unless
    that is under half of ``max_rows`` on a long axis, where a full tile with a guarded last
    one wins: a ViT's 197 tokens (prime) had one-row tiles, its matmuls ran at 103 GFLOP/s
    and with 8-row tiles (the last holding 5 rows) at 380 on 2 Zen 4 cores (ViT-S/16 137 -> 75
    ms). The guard is per tile, outside the reduction loop, so the full tiles run as before."""
    best = next((r for r in range(max_rows, 1, -1) if extent % r == 0), 1)
    if best * 2 <= max_rows and extent >= 8 * max_rows:
        return max_rows
    return best


def _domain_size(stmt, spatial_only: bool = False) -> int:
    total = 1
    for iv in stmt.iter_vars:
        if not spatial_only or iv.iter_type == 0:
            total *= int(iv.dom.extent)
    return total


def _const_extent(sch, loop) -> int | None:
    return _const(sch.get(loop).extent)


def _work(sch, block) -> int:
    return _domain_size(sch.get(block))


# -- spatial blocks ------------------------------------------------------------------------


def _schedule_spatial(sch, block, cfg: CpuConfig) -> None:
    """Parallel outer loops and a vectorized innermost loop.

    A block with a condition (padding, dilation) keeps a serial innermost loop: TVM's vectorizer
    scalarizes ``if_then_else``, while LLVM's loop vectorizer turns it into selects. So does an
    interleaving one (a pixel shuffle, see ``_interleave_phases``). Elementwise transcendental
    functions (sigmoid, exp, tanh) count as more work when deciding whether to go parallel.
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    stmt = sch.get(block)
    simple = _is_simple_store(stmt)
    conditional = simple and _has_call(stmt.body.value, ("if_then_else",))
    work = 4 * _work(sch, block)
    # Transcendentals, as calls or as a polynomial exp (rewrites.fast_sigmoid: some 100 nodes).
    if simple and (_has_call(stmt.body.value, ("exp", "sigmoid", "tanh", "erf", "log", "pow"))
                   or _expr_size(stmt.body.value) >= 48):  # fmt: skip
        work *= 8
    elif conditional:  # bounds checks and a select an element
        work *= 2
    width = _row_divisor(stmt)
    if width:  # [..., q] read as [..., q // w, q % w] -> iterate [..., q // w, q % w]
        _split_innermost_axis(sch, block, width)
        loops = sch.get_loops(block)
        stmt = sch.get(block)
    phases = 0 if conditional else _interleave_phases(sch, block)
    if phases:
        _split_innermost_axis(sch, block, phases)
        loops = sch.get_loops(block)
        sch.unroll(loops[-1])
        loops = loops[:-1]
    # A condition on the outer axes only (a concat along channels picking its source) is one
    # branch for a whole row: TVM vectorizes the row under it.
    lanes = 0 if phases or (conditional and _condition_uses_innermost(stmt)) else _vector_width(
        _extent(sch, loops[-1]), cfg.lanes)
    if lanes:
        o, v = sch.split(loops[-1], factors=[None, lanes])
        outer = list(loops[:-1]) + [o]
    elif (phases or (width and _extent(sch, loops[-1]) <= 4)) and len(loops) > 1 and _reads_of(stmt) >= 4:
        # A phase-combining block of many loads (a Winograd output transform: 9 an element) keeps
        # the loop over whole phase groups serial under the parallel ones, for LLVM's loop
        # vectorizer (its loads unit-stride, its stores interleaved). (An upsampling's one load an
        # element measured no faster so.)
        v = None
        if not phases:
            sch.unroll(loops[-1])
        outer = list(loops[:-2]) or list(loops[:-1])
    else:
        v = None
        outer = list(loops[:-1]) if len(loops) > 1 else list(loops)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if work >= cfg.parallel_min_work and _extent(sch, fused) > 1:
        sch.parallel(fused)
    if v is not None:
        sch.vectorize(v)


def _condition_uses_innermost(stmt) -> bool:
    """Whether an ``if_then_else`` of the block's value tests its innermost axis (padding's bounds
    checks, a concat along that axis) rather than only outer ones."""
    import tvm

    x = stmt.iter_vars[-1].var
    found = [False]

    def visit(e):
        if (isinstance(e, tvm.ir.Call) and "if_then_else" in str(getattr(e.op, "name", e.op))
                and _expr_uses(e.args[0], x)):  # fmt: skip
            found[0] = True

    _walk(stmt.body.value, visit)
    return found[0]


def _split_innermost_axis(sch, block, factor: int) -> None:
    """Iterate the block's innermost axis x as ``(x // factor, x % factor)``."""
    n = len(sch.get(block).iter_vars)
    sch.transform_block_layout(block, _index_map(lambda *v: [*v[: n - 1], v[n - 1] // factor, v[n - 1] % factor], n))


def _schedule_winograd_output(sch, tiles) -> set[str]:
    """A Winograd output transform (``rewrites._conv_winograd``): the output block (the epilogue
    inlined into it) parallel over images and channels, each iterating its rows, with the column
    pairs unrolled as _schedule_spatial's pixel shuffle does; the tiles stage computed under the
    parallel loop, a channel's tiles at a time (unit-stride along them, its 4 outputs unrolled so
    the 16 products are loaded once), into a buffer of 4 x tiles that stays in L1.

    Returns the blocks scheduled; none when the output is not one such block, and then the
    tiles stage is a loop nest of its own (all channels' tiles through memory: 1.05-1.09x)."""
    consumers = sch.get_consumers(tiles)
    if len(consumers) != 1:
        return set()
    out = consumers[0]
    stmt = sch.get(out)
    n = len(stmt.iter_vars)
    if n < 3 or not _is_simple_store(stmt):
        return set()
    if _extent(sch, sch.get_loops(out)[-1]) % 2 == 0:
        _split_innermost_axis(sch, out, 2)
        sch.unroll(sch.get_loops(out)[-1])
    loops = sch.get_loops(out)
    fused = sch.fuse(*loops[: n - 2]) if n > 3 else loops[0]  # images and channels (merged by a reshape: 3-D)
    sch.parallel(fused)
    sch.compute_at(tiles, fused)
    e4, p = sch.get_loops(tiles)[-2:]
    sch.unroll(e4)
    sch.reorder(p, e4)
    return {sch.get(tiles).name_hint, stmt.name_hint}


def _row_divisor(stmt) -> int:
    """w when the block's innermost axis q is read only as ``q // w`` and ``q % w`` (besides
    bounds checks) and w divides its extent: a flattened padding stage
    (``rewrites.conv2d_flat_rows``) iterated as rows x columns has no division per element."""
    import tvm

    if not _is_simple_store(stmt) or len(stmt.iter_vars) < 2:
        return 0
    x = stmt.iter_vars[-1]
    if not _same_int(x.dom.extent, x.dom.extent):
        return 0
    divisors = set()

    def visit(e):
        if isinstance(e, (tvm.tirx.FloorDiv, tvm.tirx.FloorMod)) and e.a.same_as(x.var):
            divisors.add(int(e.b.value) if isinstance(e.b, tvm.tirx.IntImm) else -1)

    _walk(stmt.body.value, visit)
    if len(divisors) != 1:
        return 0
    (w,) = divisors
    return w if 1 < w < int(x.dom.extent) and int(x.dom.extent) % w == 0 else 0


def _interleave_phases(sch, block) -> int:
    """s when the block writes its innermost axis x from s planes it reads at x // s (the
    pixel shuffle of an upsampling layer: ``y[..., 2w + b] = z[..., 2a + b, h, w]``), else 0.

    Iterated as ``(x // s, x % s)`` with the phase unrolled, each read is unit-stride and
    LLVM's loop vectorizer interleaves the stores; vectorized along x by TVM, every lane was a
    separate gather load (PP-OCRv4 det's 96 -> 24x4 shuffle: 1.09 -> 0.10 ms).
    """
    import tvm
    from tvm.sym.analyzer import Analyzer

    stmt = sch.get(block)
    ivs = list(stmt.iter_vars)
    x = ivs[-1]
    if len(stmt.writes) != 1 or not _flat_unit_stride(stmt.writes[0], x.var):
        return 0
    reads = [r for r in stmt.reads if _uses_var(r, x.var)]
    if not reads or all(_flat_unit_stride(r, x.var) for r in reads):
        return 0
    extent = int(x.dom.extent) if _same_int(x.dom.extent, x.dom.extent) else 0
    for s in (2, 4):
        if extent < 2 * s or extent % s:
            continue
        dtype = str(x.dom.extent.ty)
        xo, xi = tvm.tirx.Var("xo", dtype), tvm.tirx.Var("xi", dtype)
        ana = Analyzer()
        for iv in ivs[:-1]:
            ana.bind(iv.var, iv.dom)
        ana.bind(xo, tvm.ir.Range(tvm.tirx.const(0, dtype), tvm.tirx.const(extent // s, dtype)))
        ana.bind(xi, tvm.ir.Range(tvm.tirx.const(0, dtype), tvm.tirx.const(s, dtype)))
        ana.bind(x.var, xo * tvm.tirx.const(s, dtype) + xi)
        # (a read that only seems to use x, through a reshape's ``x // w`` for the whole row w,
        # is the same for every xo: a broadcast, no obstacle)
        flat = [ana.simplify(_flat_index(r)) for r in reads]
        if all(_unit_stride(f, xo) or not _expr_uses(f, xo) for f in flat) and any(_expr_uses(f, xo) for f in flat):
            return s
    return 0


# -- the backend ------------------------------------------------------------------------


def _has_half(model) -> bool:
    """Whether any tensor of the model is float16 or bfloat16 (no copy of the model needed if not)."""
    half = (10, 16)  # TensorProto.FLOAT16, BFLOAT16
    g = model.graph
    return any(t.data_type in half for t in g.initializer) or any(
        vi.type.tensor_type.elem_type in half for vi in [*g.input, *g.value_info, *g.output])  # fmt: skip


def _half_softmax(node, types) -> bool:
    """A Softmax or Attention on float16 / bfloat16 data."""
    t = types.get(node.input[0]) if node.input else None
    return node.op_type in ("Softmax", "Attention") and node.domain in ("", "ai.onnx") and t is not None \
        and t.HasField("tensor_type") and t.tensor_type.elem_type in (10, 16)  # fmt: skip


class CpuBackend(Backend):
    """CPUs through LLVM: heuristic default schedules (``apply_default``), MetaSchedule tuning
    measured on this machine (or on the device over RPC), the library linked for the profile."""

    name = "cpu"
    cpu = True

    def optimize(self, mod, profile: TargetProfile, database=None, precision: str = "fp32"):
        """As ``Backend.optimize``; with a tuning database, the kernels fused both with and without
        BatchNorm folded into the convolutions' weights, and the fusion whose kernels the
        database schedules more of is built (a log tuned on unfolded kernels keeps its records)."""
        from .. import build

        if database is None:
            return super().optimize(mod, profile, database, precision)
        best = None
        # (a log tuned before scalars_folded, before divide_by_constant too, or before conv_affine_folded too)
        for folded, reciprocal, scalars in ((True, True, True), (True, True, False), (True, False, False), (False, False, False)):
            fused = self.fuse(mod, profile, precision, self.rewrites(profile, affine_folded=folded, reciprocal=reciprocal,
                                                                     scalars_folded=scalars))  # fmt: skip
            fused = build.apply_database(fused, profile, database)
            tuned = sum(1 for f in fused.functions.values() if f.attrs is not None and bool(f.attrs.get(build.TUNED_ATTR, False)))
            if best is None or tuned > best[0]:
                best = (tuned, fused)
        return self.schedule(best[1], profile)

    def rewrites(self, profile: TargetProfile, affine_folded: bool = True, reciprocal: bool = True,
                 scalars_folded: bool = True) -> list:
        """Patch-embedding convolutions as matmuls (``rewrites.patch_conv_as_matmul``), and
        exp, erf, tanh and softmax as TVM's fast polynomial forms, which vectorize (LLVM has
        no vector exp or erf: each element was a libm call). paraphrase-MiniLM-L3 at seq 128 on 2
        Zen 4 cores: the softmax kernels 0.72 -> 0.22 ms, the GELU'd FFN matmul 2.38 -> 1.10 ms,
        the model 6.0 -> 4.2 ms (onnxruntime 5.3). Measured over [-100, 100] against float64:
        exp within 4.1e-6 relative (0 below -88, inf from 88.38 where float32 overflows at
        88.72), erf within 4.2e-7 and tanh within 3.2e-7 absolute. 3x3 stride-1 convolutions of
        32 channels or more as Winograd's F(2x2, 3x3) (``rewrites.conv_winograd``). First,
        BatchNorm's per-channel subtract, divide, multiply and add fold into the convolutions'
        weights and bias (``rewrites.conv_affine_folded``, as onnxruntime does): 4 operations an
        output element fewer, a division among them (`scripts/ab_revisions.py`, untuned: PP-OCR
        cls 0.962x and 0.979x in two runs, PP-OCRv4-rec-shaped 0.967x). ``affine_folded=False``
        leaves that arithmetic in the convolutions' epilogues, as the kernels of tuning logs
        recorded before the folding have it. Last, a division by a constant is a multiply by its
        reciprocal (``rewrites.divide_by_constant``; ``reciprocal=False``: as logs recorded
        before it have it): PP-OCRv4 det fp32 0.988x (``scripts/ab_revisions.py``,
        x86-64-avx512-vnni); det int8, with its requantizes also by a reciprocal
        (``rewrites.qparams_as_tensors``), 0.930x and 0.936x (0.996x while the machine ran at
        half its speed)."""
        from tvm import relax

        from ..channels_last import channels_last
        from ..fused_attention import attention_fused
        from ..rewrites import (conv_affine_folded, conv_taps_in_bounds, conv_winograd, divide_by_constant, fake_quant_fused,
                                matmul_weights_padded_to, patch_conv_as_matmul, permutes_collapsed, qparams_as_tensors,
                                softmax_padded_to, softmax_rows)  # fmt: skip
        from ..rewrites import scalars_folded as fold_scalars  # (the flag of the same name)

        lanes = cpu_config(profile.tvm()).lanes
        return [*([conv_affine_folded()] if affine_folded else []), attention_fused(lanes), permutes_collapsed(), relax.transform.DeadCodeElimination(),
                matmul_weights_padded_to(lanes), softmax_padded_to(lanes), softmax_rows(lanes), relax.transform.FastMathTransform(),
                conv_taps_in_bounds(), conv_winograd(lanes), channels_last(lanes), patch_conv_as_matmul(), fake_quant_fused(),
                *([divide_by_constant()] if reciprocal else []),
                # (on the divisions as multiplies and the quantizes still Relax ops; the dead
                # bindings out first, as they count as uses, and those the folding left after)
                *([relax.transform.DeadCodeElimination(), fold_scalars(), relax.transform.DeadCodeElimination()]
                  if scalars_folded else []),
                qparams_as_tensors()]  # fmt: skip

    def prepare(self, imported, profile: TargetProfile):
        """float16 nodes compute in float32 where the CPU has no fp16 arithmetic (``--precision``
        fp16 not in the profile's precisions): ``legalize.fp16_in_fp32``."""
        import dataclasses

        from ..expand import expand_functions
        from ..importer import _copy, _infer, settle, supported_op_types
        from ..legalize import fp16_in_fp32
        from ...targets import precisions

        if "fp16" in precisions(profile) or not _has_half(imported.model):
            return imported
        # An fp16 Softmax or Attention rounds each step to fp16 (its function body's ops: the
        # exponentials, their sum, the scaled Q and K, the scores), as ONNX's reference and a
        # device with fp16 arithmetic do; computed whole in fp32 it differs by an fp16 ulp.
        model = expand_functions(_copy(imported.model), supported_op_types(), _infer, also=_half_softmax)
        if model.graph.node != imported.model.graph.node:  # (its shape arithmetic folded, as at import)
            model = settle(model)
        if not fp16_in_fp32(model):
            return imported
        return dataclasses.replace(imported, model=_infer(model))

    def legalizations(self, profile: TargetProfile) -> dict:
        """LayerNorm over the last axis as a row-parallel, vectorized kernel
        (``rewrites.layer_norm_rows``); max pools with a horizontal stride one output row a task
        (``rewrites.max_pool_rows``); sigmoid from TVM's polynomial exp (``rewrites.fast_sigmoid``:
        LLVM calls libm's expf once a lane otherwise)."""
        from ..rewrites import conv2d_flat_rows, fast_sigmoid, layer_norm_rows, max_pool_rows

        lanes = cpu_config(profile.tvm()).lanes
        return {"relax.nn.layer_norm": layer_norm_rows(lanes), "relax.sigmoid": fast_sigmoid,
                "relax.nn.conv2d": conv2d_flat_rows(lanes), "relax.nn.max_pool2d": max_pool_rows}  # fmt: skip

    keeps_int8_weights = True

    def before_folding(self, profile: TargetProfile) -> list:
        """int8 weights stay int8 in the library, dequantized in the kernels that read them
        (``rewrites.int8_weights``); with an int8 dot product (AVX-512 VNNI, AVX2's vpmaddwd, Arm's dotprod) a
        quantized convolution or matmul of a quantized activation computes in int8 (``int8.int8_compute``)."""
        from .. import int8
        from ..rewrites import int8_weights

        isa = int8.isa_of(profile.tvm())
        return [*([int8.int8_compute(isa)] if isa else []), int8_weights()]

    def builds_differently(self, profile: TargetProfile, model) -> bool:
        """An int8 profile (one whose int8 dot product is its reason to be: VNNI, AVX-VNNI) only
        for a model with quantized convolutions or matmuls (``int8.quantized_compute``): for others
        its build is the plain one's."""
        from .. import int8

        isa = int8.isa_of(profile.tvm())
        return isa is None or not isa.own_level or int8.quantized_compute(model)

    def schedule(self, mod, profile: TargetProfile):
        return apply_default(mod, profile)

    def check_tunable(self, profile: TargetProfile, remote: bool) -> None:
        if not remote:
            hostcpu.check_tuning_target(profile.to_dict(), None)  # qemu timings would mean nothing
