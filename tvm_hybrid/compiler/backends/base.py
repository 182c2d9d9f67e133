"""The interface every compiler backend implements (see backends/__init__.py), with the defaults
of a backend that builds a TVM VM library."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import ClassVar

from ...errors import UnsupportedError
from ...manifest import FORMAT_TVM_VM
from ...targets import TargetProfile
from .. import build
from ..importer import ImportedModel, node_name, supported_op_types, tensor_dtypes


@dataclasses.dataclass(frozen=True)
class Rejected:
    """One ONNX node the target cannot run, and why."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node} ({self.reason})"


@dataclasses.dataclass
class CompiledSegment:
    """One segment built for one profile: its main file, every file it needs, its format."""

    result: build.BuildResult
    format: str
    library: str
    files: list[str]
    #: The keys of the weights its ``main`` takes after the inputs (package.WeightStore), if lifted.
    weight_keys: list[str] | None = None


class Backend:
    """The questions every backend answers; the defaults are a TVM VM library's."""

    name: ClassVar[str]
    #: The segment format it writes (the runtime's executor table is keyed by it).
    format: ClassVar[str] = FORMAT_TVM_VM
    #: The TVM device type its kernels run on.
    device: ClassVar[str] = "cpu"
    #: CPU kernels (LLVM): tuning gives MetaSchedule the core count, flushes the caches between
    #: timed runs, and checks records in place in the model.
    cpu: ClassVar[bool] = False
    #: MetaSchedule can tune it.
    tunable: ClassVar[bool] = True

    def prepare(self, imported: ImportedModel, profile: TargetProfile) -> ImportedModel:
        """The model as this backend compiles it: here, recurrences unrolled (the fused LSTM
        kernel is a CPU one)."""
        from ..importer import unroll_recurrences

        return unroll_recurrences(imported)

    def rejected_nodes(self, imported: ImportedModel, profile: TargetProfile | None) -> list[Rejected]:
        """Nodes TVM's frontend cannot convert, op types the profile lists as unsupported, and
        nodes touching a dtype the profile does not list (``capacity.dtypes``)."""
        supported = supported_op_types()
        capacity = profile.capacity if profile is not None else {}
        banned = set(capacity.get("unsupported_ops", []))
        dtypes = set(capacity.get("dtypes", []))
        types = tensor_dtypes(imported) if dtypes else {}
        out = []
        for i, node in enumerate(imported.model.graph.node):
            name = node_name(node, i)
            if node.op_type not in supported:
                out.append(Rejected(name, node.op_type, "TVM's ONNX frontend cannot convert it"))
            elif node.op_type in banned:
                out.append(Rejected(name, node.op_type, f"unsupported on {profile.name}"))
            elif dtypes:
                bad = {types[x] for x in [*node.input, *node.output] if x in types and types[x] not in dtypes}
                if bad:
                    out.append(Rejected(name, node.op_type, f"{'/'.join(sorted(bad))} data"))
        return out

    def check_supported(self, imported: ImportedModel, profile: TargetProfile) -> None:
        """UnsupportedError naming the op types this target cannot run (when there is no cloud)."""
        why: dict[str, set[str]] = {}
        for r in self.rejected_nodes(imported, profile):
            why.setdefault(r.op_type, set()).add(r.reason)
        if why:
            raise UnsupportedError(f"unsupported ops for target {profile.name}: "
                                   + ", ".join(f"{op} ({'; '.join(sorted(rs))})" for op, rs in sorted(why.items())))  # fmt: skip

    def check_segment(self, imported: ImportedModel, profile: TargetProfile) -> None:
        """Refuse a segment this backend cannot build, naming its nodes, before TVM fails on it
        obscurely (the plan keeps rejected nodes off the device; this is the last guard)."""
        return None

    def check_toolchain(self, profile: TargetProfile) -> None:
        """UsageError, saying how to install it, when the compiler the profile links with is missing."""
        build.linker(profile)

    def schedule(self, mod, profile: TargetProfile):
        """Default schedules for every kernel not yet scheduled."""
        return mod

    def rewrites(self, profile: TargetProfile) -> list:
        """Relax passes this backend runs before legalization (part of ``fuse``)."""
        return []

    #: Whether ``before_folding`` keeps int8 weights int8 (the plan counts them at their size).
    keeps_int8_weights = False

    def before_folding(self, profile: TargetProfile) -> list:
        """Relax passes this backend runs before any constant folding (part of ``fuse``)."""
        return []

    def builds_differently(self, profile: TargetProfile, model) -> bool:
        """Whether a build of ``model`` for ``profile``, a profile another one dispatches to, can
        differ in more than its CPU level: a profile whose only difference is int8 arithmetic
        is left out of a portable artifact when the model has no int8 compute."""
        return True

    def legalizations(self, profile: TargetProfile) -> dict:
        """Relax op name -> legalization this backend uses instead of TVM's (part of ``fuse``)."""
        return {}

    def fuse(self, mod, profile: TargetProfile, precision: str = "fp32", rewrites: list | None = None):
        """Legalized, fused TIR kernels: what tuning extracts tasks from and builds start from.
        ``rewrites`` replaces the backend's ``rewrites(profile)``."""
        rewrites = self.rewrites(profile) if rewrites is None else rewrites
        return build.fuse(mod, profile, rewrites, self.before_folding(profile), precision,
                          self.legalizations(profile), self.max_kernel_buffers(profile))  # fmt: skip

    def max_kernel_buffers(self, profile: TargetProfile) -> int | None:
        """The most buffers one kernel may bind on this profile (None: no limit to plan for)."""
        return None

    def optimize(self, mod, profile: TargetProfile, database=None, precision: str = "fp32"):
        """The Relax passes every build runs, ending with scheduled TIR kernels.

        ``fuse`` makes the fused kernels (the tuning granularity); a tuning ``database``
        (a MetaSchedule database, or a ``tuning_log.TuningLog``) then schedules the kernels it
        has records for, and ``schedule`` takes the rest.
        """
        mod = self.fuse(mod, profile, precision)
        if database is not None:
            mod = build.apply_database(mod, profile, database)
        return self.schedule(mod, profile)

    def compile_context(self, profile: TargetProfile):
        """A context ``tvm.compile`` runs in for this backend; it yields a job for
        ``verify_library`` (or None)."""
        return contextlib.nullcontext()

    def verify_library(self, library: Path, job, profile: TargetProfile) -> dict | None:
        """Check an exported library; facts for the manifest's ``device_code``, or None."""
        return None

    def build_segment(self, mod, profile: TargetProfile, root: Path, stem: str) -> CompiledSegment:
        """Compile an optimized module into ``root/segments/<stem>.so`` for the TVM VM."""
        lib = f"segments/{stem}.so"
        return CompiledSegment(self.build_library(mod, profile, root / lib), self.format, lib, [lib])

    def build_library(self, mod, profile: TargetProfile, out_lib: Path) -> build.BuildResult:
        """Compile an optimized module and export it as a shared library the TVM VM loads."""
        import tvm

        target = profile.tvm()
        fcompile = build.linker(profile)
        with self.compile_context(profile) as job, target, build.kernel_context():
            ex = tvm.compile(mod, target=target)
        out_lib.parent.mkdir(parents=True, exist_ok=True)
        # Without debug sections: DWARF for generated kernels names no source a user has, and was
        # a third of an int8 library (PP-OCRv4 det int8: 3.1 -> 2.0 MiB; fp32: 5.4 -> 4.9 MiB).
        # Nor the static symbol table: the VM finds the kernels and the module blob through the
        # dynamic one (det int8 for x86-64-avx512-vnni: 1,607,480 -> 1,591,192 bytes).
        ex.export_library(str(out_lib), fcompile=fcompile, options=["-Wl,--strip-all"])
        device_code = self.verify_library(out_lib, job, profile) if job is not None else None
        tuned, default = build.kernel_counts(mod)
        return build.BuildResult(out_lib, tuned, default, device_code)

    def check_tunable(self, profile: TargetProfile, remote: bool) -> None:
        """UnsupportedError when this machine cannot measure the profile's kernels (``remote``:
        an RPC tracker measures them on the device)."""
        if not self.tunable:
            raise UnsupportedError(
                f"tuning {profile.name} ({self.name}) is not supported: MetaSchedule tuning covers CPU (llvm) "
                "and CUDA targets; compile uses the default schedules"
            )

