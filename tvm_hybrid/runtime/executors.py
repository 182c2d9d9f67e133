"""Device executors, one per segment format, in a table; each is imported only when used."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ArtifactError, RuntimeFailure, one_line
from ..manifest import FORMAT_TVM_VM, FORMAT_WGSL_PLAN, Segment
from ._tvm import tvm_runtime
from .threads import resolve as resolve_threads
from .threads import use as use_threads


class TVMVMExecutor:
    """A segment compiled by TVM Relax into a shared library run by the Relax VM."""

    def __init__(self, root: Path, segment: Segment, target: dict[str, Any], device: str | None,
                 threads: int | None = None):
        from ..hostcpu import check_native, pick_variant

        variant = pick_variant(segment.variants)
        #: The profile whose build runs: one of the segment's dispatch variants, or the artifact's.
        self.build = variant["profile"] if variant else target.get("name")
        if variant:  # the build for this CPU's level (AVX2, AVX-512) of a portable artifact
            segment = dataclasses.replace(segment, library=variant["library"])
            target = {**target, "name": variant["profile"], "tvm_target": variant["tvm_target"], "tvm_host": None}
        check_native(target, f"artifact segment {segment.library}")  # before dlopen fails obscurely
        tvm = tvm_runtime()
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        lib_path = root / segment.library
        self.device = _device(tvm, target, device, segment)
        self.device_name = str(self.device)
        try:
            lib = tvm.runtime.load_module(str(_loadable(lib_path)))
            self._vm = VirtualMachine(lib, self.device)
            self._main = self._vm["main"]
        except Exception as e:
            raise RuntimeFailure(
                f"cannot load {segment.library} on {self.device_name}: {one_line(e, last=True)}; "
                "was it compiled for this machine's architecture?"
            ) from e
        self._weights = []
        if segment.weights is not None:  # kept out of the libraries: loaded once, passed to every call
            keys = variant["weights"] if variant else segment.weights["keys"]
            with np.load(root / segment.weights["file"], allow_pickle=False) as z:
                self._weights = [tvm.runtime.tensor(z[k], self.device) for k in keys]
        self._n_out = len(segment.outputs)
        #: Workers of TVM's thread pool for this executor's calls (threads.resolve's default).
        self.threads = threads if threads is not None else resolve_threads(None)
        self.threads_used: int | None = None  # what the pool ran with in the last call

    def run(self, args: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        self.threads_used = use_threads(self.threads)  # the pool is per calling thread
        out = self._main(*[tvm.runtime.tensor(a, self.device) for a in args], *self._weights)
        if self._n_out == 1 and hasattr(out, "numpy"):
            return [out.numpy()]
        return [o.numpy() for o in out]


#: Libraries this process has loaded: path -> the file's identity then (device, inode, size, mtime).
_LOADED: dict[str, tuple] = {}
_COPIES: list = []  # temporary directories holding fresh copies (removed at exit)


def _loadable(path: Path) -> Path:
    """``path``, or a fresh copy of it when this process already loaded another file from that
    path: the dynamic loader hands back a library it has by name, so an artifact recompiled or
    updated in place would otherwise run its old code."""
    import os
    import shutil
    import tempfile

    key = os.path.realpath(path)
    st = os.stat(key)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    seen = _LOADED.setdefault(key, ident)
    if seen == ident:
        return path
    if not _COPIES:
        import atexit

        _COPIES.append(tempfile.mkdtemp(prefix="tvm-hybrid-libs-"))
        atexit.register(shutil.rmtree, _COPIES[0], True)
    copy = Path(_COPIES[0]) / f"{st.st_ino}-{st.st_mtime_ns}-{path.name}"
    if not copy.exists():
        shutil.copyfile(path, copy)
    return copy


def _device(tvm, target: dict[str, Any], override: str | None, segment: Segment | None = None):
    kind = override or (target.get("tvm_target") or {}).get("kind", "llvm")
    kind = {"llvm": "cpu", "c": "cpu"}.get(kind, kind)
    if kind == "cuda":
        from .cuda import cuda_device

        return cuda_device(tvm, segment.device_code if segment is not None else None)
    try:
        dev = tvm.device(kind, 0)
    except ValueError:
        raise ArtifactError(f"the artifact's target names device {kind[:40]!r}, which TVM does not know") from None
    if not dev.exist:
        raise RuntimeFailure(f"device {kind}:0 is not present on this machine; the artifact needs it")
    return dev


def _wgpu_executor(root: Path, segment: Segment, target: dict[str, Any], device: str | None,
                   threads: int | None = None):
    """WGSL kernels + launch plan on Vulkan through wgpu (no TVM); imported only when used.
    ``threads`` does not apply: the GPU computes, and the host only records one compute pass."""
    from .wgpu_executor import WGPUExecutor

    return WGPUExecutor(root, segment, target, device)


EXECUTORS: dict[str, Callable[..., Any]] = {FORMAT_TVM_VM: TVMVMExecutor, FORMAT_WGSL_PLAN: _wgpu_executor}
#: Formats whose executor loads TVM's runtime (and so whose artifacts must match its version).
NEEDS_TVM = {FORMAT_TVM_VM}


def create_executor(root: Path, segment: Segment, target: dict[str, Any], device: str | None = None,
                    threads: int | None = None, library: str | None = None):
    """The executor for a segment's format; ``threads``: CPU threads per call (None: threads.resolve);
    ``library``: the file to run, when not the segment's own (its fallback build)."""
    fmt = segment.format or FORMAT_TVM_VM
    if fmt not in EXECUTORS:
        raise ArtifactError(f"segment {segment.id} has format {fmt!r}; this runtime runs {', '.join(EXECUTORS)}")
    if library is not None:
        segment = dataclasses.replace(segment, library=library)
    if segment.library is None:
        raise ArtifactError(f"segment {segment.id} names no library file")
    return EXECUTORS[fmt](root, segment, target, device, threads)
