"""Compiler backends: one module per kind of code a target compiles to, one object each.

A target profile names its backend (``backend = "cpu"`` in its TOML; a profile that names none
gets the one for its TVM target kind: llvm → cpu, cuda → cuda, webgpu → webgpu), and
``for_profile`` looks it up in ``BACKENDS`` (a typo gets a did-you-mean), the way the runtime's
executor table maps segment formats to executors. Every backend answers the same questions, so
analysis, package, build and tune ask it instead of branching on the target:

- ``prepare(imported, profile)``: the imported model as this backend compiles it (once a target);
- ``rejected_nodes(imported, profile)``: the ONNX nodes it cannot run, and why — the planner sends
  them to the cloud; with no cloud, ``check_supported`` names them (exit 3);
- ``check_segment(imported, profile)``: a last guard before a segment is built;
- ``check_toolchain(profile)``: a missing compiler or linker fails before any work;
- ``schedule(mod, profile)``: default schedules for the kernels no tuning record scheduled
  (``optimize`` = the shared Relax pipeline, the tuning log's records, then this);
- ``build_segment(mod, profile, root, stem)``: the segment's files under ``root/segments/``, in
  the backend's segment ``format`` (the runtime's executor table reads the same names);
- tuning: ``check_tunable(profile, remote)``, ``compile_context(profile)`` (how TVM's codegen runs
  for it: nvcc for CUDA), ``device`` (the TVM device its kernels run on) and ``cpu`` (CPU
  kernels: MetaSchedule gets the core count, timings flush the caches, and tuned records are
  checked in place in the model).

A new kind of target is a new module here with a ``Backend`` subclass, added to ``BACKENDS``.
"""

from __future__ import annotations

import difflib

from ...errors import UsageError
from ...targets import TargetProfile
from .base import Backend, CompiledSegment, Rejected
from .cpu import CpuBackend
from .cuda import CudaBackend
from .webgpu import WebGPUBackend

__all__ = ["BACKENDS", "Backend", "CompiledSegment", "Rejected", "for_profile", "get"]

#: Every backend, by the name profiles give (``backend = "cpu"``).
BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (CpuBackend, CudaBackend, WebGPUBackend)}
#: A profile without ``backend`` gets the one for its TVM target kind.
BY_TVM_KIND = {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "webgpu": "webgpu"}
_instances: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The backend called ``name``; UsageError with a did-you-mean for an unknown one."""
    table = BACKENDS
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"no compiler backend {name[:40]!r} (there are {', '.join(sorted(table))}){hint}")
    if name not in _instances:
        _instances[name] = table[name]()
    return _instances[name]


def for_profile(profile: TargetProfile) -> Backend:
    """The backend a profile compiles with."""
    name = profile.backend or BY_TVM_KIND.get(str(profile.tvm_target.get("kind")), "")
    if not name:
        raise UsageError(
            f"target {profile.name} ({profile.source}) compiles for TVM target kind "
            f"{profile.tvm_target.get('kind')!r}, which no backend handles; set backend = one of "
            + ", ".join(sorted(BACKENDS))
        )
    try:
        return get(name)
    except UsageError as e:
        raise UsageError(f"target {profile.name} ({profile.source}): {e}") from None
