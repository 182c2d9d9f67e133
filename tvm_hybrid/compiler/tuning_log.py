"""A target's tuning log: the MetaSchedule database directory a tuning run writes and a build reads.

``tuning_logs/<profile>/`` holds MetaSchedule's JSON database (workloads and records), meta.json
(the TVM target and versions it was tuned for, and each run), defaults.json (every kernel's
default-schedule time as measured when tuning, and the in-model check's verdicts) and a lock.
Builds read it with ``open_database`` (no MetaSchedule tuning code imported); the tuner
(``compiler.tune``) writes it under ``locked``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..targets import TargetProfile

log = logging.getLogger(__name__)

#: Overrides the default tuning-log root (the repository's tuning_logs/).
ENV = "TVM_HYBRID_TUNING_LOGS"
META = "meta.json"
#: Each kernel's default-schedule time when it was last tuned, by workload hash.
DEFAULTS = "defaults.json"
META_SCHEMA = "tvm-hybrid/tuning-log@1"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


def default_logs_dir() -> Path:
    """The tuning-log root: $TVM_HYBRID_TUNING_LOGS, or tuning_logs/ next to the package source."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    import tvm_hybrid

    return Path(tvm_hybrid.__file__).resolve().parent.parent / "tuning_logs"


def target_dir(logs: Path, profile: TargetProfile) -> Path:
    """Where one target's database lives: ``logs/<profile name>/``."""
    return Path(logs) / profile.name




def versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": getattr(tvm_ffi, "__version__", "")}


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def profile_target(profile: TargetProfile) -> dict[str, Any]:
    return {"target": dict(profile.tvm_target), "host": dict(profile.tvm_host) if profile.tvm_host else None}


def read_meta(d: Path) -> dict[str, Any] | None:
    """A database directory's meta.json, or None when it has none."""
    path = d / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(meta, dict) or meta.get("schema") != META_SCHEMA:
        raise UsageError(f"{path} is not a tvm-hybrid tuning-log meta file (schema {META_SCHEMA})")
    return meta


def mismatch(meta: dict[str, Any] | None, profile: TargetProfile, d: Path) -> str | None:
    """Why the database in ``d`` must not be used for ``profile``, or None."""
    has_db = (d / RECORDS).exists() or (d / WORKLOADS).exists()
    if meta is None:
        return f"{d} has a MetaSchedule database but no {META}, so its target is unknown" if has_db else None
    if meta.get("target") != profile_target(profile):
        return (
            f"{d} was tuned for TVM target {json.dumps(meta.get('target'), sort_keys=True)}, "
            f"but profile {profile.name} is {json.dumps(profile_target(profile), sort_keys=True)}"
        )
    have = versions()["tvm"]
    made = str(meta.get("tvm", ""))
    if _minor(made) != _minor(have):
        return f"{d} was tuned with TVM {made}; this is TVM {have}, whose schedules may differ"
    return None


def write_meta(d: Path, meta: dict[str, Any]) -> None:
    tmp = d / f".{META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, d / META)


@contextlib.contextmanager
def locked(d: Path):
    """One tuning run per database: two writers would interleave workload indices."""
    import fcntl

    path = d / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UsageError(
                f"{d} is being tuned by another process (pid {pid}); wait for it, or tune into another --logs DIR"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def complete_lines(path: Path) -> tuple[bytes, bytes]:
    """(the complete JSON lines, a damaged tail) of a database file."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    body, tail = data[:cut], data[cut:]
    # A last line can be complete but cut short if a writer died between write and newline.
    lines = body.splitlines(keepends=True)
    while lines:
        try:
            json.loads(lines[-1])
            break
        except ValueError:
            tail = lines.pop() + tail
    return b"".join(lines), tail


def repair(d: Path) -> None:
    """Cut a record a killed run left half-written; the cut bytes are kept beside the file."""
    for name in (WORKLOADS, RECORDS):
        path = d / name
        if not path.is_file():
            continue
        body, tail = complete_lines(path)
        if tail:
            keep = path.with_name(f"{name}.partial-{int(time.time())}")
            keep.write_bytes(tail)
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, path)
            log.warning("%s ended in a half-written line (a killed run); cut it, kept in %s", path, keep.name)


def json_database(d: Path, allow_missing: bool):
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(d), allow_missing=allow_missing, module_equality="structural")
    except Exception as e:  # a line MetaSchedule cannot parse: the file was edited or damaged
        msg = str(e).strip().splitlines()
        raise UsageError(f"tuning database {d} cannot be read ({msg[0][:200] if msg else type(e).__name__}); "
                         "move it away and tune again") from e


@dataclasses.dataclass
class TuningLog:
    """A target's tuning log opened for a build: the MetaSchedule database, and the default
    schedules' times measured when tuning (a tuned record slower than its default is not applied)."""

    path: Path
    database: Any
    default_ms: dict[int, float]
    #: per kernel, from the last in-model check: (default ms, tuned ms, the checked record's ms)
    in_model: dict[int, tuple[float, float, float]] = dataclasses.field(default_factory=dict)
    #: per kernel, the CPU model that check ran on (logs from before it was recorded have none)
    in_model_cpu: dict[int, str] = dataclasses.field(default_factory=dict)
    #: this machine's CPU model when it runs the log's target natively, else "" (a cross build,
    #: or an unknown CPU): a verdict taken on another CPU model then does not hold here
    local_cpu: str = ""

    def checked_elsewhere(self, key: int) -> str:
        """The CPU model the in-model check timed this kernel on, when that is another model than
        this machine's and this machine runs the target; else "". A tuned record whose verdict
        came from another CPU model is not applied here until ``tvm-hybrid tune`` checks it
        here: in place, a record's speed depends on the CPU's caches and vector units (on PP-OCR
        cls, 23 of 29 records that won alone lost in the model on the machine that tuned them)."""
        cpu = self.in_model_cpu.get(key, "")
        return cpu if cpu and self.local_cpu and cpu != self.local_cpu else ""

    def slower_in_model(self, key: int, record_ms: float) -> bool:
        """Whether the in-model check found this record slower in place than the default schedule.

        The verdict holds for the record it timed only: a later, faster record is applied
        until a check times it.
        """
        seen = self.in_model.get(key)
        return seen is not None and abs(seen[2] - record_ms) <= 1e-9 * max(1.0, record_ms) and seen[1] >= seen[0]


def read_defaults(d: Path) -> dict[int, float]:
    return {k: float(v["ms"]) for k, v in read_defaults_file(d).items()}


def _read_in_model(d: Path) -> tuple[dict[int, tuple[float, float, float]], dict[int, str]]:
    out, cpus = {}, {}
    for k, v in read_defaults_file(d).items():
        m = v.get("in_model")
        if isinstance(m, dict):
            try:
                out[k] = (float(m["default_ms"]), float(m["tuned_ms"]), float(m["record_ms"]))
            except (KeyError, TypeError, ValueError):
                continue
            if isinstance(m.get("cpu"), str) and m["cpu"]:
                cpus[k] = m["cpu"]
    return out, cpus


def read_defaults_file(d: Path) -> dict[int, dict]:
    try:
        data = json.loads((d / DEFAULTS).read_text())
        return {int(k): v for k, v in data.items() if isinstance(v, dict) and "ms" in v}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring %s (%s): tuned kernels are applied without comparing to defaults", d / DEFAULTS, e)
        return {}


def write_defaults(d: Path, tasks, defaults: list[float | None]) -> None:
    import tvm_ffi

    path = d / DEFAULTS
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    for task, ms_ in zip(tasks, defaults):
        if ms_ is not None:
            key = str(tvm_ffi.structural_hash(task.dispatched[0]))
            old = data.get(key) if isinstance(data.get(key), dict) else {}
            # A new default time invalidates the in-model verdict taken against the old one.
            keep = {"in_model": old["in_model"]} if "in_model" in old and old.get("ms") == ms_ else {}
            data[key] = {"kernel": task.task_name, "ms": ms_, **keep}
    write_defaults_file(d, data)


def write_defaults_file(d: Path, data: dict) -> None:
    tmp = d / f".{DEFAULTS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, d / DEFAULTS)


def open_database(logs: Path | None, profile: TargetProfile) -> TuningLog | None:
    """The target's tuning log for a build, or None (no logs, none for this target, or not usable).

    A database made for another TVM target or another TVM minor version is not applied:
    a warning says so, and every kernel falls back to its default schedule.
    """
    if logs is None:
        return None
    d = target_dir(logs, profile)
    if not (d / RECORDS).is_file() and profile.tuning_log_from:
        # A CPU-level superset (AVX-512 VNNI over AVX-512): the other profile's records are
        # schedules for the same kernels, and its code runs on every CPU of this profile.
        from ..hostcpu import x86_features
        from ..targets import resolve

        base = resolve(profile.tuning_log_from)
        if base.tvm_target.get("mtriple") == profile.tvm_target.get("mtriple") and \
                x86_features(base.tvm_target) <= x86_features(profile.tvm_target):  # fmt: skip
            log.debug("no tuning log for %s: using %s's", profile.name, base.name)
            profile, d = base, target_dir(logs, base)
    if not (d / RECORDS).is_file():
        log.debug("no tuning log for %s in %s", profile.name, logs)
        return None
    problem = mismatch(read_meta(d), profile, d)
    if problem:
        log.warning("not applying tuning log: %s", problem)
        return None
    body_w, tail_w = complete_lines(d / WORKLOADS) if (d / WORKLOADS).is_file() else (b"", b"")
    body_r, tail_r = complete_lines(d / RECORDS)
    if not tail_w and not tail_r:
        db = json_database(d, allow_missing=False)
    else:
        # A run is writing (or was killed mid-line): read the complete lines from a copy.
        with tempfile.TemporaryDirectory(prefix="tvm-hybrid-db-") as tmp:
            Path(tmp, WORKLOADS).write_bytes(body_w)
            Path(tmp, RECORDS).write_bytes(body_r)
            db = json_database(Path(tmp), allow_missing=False)
    in_model, cpus = _read_in_model(d)
    from ..hostcpu import cpu_model, needs_emulation
    from . import backends

    local = cpu_model() if backends.for_profile(profile).cpu and not needs_emulation(profile.to_dict()) else ""
    return TuningLog(path=d, database=db, default_ms=read_defaults(d), in_model=in_model, in_model_cpu=cpus,
                     local_cpu=local)  # fmt: skip
