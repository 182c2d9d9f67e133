"""Target profiles: one TOML file a target, looked up by name with did-you-mean suggestions."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import hostcpu
from .errors import UsageError

log = logging.getLogger(__name__)

#: Extra profile directories, searched before the built-in ones (os.pathsep-separated).
PATH_ENV = "TVM_HYBRID_TARGETS_PATH"

_REQUIRED = ("name", "description", "tvm", "capacity")


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    """A resolved target profile: what TVM compiles for and what the device can carry."""

    name: str
    description: str
    family: str
    placement: str  # "device" or "cloud"
    tvm_target: dict[str, Any]
    tvm_host: dict[str, Any] | None
    toolchain: dict[str, Any]
    capacity: dict[str, Any]
    link: dict[str, Any]
    source: str
    #: The compiler backend (compiler.backends) by name; None: the one for the TVM target kind.
    backend: str | None = None
    #: Profiles whose builds ship alongside this one's, best first; the runtime loads the first
    #: this CPU can run (``[tvm] dispatch``: a portable x86-64 artifact with AVX2 and AVX-512 builds).
    dispatch: tuple[str, ...] = ()
    #: A profile whose tuning log builds for this one use while it has none of its own
    #: (``[tvm] tuning_log_from``): one whose code every CPU of this profile runs.
    tuning_log_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The profile as recorded in a manifest (the file it came from and the compiler backend
        that built it are left out: the runtime reads the segment formats)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("backend")
        d.pop("dispatch")
        d.pop("tuning_log_from")
        return d

    def tvm(self):
        """The ``tvm.target.Target`` for this profile (needs the compiler)."""
        import tvm

        if self.tvm_host is not None:
            return tvm.target.Target(dict(self.tvm_target), host=dict(self.tvm_host))
        return tvm.target.Target(dict(self.tvm_target))


def search_dirs() -> list[Path]:
    """Directories holding profiles, in lookup order."""
    dirs = [Path(p) for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs.append(here.parent / "targets")  # source checkout / editable install
    dirs.append(here / "_profiles")  # wheel install
    return [d for d in dirs if d.is_dir()]


def _load_file(path: Path) -> TargetProfile:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"target profile {path} is not valid TOML: {e}") from e
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UsageError(f"target profile {path} lacks {', '.join(missing)}")
    tvm_section = data["tvm"]
    if "target" not in tvm_section:
        raise UsageError(f"target profile {path} lacks [tvm] target")
    return TargetProfile(
        name=data["name"],
        description=data["description"],
        family=data.get("family", ""),
        placement=data.get("placement", "device"),
        tvm_target=dict(tvm_section["target"]),
        tvm_host=dict(tvm_section["host"]) if "host" in tvm_section else None,
        toolchain=dict(data.get("toolchain", {})),
        capacity=dict(data["capacity"]),
        link=dict(data.get("link", {})),
        source=str(path),
        backend=str(data["backend"]) if "backend" in data else None,
        dispatch=tuple(str(n) for n in tvm_section.get("dispatch", ())),
        tuning_log_from=str(tvm_section["tuning_log_from"]) if "tuning_log_from" in tvm_section else None,
    )


def all_profiles() -> dict[str, TargetProfile]:
    """Every profile found, by name; earlier directories win."""
    found: dict[str, TargetProfile] = {}
    for d in search_dirs():
        for path in sorted(d.glob("*.toml")):
            prof = _load_file(path)
            found.setdefault(prof.name, prof)
    return found


def host_profile_name(cpu_flags: set[str] | frozenset[str] | None = None) -> str:
    """The best built-in x86 profile for this machine's CPU."""
    if cpu_flags is None:
        cpu_flags = hostcpu.cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags:
        return "x86-64-avx512-vnni" if "avx512_vnni" in cpu_flags else "x86-64-avx512"
    if {"avx2", "fma"} <= cpu_flags:
        return "x86-64-avx2-vnni" if "avx_vnni" in cpu_flags else "x86-64-avx2"
    return "x86-64"


def resolve(name: str) -> TargetProfile:
    """Look a profile up by name; ``host`` picks the best profile for this machine."""
    profiles = all_profiles()
    if name == "host":
        resolved = host_profile_name()
        log.info("target 'host' resolved to %s", resolved)
        name = resolved
    if name in profiles:
        return profiles[name]
    close = difflib.get_close_matches(name, list(profiles) + ["host"], n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UsageError(
        f"unknown target {name!r}.{hint} Run `tvm-hybrid targets` to list them "
        f"(profiles are read from {', '.join(str(d) for d in search_dirs())})."
    )


def precisions(profile: TargetProfile) -> list[str]:
    """The ``--precision`` values a profile computes natively: its capacity's ``precisions``,
    else fp32 and, where its dtypes list float16, fp16."""
    given = profile.capacity.get("precisions")
    if given is not None:
        return list(given)
    return ["fp32", *(["fp16"] if "float16" in profile.capacity.get("dtypes", ()) else [])]
