"""CUDA on the device: load TVM's CUDA runtime, find the GPU, check it can run the artifact's code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import RuntimeFailure


def _arch_num(arch: str) -> int | None:
    m = re.match(r"^(?:sm|compute)_(\d+)[a-z]?$", str(arch))
    return int(m.group(1)) if m else None


def runs_on(compute_version: str, device_code: dict[str, Any]) -> bool:
    """Whether a GPU of ``compute_version`` ("8.6") can run the code in ``device_code``.

    SASS for sm_XY runs on X.Z with Z >= Y (same major); PTX for compute_XY is JIT-compiled by
    the driver on any GPU of compute capability X.Y or newer.
    """
    try:
        major, minor = (int(x) for x in compute_version.split(".")[:2])
    except ValueError:
        return True  # an unknown answer from the driver: let the driver decide at load time
    cc = major * 10 + minor
    for a in device_code.get("sass", []):
        n = _arch_num(a)
        if n is not None and n // 10 == major and n <= cc:
            return True
    for a in device_code.get("ptx", []):
        n = _arch_num(a)
        if n is not None and n <= cc:
            return True
    return False


def _needs(device_code: dict[str, Any]) -> str:
    arch = device_code.get("arch", "")
    return f"an NVIDIA GPU ({arch} or newer)" if arch else "an NVIDIA GPU"


def load_tvm_cuda_library() -> None:
    """Load ``libtvm_runtime_cuda`` into this process if it is not in yet.

    ``import tvm`` loads it only when the full TVM is imported *and* the driver's libcuda.so.1
    resolves; runtime-only TVM (edge apps) loads no device backends at all. Raises OSError or
    RuntimeError as the loader does (e.g. libcuda.so.1 missing).
    """
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
    )


def _load_cuda_runtime(needs: str) -> None:
    try:
        load_tvm_cuda_library()
    except (OSError, RuntimeError) as e:
        text = str(e)
        if "libcuda.so" in text:
            raise RuntimeFailure(
                f"no CUDA device is present: the NVIDIA driver (libcuda.so.1) is not installed on this machine, "
                f"and the artifact needs {needs}; run it on a machine with one, or compile for this CPU (--target host)"
            ) from e
        raise RuntimeFailure(
            f"TVM's CUDA runtime (libtvm_runtime_cuda) cannot be loaded: {text.strip().splitlines()[0][:200]}; "
            "install the apache-tvm build with CUDA support and the CUDA runtime (libcudart) it links"
        ) from e


def cuda_device(tvm, device_code: dict[str, Any] | None, device_id: int = 0):
    """The ``tvm.device`` to run a CUDA segment on; RuntimeFailure (one line) when there is none fit."""
    device_code = device_code or {}
    needs = _needs(device_code)
    _load_cuda_runtime(needs)
    dev = tvm.device("cuda", device_id)
    if not dev.exist:
        raise RuntimeFailure(
            f"no CUDA device is present on this machine (the CUDA driver reports no GPU {device_id}); the artifact "
            f"needs {needs}: run it on one, or compile for this CPU (--target host)"
        )
    version = str(dev.compute_version)
    if device_code and not runs_on(version, device_code):
        have = ", ".join(device_code.get("sass", []) + device_code.get("ptx", []))
        raise RuntimeFailure(
            f"GPU {device_id} ({dev.device_name}, compute capability {version}) cannot run this artifact's device "
            f"code ({have}); recompile for it, e.g. --target cuda-sm{version.replace('.', '')}"
        )
    return dev


def _driver():
    import ctypes

    try:
        drv = ctypes.CDLL("libcuda.so.1")
        return drv if drv.cuInit(0) == 0 else None
    except (OSError, AttributeError):
        return None


def gpu_count() -> int:
    """NVIDIA GPUs the driver reports (0 without a driver); asks the driver directly, no TVM."""
    import ctypes

    drv = _driver()
    n = ctypes.c_int(0)
    if drv is None or drv.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return n.value


def gpu_compute_capability(device_id: int = 0) -> str | None:
    """GPU ``device_id``'s compute capability as "8.7", or None without one."""
    import ctypes

    drv = _driver()
    if drv is None or device_id >= gpu_count():
        return None
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if drv.cuDeviceGetAttribute(ctypes.byref(major), 75, device_id) != 0:
        return None
    if drv.cuDeviceGetAttribute(ctypes.byref(minor), 76, device_id) != 0:
        return None
    return f"{major.value}.{minor.value}"
