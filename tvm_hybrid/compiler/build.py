"""Relax pipeline and TVM build for one target profile."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from ..errors import UnsupportedError, UsageError
from ..targets import TargetProfile

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildResult:
    """What a build produced: the exported library and facts for the manifest."""

    library: Path
    tuned_kernels: int = 0
    default_kernels: int = 0


def optimize(mod, profile: TargetProfile, database=None):
    """The Relax passes every build runs, ending with fused TIR kernels (the tuning granularity).

    The ONNX importer leaves composite ops (batch_norm, layer_norm, gelu…) that only
    ``DecomposeOpsForInference`` turns into legalizable primitives; without it, an op with no
    legalization reaches VM codegen and fails with "CodeGenVM cannot emit this Relax operator".
    Running decomposition *before* ``LegalizeOps``, and folding constants on both sides of it,
    is what lets real exported models (BN-folded detectors, SiLU/HardSwish chains) build.
    """
    import tvm
    from tvm import relax

    target = profile.tvm()
    seq = tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.FoldConstant(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    with target:
        mod = seq(mod)
    _check_legalized(mod)
    if database is not None:
        # Tuned kernels first; apply_default leaves functions already scheduled alone.
        from tvm.s_tir import meta_schedule as ms

        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    from .schedules import apply_default

    return apply_default(mod, profile)


def kernel_counts(mod) -> tuple[int, int]:
    """(tuned, default): PrimFuncs scheduled from a tuning database, and the rest."""
    import tvm

    tuned = default = 0
    for _, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            if f.attrs is not None and "tvm_hybrid.tuned" in f.attrs:
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


def build(mod, profile: TargetProfile, out_lib: Path) -> BuildResult:
    """Compile an optimized Relax module for the profile and export it as a shared library."""
    import tvm

    target = profile.tvm()
    with target:
        ex = tvm.compile(mod, target=target)
    fcompile = _fcompile(profile)
    out_lib.parent.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out_lib), fcompile=fcompile)
    tuned, default = kernel_counts(mod)
    return BuildResult(library=out_lib, tuned_kernels=tuned, default_kernels=default)


def check_toolchain(profile: TargetProfile) -> None:
    """UsageError, saying how to install it, when the compiler the profile links with is missing."""
    _fcompile(profile)


def _fcompile(profile: TargetProfile):
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
