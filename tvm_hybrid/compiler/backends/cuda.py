"""CUDA targets: dlight GPU schedules, nvcc device code (SASS + PTX) on machines without a GPU, and
the check that an exported library really holds that device code.

Why this module exists: TVM builds a CUDA module only when ``libtvm_runtime_cuda`` is loaded, and
that library needs the NVIDIA driver's ``libcuda.so.1``. On a build machine without a driver,
``import tvm`` skips it silently and ``tvm.compile`` returns a module holding CUDA C *source*
(nvcc never runs), which fails only on the device. So before a CUDA build we make sure the CUDA
runtime library is in (with a stub ``libcuda.so.1`` whose functions answer "no device" when the
real driver is absent), compile device code ourselves with nvcc into a fatbin holding SASS for
each requested architecture plus PTX (newer GPUs JIT it), and after export parse the fatbin inside
the library; a build whose artifact lacks any of it fails loudly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ...errors import UnsupportedError
from ...targets import TargetProfile
from .base import Backend

log = logging.getLogger(__name__)

#: CUresult CUDA_ERROR_NO_DEVICE: what every stub driver function answers.
_CUDA_ERROR_NO_DEVICE = 100
# Driver functions libtvm_runtime_cuda links against (TVM 0.27); names found in the library at
# stub-build time are added, so a newer TVM needing more still loads.
_DRIVER_FUNCS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
    "cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet",
)  # fmt: skip
_NVCC_FLAGS = (
    # The same language flags TVM's own nvcc path passes (tvm.support.nvcc): its generated kernels
    # rely on the half/bfloat16 operators and relaxed constexpr.
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda",
)  # fmt: skip
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(')
_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_PTX, _FATBIN_ELF = 1, 2
# Fatbin entry flags: payload compressed (LZ4 / zstd); the header (kind, arch) stays readable.
_FATBIN_COMPRESSED = 0x2000 | 0x8000


def _is_cuda(profile: TargetProfile) -> bool:
    """Whether the profile compiles for an NVIDIA GPU."""
    return profile.tvm_target.get("kind") == "cuda"


@dataclasses.dataclass(frozen=True)
class CudaCodegen:
    """What device code a CUDA profile asks for: SASS per architecture, and PTX for newer GPUs."""

    arch: str  # the architecture TVM schedules for, "sm_87"
    sass: tuple[str, ...]  # real architectures with machine code, ("sm_87",)
    ptx: str  # virtual architecture of the embedded PTX, "compute_87"

    @classmethod
    def from_profile(cls, profile: TargetProfile) -> CudaCodegen:
        """Read ``[tvm] target.arch`` and the optional ``[toolchain] cuda_sass`` / ``cuda_ptx``."""
        arch = str(profile.tvm_target.get("arch", ""))
        if not _ARCH_RE.match(arch) or not arch.startswith("sm_"):
            raise UnsupportedError(
                f"target {profile.name}: [tvm] target needs an arch like \"sm_87\", not {arch!r} ({profile.source})"
            )
        sass = tuple(profile.toolchain.get("cuda_sass") or (arch,))
        ptx = str(profile.toolchain.get("cuda_ptx") or "compute_" + arch[3:])
        for a in sass:
            if not _ARCH_RE.match(a) or not a.startswith("sm_"):
                raise UnsupportedError(f"target {profile.name}: cuda_sass entry {a!r} is not like \"sm_87\"")
        if not _ARCH_RE.match(ptx) or not ptx.startswith("compute_"):
            raise UnsupportedError(f"target {profile.name}: cuda_ptx {ptx!r} is not like \"compute_87\"")
        return cls(arch=arch, sass=sass, ptx=ptx)

    def gencode(self) -> list[str]:
        """nvcc flags: SASS for every listed architecture, PTX for the virtual one."""
        flags = []
        for a in self.sass:
            flags += ["-gencode", f"arch={self.ptx},code={a}"]
        return flags + ["-gencode", f"arch={self.ptx},code={self.ptx}"]

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": "cuda", "arch": self.arch, "sass": list(self.sass), "ptx": [self.ptx], "format": "fatbin"}


def _arch_number(arch: str) -> int:
    return int(_ARCH_RE.match(arch).group(2))


def profile_for_gpu(compute_version: str, machine: str | None = None) -> str | None:
    """The built-in device profile that best fits a GPU of ``compute_version`` on this CPU.

    Prefers SASS for the GPU's own arch (or the newest of its major), else PTX the driver JITs.
    """
    import platform

    from ...runtime.cuda import runs_on
    from ...targets import all_profiles

    machine = machine or platform.machine()
    prefix = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine.lower(), machine)
    best: tuple[int, int, str] | None = None
    for p in all_profiles().values():
        if not _is_cuda(p) or p.placement != "device" or not str((p.tvm_host or {}).get("mtriple", "")).startswith(prefix):
            continue
        arch = str(p.tvm_target.get("arch", ""))
        if not _ARCH_RE.match(arch):
            continue
        n = _arch_number(arch)
        sass_fits = runs_on(compute_version, {"sass": [arch]})
        if sass_fits or runs_on(compute_version, {"ptx": ["compute_" + arch[3:]]}):
            key = (int(sass_fits), n, p.name)
            best = max(best, key) if best else key
    return best[2] if best else None


# ----------------------------------------------------------------------------- schedules


def schedule(mod, profile: TargetProfile):
    """dlight's default GPU rules for every kernel no tuning database scheduled.

    Without a schedule a GPU kernel has no thread binding and TVM refuses to build it; dlight
    gives each one a sound default (tiled matmul, GEMV, reductions, a fallback for the rest) and
    leaves functions MetaSchedule already scheduled (``tir.is_scheduled``) alone.
    """
    from tvm.s_tir import dlight as dl

    rules = dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
    )
    with profile.tvm():
        return rules(mod)


# ----------------------------------------------------------------------------- toolchain


def find_nvcc() -> str:
    """nvcc from PATH, $CUDA_HOME or /usr/local/cuda; UnsupportedError naming where it looked."""
    tried = ["PATH"]
    found = shutil.which("nvcc")
    if found:
        return found
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            tried.append(f"${env}/bin")
            p = Path(os.environ[env]) / "bin" / "nvcc"
            if p.is_file():
                return str(p)
    tried.append("/usr/local/cuda/bin")
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    raise UnsupportedError(
        f"CUDA targets need nvcc (the CUDA toolkit, 12.x or 13.x) and none was found on {', '.join(tried)}; "
        "install it (https://developer.nvidia.com/cuda-downloads) or set CUDA_HOME"
    )


def nvcc_architectures(nvcc: str) -> set[str]:
    """The real architectures this nvcc generates code for (``nvcc --list-gpu-code``)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.split())


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tvm-hybrid"


def _driver_funcs_needed(runtime_cuda: Path | None) -> list[str]:
    names = set(_DRIVER_FUNCS)
    if runtime_cuda is not None:
        try:
            data = runtime_cuda.read_bytes()
        except OSError:
            data = b""
        # Driver API names in the dynamic string table (cudart's are cudaXxx, lowercase after cu).
        names |= {m.decode() for m in re.findall(rb"\x00(cu[A-Z][A-Za-z0-9_]*)\x00", data)}
    return sorted(names)


def _stub_source(funcs: list[str]) -> str:
    lines = [
        "/* tvm-hybrid: a stand-in for the NVIDIA driver's libcuda.so.1 on machines without one. Every",
        "   function answers CUDA_ERROR_NO_DEVICE; it lets TVM's CUDA codegen load, never runs a kernel. */",
        f"#define NO_DEVICE {_CUDA_ERROR_NO_DEVICE}",
        'int cuGetErrorName(int e, const char **s) { if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }',
        "int cuGetErrorString(int e, const char **s) {",
        '  if (s) *s = "no CUDA-capable device is detected (tvm-hybrid stub driver: no NVIDIA driver installed)";',
        "  return 0;",
        "}",
        "int cuDeviceGetCount(int *n) { if (n) *n = 0; return NO_DEVICE; }",
    ]
    special = {"cuGetErrorName", "cuGetErrorString", "cuDeviceGetCount"}
    lines += [f"int {f}(void) {{ return NO_DEVICE; }}" for f in funcs if f not in special]
    return "\n".join(lines) + "\n"


def stub_libcuda(runtime_cuda: Path | None = None) -> Path:
    """Build (once, cached under ~/.cache/tvm-hybrid) the stub ``libcuda.so.1`` and return its path."""
    src = _stub_source(_driver_funcs_needed(runtime_cuda))
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    out_dir = _cache_dir() / f"libcuda-stub-{digest}"
    lib = out_dir / "libcuda.so.1"
    if lib.is_file():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise UnsupportedError(
            "compiling for CUDA on a machine without the NVIDIA driver needs a C compiler to build a stand-in "
            "libcuda.so.1; install one (apt-get install -y gcc) or the NVIDIA driver"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_file = Path(tmp) / "libcuda_stub.c"
        c_file.write_text(src)
        built = Path(tmp) / "libcuda.so.1"
        proc = subprocess.run(
            [cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(built), str(c_file)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise UnsupportedError(
                f"building the stand-in libcuda.so.1 with {cc} failed: {(proc.stderr or proc.stdout).strip()[:300]}"
            )
        os.replace(built, lib)  # atomic: a concurrent build sees the old file or the whole new one
    log.info("built a stand-in libcuda.so.1 at %s (no NVIDIA driver on this machine)", lib)
    return lib


_driver: dict[str, Any] = {}


def ensure_cuda_codegen() -> str:
    """Make TVM's CUDA codegen available in this process; returns "driver" or "stub".

    ``import tvm`` loads ``libtvm_runtime_cuda`` only if the driver's ``libcuda.so.1`` resolves.
    When it does not, a stub with the same SONAME is loaded RTLD_GLOBAL first, so the dynamic
    linker resolves the CUDA runtime library's dependency to it, and the library is loaded now:
    its registrations (``ffi.Module.create.cuda``) are what make ``tvm.compile`` produce a binary
    CUDA module rather than source. This works after ``import tvm`` too; no environment needed.
    """
    if "mode" in _driver:
        return _driver["mode"]
    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    from ...runtime.cuda import load_tvm_cuda_library

    mode = "driver"
    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            mode = "stub"
            stub = stub_libcuda(runtime_dir / "libtvm_runtime_cuda.so")
            _driver["stub_handle"] = ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        try:
            load_tvm_cuda_library()
        except (OSError, RuntimeError) as e:
            raise UnsupportedError(
                f"TVM's CUDA runtime library could not be loaded ({str(e).strip().splitlines()[0][:200]}); "
                "this TVM build cannot produce CUDA device code (install apache-tvm with CUDA support)"
            ) from e
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise UnsupportedError(
            "TVM's CUDA runtime is loaded but registers no CUDA module creator; this TVM build cannot produce "
            "CUDA device code"
        )
    _driver["mode"] = mode
    return mode


# ----------------------------------------------------------------------------- device compile


@dataclasses.dataclass
class DeviceCompile:
    """What the nvcc callback did during one build: kernels compiled, fatbins produced, errors."""

    codegen: CudaCodegen
    nvcc: str
    kernels: list[str] = dataclasses.field(default_factory=list)
    fatbins: int = 0
    error: BaseException | None = None


def _nvcc_fatbin(code: str, job: DeviceCompile) -> bytes:
    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-nvcc-") as tmp:
        src = Path(tmp) / "kernels.cu"
        out = Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        fast_math = [] if os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH") else ["--use_fast_math"]
        # Uncompressed, so the check after export can find every kernel in the SASS and the PTX.
        cmd = [job.nvcc, "--fatbin", "-O3", *job.codegen.gencode(), *_NVCC_FLAGS, *fast_math,
               "--no-compress", "-o", str(out), str(src)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 and "no-compress" in (proc.stderr + proc.stdout):
            cmd.remove("--no-compress")  # nvcc older than 12.4: compressed fatbin, headers still checked
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            first = next((ln for ln in err.splitlines() if "error" in ln.lower()), err.splitlines()[0] if err else "")
            raise UnsupportedError(
                f"nvcc failed to compile the generated CUDA kernels for {', '.join(job.codegen.sass)}: {first[:300]}"
            )
        return out.read_bytes()


@contextlib.contextmanager
def device_compile(profile: TargetProfile) -> Iterator[DeviceCompile]:
    """Within this block, TVM's CUDA codegen compiles device code with nvcc into a SASS + PTX fatbin.

    TVM calls the global ``tvm_callback_cuda_compile`` with the generated CUDA source; its own
    implementation uses NVRTC (needs ``cuda-bindings``) or nvcc for one architecture only, reading
    it from ``Target.current()``. Ours takes the architectures from the profile and is restored
    on exit.
    """
    import tvm_ffi

    codegen = CudaCodegen.from_profile(profile)
    nvcc = find_nvcc()
    known = nvcc_architectures(nvcc)
    missing = [a for a in codegen.sass if known and a not in known]
    if missing:
        raise UnsupportedError(
            f"this nvcc ({nvcc}) cannot generate {', '.join(missing)} for target {profile.name}; it supports "
            f"{', '.join(sorted(known, key=lambda a: (_arch_number(a), a)))} (CUDA 13 dropped sm_50…sm_72; "
            "use a CUDA 12 toolkit for those)"
        )
    ensure_cuda_codegen()
    job = DeviceCompile(codegen=codegen, nvcc=nvcc)

    def callback(code):
        try:
            job.kernels += _KERNEL_RE.findall(code)
            data = _nvcc_fatbin(code, job)
            job.fatbins += 1
            return bytearray(data)
        except BaseException as e:  # TVM's C++ frame swallows the type; keep it to re-raise after
            job.error = e
            raise

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, callback, override=True)
    try:
        yield job
    except Exception as e:
        if job.error is not None and job.error is not e:
            raise job.error from e
        raise
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


def prepare_tuning(profile: TargetProfile) -> None:
    """Ready this process for MetaSchedule on a CUDA target; UnsupportedError without a GPU.

    MetaSchedule measures candidates on the GPU, so tuning needs one (compiling does not: it
    uses dlight's defaults). Its builder workers are fresh processes that compile through TVM's
    own ``tvm_callback_cuda_compile``, which defaults to NVRTC (needs ``cuda-bindings``); without
    that package they are switched to nvcc, which they find on PATH.
    """
    import importlib.util

    from ...runtime.cuda import gpu_compute_capability

    cc = gpu_compute_capability(0)
    if cc is None:
        raise UnsupportedError(
            f"tuning {profile.name} needs an NVIDIA GPU to measure kernels on, and this machine has none; "
            "compile without tuning (dlight default schedules) or tune on a machine with the GPU"
        )
    from ...runtime.cuda import runs_on

    codegen = CudaCodegen.from_profile(profile)
    if not runs_on(cc, {"sass": [codegen.arch]}):
        log.warning("tuning %s on a GPU of compute capability %s: timings may not carry over", profile.name, cc)
    nvcc = find_nvcc()
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        nvcc_dir = str(Path(nvcc).parent)
        if nvcc_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = nvcc_dir + os.pathsep + os.environ.get("PATH", "")


# ----------------------------------------------------------------------------- verification


@dataclasses.dataclass(frozen=True)
class FatbinEntry:
    """One image in a CUDA fatbin: PTX or SASS (an ELF cubin) for one architecture."""

    kind: str  # "ptx" or "sass"
    arch: int  # 87 for sm_87 / compute_87
    compressed: bool
    payload: bytes


def fatbin_entries(data: bytes) -> list[FatbinEntry]:
    """Every image of every fatbin found in ``data`` (a fatbin, or a library embedding one).

    Layout (as cuobjdump reads it): a 16-byte header (magic 0xBA55ED50, version, header size,
    payload size), then entries, each a header (kind 1 = PTX / 2 = ELF, its own size, payload
    size, ..., architecture) followed by its payload.
    """
    entries: list[FatbinEntry] = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic)
    while pos != -1:
        end = pos + 4
        if pos + 16 <= len(data):
            _, version, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
            if version == 1 and hsize >= 16 and pos + hsize + fsize <= len(data):
                off, stop = pos + hsize, pos + hsize + fsize
                while off + 32 <= stop:
                    kind, _, ehsize, size, _, _, _, _, arch = struct.unpack_from("<HHIQIIHHI", data, off)
                    if kind not in (_FATBIN_PTX, _FATBIN_ELF) or ehsize < 32 or off + ehsize + size > stop:
                        break
                    flags = struct.unpack_from("<Q", data, off + 40)[0] if ehsize >= 48 else 0
                    payload = data[off + ehsize : off + ehsize + size]
                    entries.append(
                        FatbinEntry("ptx" if kind == _FATBIN_PTX else "sass", arch, bool(flags & _FATBIN_COMPRESSED), payload)
                    )
                    off += ehsize + size
                end = stop
        pos = data.find(magic, end)
    return entries


def verify_device_code(library: Path, job: DeviceCompile, target_name: str) -> dict[str, Any]:
    """Check the exported library holds SASS for every requested architecture and the PTX, with
    every kernel TVM generated in each; returns the manifest's ``device_code`` record.

    Raises UnsupportedError when device code is missing: such an artifact would load on the
    device and fail there, or JIT from nothing. (Even a lone Reshape is a copy kernel on the GPU.)
    """
    codegen = job.codegen
    if job.fatbins == 0:
        raise UnsupportedError(
            f"target {target_name}: TVM produced no CUDA device code (nvcc was never called; the module holds "
            "CUDA source only); refusing to write an artifact that cannot run on a GPU"
        )
    entries = fatbin_entries(library.read_bytes())
    sass = {e.arch for e in entries if e.kind == "sass"}
    ptx = {e.arch for e in entries if e.kind == "ptx"}
    want_sass = {_arch_number(a) for a in codegen.sass}
    lacking = [f"SASS sm_{a}" for a in sorted(want_sass - sass)]
    if _arch_number(codegen.ptx) not in ptx:
        lacking.append(f"PTX {codegen.ptx}")
    if lacking:
        raise UnsupportedError(
            f"target {target_name}: the built library {library.name} lacks {', '.join(lacking)} "
            f"(found SASS {sorted(sass) or 'none'}, PTX {sorted(ptx) or 'none'}); refusing to write the artifact"
        )
    # Every kernel in every uncompressed image: a fatbin from another build would not pass.
    for e in entries:
        if e.compressed or (e.kind == "sass" and e.arch not in want_sass):
            continue
        absent = [k for k in job.kernels if k.encode() not in e.payload]
        if absent:
            raise UnsupportedError(
                f"target {target_name}: {e.kind.upper()} for arch {e.arch} lacks kernels {', '.join(absent[:5])}"
                f"{'…' if len(absent) > 5 else ''}; refusing to write the artifact"
            )
    record = codegen.to_manifest()
    record["kernels"] = len(set(job.kernels))
    return record


# ----------------------------------------------------------------------------- the backend


class CudaBackend(Backend):
    """NVIDIA GPUs: dlight's default GPU schedules, device code compiled by nvcc into a fatbin
    (SASS for the profile's arch and PTX) inside a TVM VM library, checked after export."""

    name = "cuda"
    device = "cuda"

    def schedule(self, mod, profile: TargetProfile):
        return schedule(mod, profile)

    def compile_context(self, profile: TargetProfile):
        return device_compile(profile)

    def verify_library(self, library: Path, job, profile: TargetProfile) -> dict | None:
        return verify_device_code(library, job, profile.name)

    def check_tunable(self, profile: TargetProfile, remote: bool) -> None:
        if not remote:
            prepare_tuning(profile)  # a GPU to measure on, and nvcc; UnsupportedError without one
