"""This machine's CPU: its architecture and features, and whether it can run (or time) a target's code.

Code built for ``-mcpu=skylake-avx512`` uses AVX-512 without checking for it: on a CPU without it
(AMD Zen 2/3, most laptops) the first such instruction kills the process with SIGILL; code built
for another architecture does not load at all. The runtime checks both before it loads a library
(``check_native``), so each is a one-line error instead; the tuner checks that timings taken here
would be the device's (``check_tuning_target``). Running another architecture's artifacts under
qemu is emulate.py's.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path
from typing import Any

from .errors import RuntimeFailure, UsageError

#: Architectures whose artifacts `tvm-hybrid run --emulate` runs here (emulate.ARCHES describes them).
EMULATED_ARCHES = ("aarch64",)

_V2 = ("sse4_1", "sse4_2", "ssse3", "popcnt")
_V3 = (*_V2, "avx", "avx2", "fma", "f16c", "bmi1", "bmi2")
_V4 = (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
_V4_VNNI = (*_V4, "avx512_vnni")
_V3_VNNI = (*_V3, "avx_vnni")  # AVX-VNNI without AVX-512: Intel's client cores since Alder Lake

#: /proc/cpuinfo flags each known x86 ``mcpu`` compiles in unconditionally. A ``mcpu`` not
#: listed here is not checked (nothing is known of it), rather than refused.
X86_MCPU_FEATURES: dict[str, tuple[str, ...]] = {
    "x86-64": (), "generic": (),
    "x86-64-v2": _V2, "nehalem": _V2, "westmere": _V2, "sandybridge": (*_V2, "avx"), "ivybridge": (*_V2, "avx", "f16c"),
    "x86-64-v3": _V3, "haswell": _V3, "broadwell": _V3, "skylake": _V3, "alderlake": _V3_VNNI,
    "raptorlake": _V3_VNNI, "meteorlake": _V3_VNNI, "gracemont": _V3_VNNI, "znver1": _V3, "znver2": _V3, "znver3": _V3, "bdver4": _V3,
    "x86-64-v4": _V4, "skylake-avx512": _V4, "cannonlake": _V4, "cascadelake": _V4_VNNI, "cooperlake": _V4_VNNI,
    "icelake-client": _V4_VNNI, "icelake-server": _V4_VNNI, "tigerlake": _V4_VNNI, "rocketlake": _V4_VNNI,
    "sapphirerapids": _V4_VNNI, "emeraldrapids": _V4_VNNI, "graniterapids": _V4_VNNI, "znver4": _V4_VNNI,
    "znver5": _V4_VNNI,
    "knl": (*_V3, "avx512f", "avx512cd"), "knm": (*_V3, "avx512f", "avx512cd"),
}  # fmt: skip

#: LLVM ``mattr`` feature -> its /proc/cpuinfo flag, for the features checked. The names often
#: differ (LLVM ``avx512vnni`` is ``avx512_vnni``, ``bmi`` is ``bmi1``, ``sse3`` is ``pni``), so
#: features not listed are not checked rather than refused on CPUs that have them.
_MATTR_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ssse3": "ssse3", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
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


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """This machine's CPU model as /proc/cpuinfo names it ("model name"; on ARM, the implementer
    and part codes), or "" where that is unreadable. Tuning logs record it with their in-model
    verdicts: a kernel's speed in place is a fact about one CPU model."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if m:
        return " ".join(m.group(1).split())
    impl = re.search(r"^CPU implementer\s*:\s*(\S+)", text, re.MULTILINE)
    part = re.search(r"^CPU part\s*:\s*(\S+)", text, re.MULTILINE)
    return f"ARM implementer {impl.group(1)} part {part.group(1)}" if impl and part else ""


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


# --- can this machine run (or time) a target's code ---------------------------------------


_MACHINE_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def host_arch() -> str:
    """This machine's architecture, named as in target triples ("x86_64", "aarch64")."""
    m = platform.machine().lower()
    return _MACHINE_ALIASES.get(m, m)


def target_arch(target: dict[str, Any]) -> str:
    """The CPU architecture a resolved profile (or a manifest's ``target``) compiles for.

    Takes the profile as a dict (``TargetProfile.to_dict()`` or ``Manifest.target``): the
    first field of the host's LLVM ``mtriple`` (a GPU profile's CPU side, e.g. Jetson's aarch64),
    else of the target's; profiles with neither build for this machine.
    """
    triple = (target.get("tvm_host") or {}).get("mtriple") or (target.get("tvm_target") or {}).get("mtriple", "")
    arch = triple.split("-", 1)[0].lower() if triple else host_arch()
    return _MACHINE_ALIASES.get(arch, arch)


def emulatable(target: dict[str, Any]) -> bool:
    """Whether this machine can run the target's artifacts under emulation: CPU code of a known architecture."""
    return target_arch(target) in EMULATED_ARCHES and (target.get("tvm_target") or {}).get("kind", "llvm") in ("llvm", "c")


def needs_emulation(target: dict[str, Any]) -> bool:
    """Whether code built for this target cannot run natively here."""
    return target_arch(target) != host_arch()


def timing_meaningless(target: dict[str, Any]) -> str | None:
    """Why timings for this target taken on this machine mean nothing, or None when they are real.

    For `tvm-hybrid tune`: a profile for another architecture can only be measured on a real
    board behind an RPC tracker; qemu-user translates instructions and its timings bear no
    relation to the device's.
    """
    arch = target_arch(target)
    if arch == host_arch():
        return None
    name = target.get("name", "?")
    return (
        f"target {name} runs on {arch} and this machine is {host_arch()}: timings here would come from "
        f"qemu emulation and mean nothing; tune on a real {arch} board behind an RPC tracker "
        "(--rpc-tracker HOST:PORT --rpc-key KEY)"
    )


def check_tuning_target(target: dict[str, Any], rpc_tracker: str | None) -> None:
    """Refuse to tune a foreign-architecture target locally: UsageError unless an RPC tracker is given."""
    why = timing_meaningless(target)
    if why is not None and not rpc_tracker:
        raise UsageError(f"cannot tune locally: {why}")


def check_native(target: dict[str, Any], name: str = "the artifact") -> None:
    """RuntimeFailure when this machine cannot run the artifact's code: another architecture
    (pointing at --emulate), or x86 code using CPU features this CPU lacks (AVX-512 on AVX2)."""
    arch = target_arch(target)
    if arch != host_arch():
        how = " or on this machine with --emulate" if emulatable(target) else ""
        raise RuntimeFailure(
            f"{name} is built for {arch} ({target.get('name', '?')}) and this machine is {host_arch()}; "
            f"run it on the device{how}"
        )
    cpu = target.get("tvm_host") or target.get("tvm_target") or {}
    if arch == "x86_64" and cpu.get("kind", "llvm") in ("llvm", "c"):
        missing = missing_features(cpu)
        if missing:
            raise RuntimeFailure(
                f"{name} is built for {target.get('name', '?')} (mcpu {cpu.get('mcpu', '?')}) and this CPU lacks "
                f"{', '.join(missing)}, so it would die of an illegal instruction; compile it for a profile this "
                "CPU runs (`--target host` picks the best one here)"
            )


#: Set to 0 to run a segment's portable build even where one of its dispatch variants would run.
DISPATCH_ENV = "TVM_HYBRID_DISPATCH"


def pick_variant(variants, flags: frozenset[str] | None = None) -> dict[str, Any] | None:
    """The first of a segment's builds for other CPU levels (best first) this machine runs, or None
    (run the segment's own library): this architecture, every x86 feature it needs present. Where
    the CPU's features cannot be read, none is picked: the portable build cannot fault."""
    if os.environ.get(DISPATCH_ENV, "1") == "0":
        return None
    flags = cpu_flags() if flags is None else flags
    for v in variants:
        t = v["tvm_target"]
        if target_arch({"tvm_target": t}) != host_arch():
            continue
        if host_arch() == "x86_64" and (not flags or x86_features(t) - flags):
            continue
        return v
    return None

