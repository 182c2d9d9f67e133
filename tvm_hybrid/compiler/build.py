"""The Relax pipeline every backend shares: legalize and fuse, apply a tuning database, count
kernels, link. Backends (compiler/backends/) schedule and build on top of it."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from ..errors import UnsupportedError, UsageError
from ..targets import TargetProfile

log = logging.getLogger(__name__)

#: The attribute a kernel scheduled from a tuning record carries (counted as "tuned" in manifests).
TUNED_ATTR = "tvm_hybrid.tuned"


@dataclasses.dataclass
class BuildResult:
    """What a build produced: the exported library and facts for the manifest."""

    library: Path
    tuned_kernels: int = 0
    default_kernels: int = 0
    device_code: dict | None = None  # GPU targets: what the library holds (arch, SASS, PTX)


def fuse(mod, profile: TargetProfile, rewrites=(), before_folding=(), precision: str = "fp32", legalizations=None,
         max_buffers: int | None = None):
    """Legalize and fuse a Relax module into fused TIR kernels: what tuning extracts tasks from.

    The ONNX importer leaves composite ops (batch_norm, layer_norm, gelu…) that only
    ``DecomposeOpsForInference`` turns into legalizable primitives; without it, an op with no
    legalization reaches VM codegen and fails with "CodeGenVM cannot emit this Relax operator".
    Running decomposition *before* ``LegalizeOps``, and folding constants on both sides of it,
    is what lets real exported models (BN-folded detectors, SiLU/HardSwish chains) build.
    ``rewrites`` are the backend's Relax passes before legalization (``Backend.rewrites``);
    ``before_folding`` its passes that must see the graph before any constant is folded
    (``Backend.before_folding``: int8 weights kept int8); ``legalizations`` its kernels for some
    Relax ops in place of TVM's (``Backend.legalizations``). ``max_buffers``: the most buffers a
    kernel may bind (WebGPU's per-kernel limit; ``rewrites.concat_within``, ``kernels_within``).
    ``precision`` "fp16":
    ``rewrites.fp16_operands`` (convolutions and matmuls read fp16, accumulate in fp32).
    Tuning and building must both start from this module (``Backend.fuse``): database records
    are keyed by the kernels' TIR, so any pass difference means no record matches.
    """
    import tvm
    from tvm import relax

    from .rewrites import (concat_within, conv_transpose_as_conv, fp16_operands, kernels_within,
                           legalize_overrides, split_of_concat)  # fmt: skip

    target = profile.tvm()
    seq = tvm.transform.Sequential(
        [
            *before_folding,
            relax.transform.DecomposeOpsForInference(),
            # Before legalization: TVM's conv2d_transpose kernel convolves over a zero-dilated
            # input; stride == kernel upsampling becomes a 1x1 conv + pixel shuffle (4x less work).
            conv_transpose_as_conv(),
            # A split that undoes a concat's sections (YOLO heads) takes the pieces directly.
            split_of_concat(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.FoldConstant(),
            *([fp16_operands(), relax.transform.FoldConstant()] if precision == "fp16" else []),
            *rewrites,
            *([concat_within(max_buffers)] if max_buffers else []),
            relax.transform.LegalizeOps({**legalize_overrides(), **(legalizations or {})}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            *([kernels_within(max_buffers)] if max_buffers else []),
            relax.transform.FuseTIR(),
            relax.transform.RewriteDataflowReshape(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    with target:
        mod = seq(mod)
    _check_legalized(mod)
    return mod


def apply_database(mod, profile: TargetProfile, database):
    """Schedule the kernels a tuning database has records for; mark them ``tvm_hybrid.tuned``.

    ``database`` is a MetaSchedule database, or a ``tuning_log.TuningLog`` that also knows each
    kernel's default-schedule time as measured when tuning: a tuned record slower than that
    is not applied, nor one that the log's in-model check timed slower in place in the model
    (``tune.check_in_model``), so a log does not make a build slower than the defaults (a
    short tuning run often finds nothing better). A verdict taken on another CPU model than
    this machine's, for a target this machine runs, does not hold: that record is not applied
    until a ``tune`` run checks it here (``TuningLog.checked_elsewhere``). ``MetaScheduleApplyDatabase`` sets ``tirx.is_scheduled``
    on each kernel it replaces; the ones that gain it here are the tuned ones.
    """
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    db = getattr(database, "database", database)
    default_ms = getattr(database, "default_ms", None) or {}
    slower_in_model = getattr(database, "slower_in_model", None)
    checked_elsewhere = getattr(database, "checked_elsewhere", None)
    elsewhere: dict[str, int] = {}

    def scheduled(f) -> bool:
        return f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))

    before = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and not scheduled(f)}
    target = profile.tvm()
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    kept = 0
    for gv, f in list(mod.functions.items()):
        if gv not in before or not isinstance(f, tvm.tirx.PrimFunc) or not scheduled(f):
            continue
        workload = _normalize_mod(before[gv])
        key = tvm_ffi.structural_hash(workload)
        default = default_ms.get(key)
        if default is not None or slower_in_model is not None:
            record = db.query_tuning_record(workload, target, gv.name_hint)
            tuned = median_ms(record.run_secs) if record is not None and record.run_secs else None
            slower_alone = default is not None and (tuned is None or tuned >= default)
            if slower_alone or (tuned is not None and slower_in_model is not None and slower_in_model(key, tuned)):
                mod[gv] = before[gv]  # the default schedule was faster when measured (alone or in the model)
                kept += 1
                continue
        cpu = checked_elsewhere(key) if checked_elsewhere is not None else ""
        if cpu:  # its in-model verdict is about another CPU model: not applied until checked here
            mod[gv] = before[gv]
            elsewhere[cpu] = elsewhere.get(cpu, 0) + 1
            continue
        mod[gv] = f.with_attr(TUNED_ATTR, True)
    if kept:
        log.debug("%d tuned kernels were slower than their default schedule; kept the default", kept)
    for cpu, n in elsewhere.items():
        log.warning("%d tuned kernels were checked in the model on another CPU (%s), not on this one (%s): "
                    "they keep their default schedules until `tvm-hybrid tune` checks them here",
                    n, cpu, database.local_cpu)  # fmt: skip
    return mod


def lift_weights(mod, min_bytes: int = 4096):
    """(module, arrays): the constants of ``main`` of at least ``min_bytes`` become parameters after
    its inputs, in the order of ``arrays``, so builds of one segment for several CPU levels can
    share one weights file instead of each library embedding its own copy."""
    import numpy as np
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Lift(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.params, self.arrays, self.seen = [], [], {}

        def visit_generic_const_(self, c):
            arr = c.value
            if int(np.prod([int(d) for d in arr.shape])) * np.dtype(str(arr.dtype)).itemsize < min_bytes:
                return c
            key = c.__chandle__()
            if key not in self.seen:
                self.seen[key] = relax.Var(f"weight{len(self.params)}", c.ty)
                self.params.append(self.seen[key])
                self.arrays.append(arr.numpy())
            return self.seen[key]

    func = mod["main"]
    lift = Lift(mod)
    body = lift.visit_expr(func.body)
    out = mod.clone() if hasattr(mod, "clone") else mod
    out["main"] = relax.Function(list(func.params) + lift.params, body, func.ret_ty, func.is_pure, func.attrs)
    return out, lift.arrays


def median_ms(run_secs) -> float:
    """The median of MetaSchedule run times (seconds), in milliseconds."""
    vals = sorted(float(v) for v in run_secs)
    n = len(vals)
    return 1e3 * (vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2)


def kernel_counts(mod) -> tuple[int, int]:
    """(tuned, default): PrimFuncs scheduled from a tuning database, and the rest."""
    import tvm

    tuned = default = 0
    for _, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            if f.attrs is not None and TUNED_ATTR in f.attrs:
                tuned += 1
            else:
                default += 1
    return tuned, default


def _check_legalized(mod) -> None:
    """Name every Relax op that no pass turned into a kernel, before VM codegen trips on it."""
    from tvm import relax

    left: set[str] = set()
    # Ops the VM runs itself (builtins), not kernels.
    vm_ops = {"relax.call_tir", "relax.call_dps_packed", "relax.call_pure_packed", "relax.call_packed",
              "relax.null_value", "relax.shape_of", "relax.reshape", "relax.print", "relax.assert_op",
              "relax.builtin.alloc_tensor", "relax.memory.alloc_storage", "relax.memory.alloc_tensor",
              "relax.memory.kill_storage", "relax.memory.kill_tensor", "relax.call_builtin_with_ctx",
              "relax.invoke_closure", "relax.invoke_pure_closure", "relax.hint_on_device",
              "relax.to_vdevice", "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.make_closure"}  # fmt: skip

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            if expr.op.name not in vm_ops:
                left.add(expr.op.name)

    import tvm

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    if left:
        raise UnsupportedError(
            f"no kernel for Relax ops: {', '.join(sorted(left))} (TVM {tvm.__version__} cannot legalize them)"
        )


def linker(profile: TargetProfile):
    """The C++ compiler export_library links with: the host's, or the profile's cross compiler."""
    from tvm.support import cc

    name = profile.toolchain.get("cc") or ""
    if not name:
        if shutil.which("g++") is None and shutil.which("c++") is None:
            raise UsageError(
                "no C++ compiler to link the artifact; install one: "
                + (profile.toolchain.get("install") or "apt-get install -y g++")
            )
        return None
    if shutil.which(name) is None:
        raise UsageError(
            f"target {profile.name} needs the cross compiler {name}, which is not on PATH; install it: "
            + (profile.toolchain.get("install") or f"(see {profile.source})")
        )
    return cc.cross_compiler(name)


def kernel_context():
    """The PassContext kernels are compiled in: without TIR's argument asserts.

    A kernel's packed-function wrapper checks every argument's device, dtype, rank, shape,
    strides and offset, each with its own error message. In an artifact only the Relax VM calls
    the kernels, with tensors whose shapes and dtypes the VM allocated or checked on entry
    (``match_cast`` of the inputs), so the checks never fire there, and they were 90 % of the
    code: 6.7 KB a kernel, 0.56 of PP-OCR cls int8's 0.60 MB of ``.text``. The shape
    variables a wrapper reads are kept; only the assertions go.
    """
    import tvm

    cur = tvm.transform.PassContext.current()
    config = dict(cur.config)
    config["tirx.disable_assert"] = True
    return tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass),
                                     disabled_pass=list(cur.disabled_pass), instruments=list(cur.instruments),
                                     config=config)
