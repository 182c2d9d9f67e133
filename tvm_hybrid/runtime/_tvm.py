"""Load TVM's runtime library alone (no libtvm_compiler), unless the compiler is already in."""

from __future__ import annotations

import os
import sys

from ..errors import RuntimeFailure


def tvm_runtime():
    """Import ``tvm`` in runtime-only mode and return the module.

    TVM reads ``TVM_USE_RUNTIME_LIB`` once, at import: set, it loads libtvm_runtime and skips
    libtvm_compiler (and tvm.relax). A process that already imported the full TVM (the CLI's
    compile-then-run) keeps it; the runtime API is the same.
    """
    if "tvm" in sys.modules:
        return sys.modules["tvm"]
    old = os.environ.get("TVM_USE_RUNTIME_LIB")
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    try:
        import tvm
    except ImportError as e:
        raise RuntimeFailure(
            f"the TVM runtime is not installed ({e}); install it with: pip install apache-tvm==0.27.0.post1"
        ) from e
    finally:
        if old is None:
            os.environ.pop("TVM_USE_RUNTIME_LIB", None)
        else:
            os.environ["TVM_USE_RUNTIME_LIB"] = old
    return tvm


def versions() -> dict[str, str]:
    """Versions of the native runtime this process loads artifacts with."""
    tvm = tvm_runtime()
    try:
        import tvm_ffi

        ffi = getattr(tvm_ffi, "__version__", "")
    except ImportError:  # pragma: no cover
        ffi = ""
    return {"tvm": tvm.__version__, "tvm_ffi": ffi}
