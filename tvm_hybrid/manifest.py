"""Artifact manifest: schema, validation, file hashes. Standard library only (the runtime loads it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactError

SCHEMA = "tvm-hybrid/artifact@1"
#: Segment formats: a shared library the TVM Relax VM runs; WGSL kernels plus a launch plan
#: (runtime/wgpu_executor.py). The runtime's executor table is keyed by these names.
FORMAT_TVM_VM = "tvm-vm"
FORMAT_WGSL_PLAN = "wgsl-plan"
MANIFEST = "manifest.json"
# The detached signature of manifest.json (tvm_hybrid.signing); it cannot be listed in the
# manifest it signs, so it is the one file besides the manifest an artifact may hold unlisted.
SIGNATURE = "manifest.sig"
RESERVED = (MANIFEST, SIGNATURE)
# Manifest schemas this version reads; anything else is refused with the list. The schema's
# major (the number after @) is the compatibility contract: fields may be added within a major,
# a new major is refused by older runtimes.
READABLE_SCHEMAS = (SCHEMA,)
# A manifest is kilobytes (a few MiB for models with tens of thousands of nodes); a bigger one is
# not ours, and reading it whole would be a way to exhaust memory.
MAX_MANIFEST_BYTES = 32 << 20
# Tensor dtypes an artifact may declare: numpy names, as the runtime compares them.
DTYPES = frozenset({
    "float32", "float16", "float64", "bfloat16", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "bool",
})  # fmt: skip
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a static shape and a numpy dtype name."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape) if self.shape is not None else None, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        shape = d.get("shape")
        return cls(str(d["name"]), tuple(int(x) for x in shape) if shape is not None else None, str(d["dtype"]))


def safe_filename(name: str) -> str:
    """A tensor name as a file name: characters outside [A-Za-z0-9_.-] become ``_``."""
    out = _SAFE_NAME.sub("_", name)
    return "_" + out if out in ("", ".", "..") else out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    """The manifest's record of one file: path, sha256, size."""
    p = root / rel
    return {"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size}


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON (sorted keys, fixed indent) so equal manifests are equal bytes."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def read(artifact_dir: Path) -> dict[str, Any]:
    """Load and validate ``manifest.json``; raises ArtifactError saying what is wrong."""
    path = Path(artifact_dir) / MANIFEST
    return loads(read_bytes(artifact_dir), str(path))


def read_bytes(artifact_dir: Path) -> bytes:
    """The raw bytes of ``manifest.json`` (a regular file, at most MAX_MANIFEST_BYTES).

    A signature covers exactly these bytes, so the caller verifies and parses the same copy.
    """
    path = Path(artifact_dir) / MANIFEST
    st = _lstat(path, f"{artifact_dir} is not an artifact: no {MANIFEST} in it", str(path))
    if not stat.S_ISREG(st.st_mode):
        # A FIFO would block the read forever; a link could point anywhere.
        raise ArtifactError(f"{path} is not a regular file (a link, pipe or device); artifacts hold plain files")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have; "
            "it is not a tvm-hybrid manifest"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} grew past {MAX_MANIFEST_BYTES >> 20} MiB while being read")
    return data


def _lstat(path: Path, missing: str, what: str) -> os.stat_result:
    """``os.lstat``, its errors as one-line ArtifactErrors: ``missing`` when absent."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(missing) from None
    except OSError as e:
        raise ArtifactError(f"cannot read {what}: {e.strerror or e}") from e


def loads(data: bytes, where: str = MANIFEST) -> dict[str, Any]:
    """Parse and validate manifest bytes; raises ArtifactError saying what is wrong."""
    try:
        m = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except ValueError as e:
        raise ArtifactError(f"{where} is not valid JSON: {e}") from e
    except RecursionError as e:  # "[[[[…" nested past Python's limit
        raise ArtifactError(f"{where} is not a manifest: JSON nested too deeply") from e
    validate(m, where)
    return m


def validate(m: Any, where: str = MANIFEST) -> None:
    """Check the manifest's shape; every field the runtime reads must be there, typed and consistent."""
    if not isinstance(m, dict):
        raise ArtifactError(f"{where}: manifest must be a JSON object")
    schema = m.get("schema")
    if schema not in READABLE_SCHEMAS:
        from . import __version__

        raise ArtifactError(
            f"{where}: schema {str(schema)[:80]!r} is not one this runtime (tvm-hybrid {__version__}) reads "
            f"({', '.join(READABLE_SCHEMAS)}); recompile the model with a matching tvm-hybrid"
        )
    _need(m, "model", dict, where)
    _need(m, "inputs", list, where)
    _need(m, "outputs", list, where)
    _need(m, "segments", list, where)
    _need(m, "files", list, where)
    _need(m, "versions", dict, where)
    _need(m, "target", dict, where)
    if not all(isinstance(v, str) for v in m["versions"].values()):
        raise ArtifactError(f"{where}: 'versions' values must be strings")
    tvm_target = m["target"].get("tvm_target")
    if tvm_target is not None and not (isinstance(tvm_target, dict) and isinstance(tvm_target.get("kind"), str)):
        raise ArtifactError(f"{where}: target.tvm_target must be an object with a 'kind'")
    for key in ("inputs", "outputs"):
        _tensors(m[key], f"{where}: {key}")
        for t in m[key]:  # the runtime checks feeds against these: artifacts are static-shaped
            if t.get("shape") is None:
                raise ArtifactError(f"{where}: {key[:-1]} {t['name'][:100]!r} has no shape")
    if not m["outputs"]:
        raise ArtifactError(f"{where}: the model has no outputs")
    paths = _files(m["files"], where)
    if not m["segments"]:
        raise ArtifactError(f"{where}: no segments")
    # Data flow: each segment reads only model inputs or what an earlier segment wrote.
    known = {t["name"] for t in m["inputs"]}
    ids = set()
    for i, seg in enumerate(m["segments"]):
        w = f"{where}: segment {i}"
        if not isinstance(seg, dict):
            raise ArtifactError(f"{w} must be an object")
        for k, typ in (("id", int), ("placement", str), ("inputs", list), ("outputs", list)):
            _need(seg, k, typ, w)
        if seg["id"] in ids:
            raise ArtifactError(f"{w}: id {seg['id']} is used twice")
        ids.add(seg["id"])
        if seg["placement"] not in ("device", "cloud"):
            raise ArtifactError(f"{w}: placement must be 'device' or 'cloud', not {str(seg['placement'])[:40]!r}")
        for k in ("format", "library"):
            if k in seg and not isinstance(seg[k], str):
                raise ArtifactError(f"{w}: {k!r} must be a string")
        _tensors(seg["inputs"], w)
        _tensors(seg["outputs"], w)
        unknown = [t["name"] for t in seg["inputs"] if t["name"] not in known]
        if unknown and not serves_segments(m):
            raise ArtifactError(
                f"{w} reads {', '.join(map(repr, unknown[:5]))}, which neither the model inputs nor an earlier segment provide"
            )
        known.update(t["name"] for t in seg["outputs"])
        for key in ("library", "fallback_library", "onnx"):
            lib = seg.get(key)
            if lib is not None and (not isinstance(lib, str) or lib not in paths):
                raise ArtifactError(f"{w}: {key} {str(lib)[:200]!r} is not among the listed files")
        if seg["placement"] == "device" and "library" not in seg:
            raise ArtifactError(f"{w}: a device segment names no library")
        ep = seg.get("endpoint")
        if ep is not None and not (isinstance(ep, dict) and isinstance(ep.get("model"), str)
                                   and isinstance(ep.get("version"), str)):  # fmt: skip
            raise ArtifactError(f"{w}: endpoint needs model and version")
        if seg["placement"] == "cloud" and ep is None:
            raise ArtifactError(f"{w}: a cloud segment names no endpoint")
    unmade = [t["name"] for t in m["outputs"] if t["name"] not in known]
    if unmade and not serves_segments(m):
        raise ArtifactError(f"{where}: no segment produces the output(s) {', '.join(map(repr, unmade[:5]))}")


def serves_segments(m: dict[str, Any]) -> bool:
    """A cloud artifact: independent segments served by endpoint, not one model run in order."""
    return m.get("role") == "cloud"


def _files(files: list, where: str) -> set[str]:
    """Check files[] entries: a normalized relative path each, once, with a sha256 and a size."""
    paths: set[str] = set()
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("sha256"), str):
            raise ArtifactError(f"{where}: every files[] entry needs path and sha256")
        p = f["path"]
        parts = p.split("/")
        if (
            p.startswith("/")
            or "\\" in p
            or "\0" in p
            or len(p) > 1024
            or any(part in ("", ".", "..") for part in parts)
            or PurePosixPath(p).is_absolute()
        ):
            raise ArtifactError(f"{where}: file path {p[:200]!r} escapes the artifact or is not a normalized relative path")
        if p in RESERVED:
            raise ArtifactError(f"{where}: files[] lists {p}, which cannot be checksummed by the manifest itself")
        if p in paths:
            raise ArtifactError(f"{where}: file {p!r} is listed twice")
        if not _SHA256.match(f["sha256"]):
            raise ArtifactError(f"{where}: file {p!r} has a malformed sha256 (64 lowercase hex digits expected)")
        size = f.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{where}: file {p!r} needs a size in bytes")
        paths.add(p)
    return paths


def _need(d: dict, key: str, typ: type, where: str) -> None:
    if key not in d:
        raise ArtifactError(f"{where}: missing {key!r}")
    if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
        raise ArtifactError(f"{where}: {key!r} must be a {typ.__name__}")


def _tensors(ts: list, where: str) -> None:
    names = set()
    for t in ts:
        _tensor(t, where)
        if t["name"] in names:
            raise ArtifactError(f"{where}: tensor {t['name'][:100]!r} is listed twice")
        names.add(t["name"])


def _tensor(t: Any, where: str) -> None:
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str):
        raise ArtifactError(f"{where}: tensor entries need name and dtype")
    if t["dtype"] not in DTYPES:
        raise ArtifactError(
            f"{where}: tensor {t['name'][:100]!r} has dtype {t['dtype'][:40]!r}; known: {', '.join(sorted(DTYPES))}"
        )
    shape = t.get("shape")
    if shape is not None and (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62 for x in shape)
    ):
        raise ArtifactError(f"{where}: tensor {t['name'][:100]!r} has a bad shape {str(shape)[:100]}")


def verify_files(artifact_dir: Path, m: dict[str, Any]) -> None:
    """Check every listed file (plain, the listed size and sha256) before anything is loaded.

    The artifact may hold nothing else besides the manifest and its signature: an unlisted file
    (a stray .so next to the segment) is refused, so what is on disk is exactly what was signed.
    """
    root = Path(artifact_dir)
    for f in m["files"]:
        rel = f["path"]
        p = root / rel
        # Every component must be a real directory or file: a linked directory would let a
        # checked path lead outside the artifact.
        here = root
        for i, part in enumerate(rel.split("/")):
            here = here / part
            st = _lstat(here, f"artifact file {rel} is missing from {root}; recompile or re-download it",
                        f"artifact file {rel}")
            last = i == rel.count("/")
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"artifact file {rel} is (or is under) a symbolic link; artifacts hold plain files")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise ArtifactError(f"artifact file {rel}: {here.relative_to(root)} is not a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact file {rel} is not a regular file (a directory, pipe or device)")
        if st.st_size != f["size"]:
            raise ArtifactError(
                f"artifact file {rel} is {st.st_size} bytes, the manifest says {f['size']}: "
                "the artifact was modified or damaged; recompile or re-download it"
            )
        digest = sha256_file(p)
        if digest != f["sha256"]:
            raise ArtifactError(
                f"artifact file {rel} fails its checksum (sha256 {digest[:12]}…, manifest says "
                f"{f['sha256'][:12]}…): the artifact was modified or damaged; recompile or re-download it"
            )
    check_no_extra_files(root, m)


def check_no_extra_files(root: Path, m: dict[str, Any]) -> None:
    """Refuse files, links or special files in the artifact that the manifest does not list."""
    listed = {f["path"] for f in m["files"]} | set(RESERVED)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames + filenames:
            p = base / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                continue
            if rel not in listed:
                raise ArtifactError(
                    f"artifact holds {rel!r}, which its manifest does not list; an artifact holds only what the "
                    "compiler wrote: remove it, or recompile"
                )
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"artifact file {rel} is not a regular file (a link, pipe or device)")
