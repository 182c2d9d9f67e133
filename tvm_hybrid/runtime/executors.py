"""Device executors, one per segment format, in a table; each is imported only when used."""

from __future__ import annotations

import dataclasses
import threading
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
        self._cpu = self.device.dlpack_device_type() == 1  # (numpy views only of host memory)
        self._busy = threading.Lock()  # held by the call using the reused input tensors
        self._inputs: list = []  # (tensor, its numpy view) per argument, reused by each CPU call
        self._first: list | None = None  # the first call's outputs, kept alive until the second
        self._copied: set[int] | None = None  # the outputs that are not fresh tensors (copied)
        #: Workers of TVM's thread pool for this executor's calls (threads.resolve's default).
        self.threads = threads if threads is not None else resolve_threads(None)
        self.threads_used: int | None = None  # what the pool ran with in the last call

    def run(self, args: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        self.threads_used = use_threads(self.threads)  # the pool is per calling thread
        if not self._cpu or not self._busy.acquire(blocking=False):
            # a GPU, or another thread in this executor: fresh tensors, outputs copied out
            out = self._main(*[tvm.runtime.tensor(a, self.device) for a in args], *self._weights)
            return [o.numpy() for o in self._tuple(out)]
        try:
            return self._run_cpu(args)
        finally:
            self._busy.release()

    def _tuple(self, out) -> list:
        return [out] if self._n_out == 1 and hasattr(out, "numpy") else list(out)

    def _run_cpu(self, args: list[np.ndarray]) -> list[np.ndarray]:
        """A CPU call without the copies a call would otherwise make (``tvm.runtime.tensor``
        allocates and copies each input, ``.numpy()`` copies each output: 0.1 ms for a 1 MB
        output): inputs are copied into tensors allocated at the first call and reused, and
        outputs are returned as numpy views of the tensors the call allocated (DLPack; a view
        keeps its tensor alive, so the next call allocates anew). An output that is not a fresh
        tensor — a view of an input, of a weight or of a constant of the library, which the next
        call would overwrite or the caller could change — is copied: the first call copies every
        output and keeps them, and the second marks as not fresh each output that comes back at
        the same address while the first call's is still alive (or at another output's)."""
        ins = self._inputs
        if len(ins) != len(args):
            ins[:] = [None] * len(args)
        tensors = []
        for i, a in enumerate(args):
            a = np.asarray(a)
            view = ins[i]
            if view is None or view[1].shape != a.shape or view[1].dtype != a.dtype:
                if view is not None:  # new input tensors: which outputs are fresh, found anew
                    self._first = self._copied = None
                t = self._tvm.runtime.empty(a.shape, str(a.dtype), self.device)
                ins[i] = view = (t, _numpy_view(t))
            if view[1] is None:  # a dtype numpy cannot view (bfloat16 …)
                tensors.append(self._tvm.runtime.tensor(a, self.device))
                continue
            np.copyto(view[1], a, casting="no")
            tensors.append(view[0])
        outs = self._tuple(self._main(*tensors, *self._weights))
        arrays = [_numpy_view(o) for o in outs]
        arrays = [o.numpy() if a is None else a for a, o in zip(arrays, outs)]
        first = self._first
        if first is not None:  # the second call: which outputs are fresh
            at = [a.ctypes.data for a in arrays]
            self._copied = {i for i, (a, b) in enumerate(zip(at, first)) if a == b.ctypes.data or at.count(a) > 1}
            self._first = None
        elif self._copied is None:  # the first call: keep its outputs alive till the second
            self._first = arrays
            return [a.copy() for a in arrays]
        return [a.copy() if i in self._copied else a for i, a in enumerate(arrays)]


def _numpy_view(t) -> np.ndarray | None:
    """A CPU tensor as a numpy array on the same memory (DLPack), or None for a dtype numpy lacks."""
    try:
        return np.from_dlpack(t)
    except (TypeError, BufferError, RuntimeError, ValueError):
        return None


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
