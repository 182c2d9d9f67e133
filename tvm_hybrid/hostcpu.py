"""This machine's CPU features, and the ones code built for an LLVM x86 ``mcpu``/``mattr`` needs.

Code built for ``-mcpu=skylake-avx512`` uses AVX-512 without checking for it: on a CPU without it
(AMD Zen 2/3, most laptops) the first such instruction kills the process with SIGILL. The
runtime compares the two before it loads a library, so that is a one-line error instead.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

_V2 = ("sse4_1", "sse4_2", "ssse3", "popcnt")
_V3 = (*_V2, "avx", "avx2", "fma", "f16c", "bmi1", "bmi2")
_V4 = (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")

#: /proc/cpuinfo flags each known x86 ``mcpu`` compiles in unconditionally. A ``mcpu`` not
#: listed here is not checked (nothing is known of it), rather than refused.
X86_MCPU_FEATURES: dict[str, tuple[str, ...]] = {
    "x86-64": (), "generic": (),
    "x86-64-v2": _V2, "nehalem": _V2, "westmere": _V2, "sandybridge": (*_V2, "avx"), "ivybridge": (*_V2, "avx", "f16c"),
    "x86-64-v3": _V3, "haswell": _V3, "broadwell": _V3, "skylake": _V3, "alderlake": _V3, "raptorlake": _V3,
    "meteorlake": _V3, "gracemont": _V3, "znver1": _V3, "znver2": _V3, "znver3": _V3, "bdver4": _V3,
    "x86-64-v4": _V4, "skylake-avx512": _V4, "cascadelake": _V4, "cooperlake": _V4, "cannonlake": _V4,
    "icelake-client": _V4, "icelake-server": _V4, "tigerlake": _V4, "rocketlake": _V4, "sapphirerapids": _V4,
    "emeraldrapids": _V4, "graniterapids": _V4, "znver4": _V4, "znver5": _V4,
    "knl": (*_V3, "avx512f", "avx512cd"), "knm": (*_V3, "avx512f", "avx512cd"),
}  # fmt: skip

#: LLVM ``mattr`` feature -> its /proc/cpuinfo flag, for the features checked. The names often
#: differ (LLVM ``avx512vnni`` is ``avx512_vnni``, ``bmi`` is ``bmi1``, ``sse3`` is ``pni``), so
#: features not listed are not checked rather than refused on CPUs that have them.
_MATTR_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ssse3": "ssse3", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (/proc/cpuinfo); empty where that is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else frozenset()


def x86_features(tvm_target: dict[str, Any]) -> set[str]:
    """The CPU flags code built for an LLVM x86 target (a JSON-dict target) cannot run without."""
    need = set(X86_MCPU_FEATURES.get(str(tvm_target.get("mcpu") or "x86-64"), ()))
    mattr = tvm_target.get("mattr") or []
    for attr in mattr.split(",") if isinstance(mattr, str) else mattr:
        attr = str(attr).strip()
        if attr.startswith("+") and attr[1:] in _MATTR_FLAGS:
            need.add(_MATTR_FLAGS[attr[1:]])
    return need


def missing_features(tvm_target: dict[str, Any], flags: frozenset[str] | None = None) -> list[str]:
    """The features an x86 target needs that this CPU lacks, sorted; [] when unknown (no cpuinfo)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return []
    return sorted(x86_features(tvm_target) - flags)
