"""Artifact manifest: schema, validation, file hashes. Standard library only (the runtime loads it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .errors import ArtifactError

SCHEMA = "tvm-hybrid/artifact@1"
MANIFEST = "manifest.json"
# Manifest schemas this version reads; anything else is refused with the list.
READABLE_SCHEMAS = (SCHEMA,)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


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
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ArtifactError(f"{artifact_dir} is not an artifact: no {MANIFEST} in it") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    validate(m, str(path))
    return m


def validate(m: Any, where: str = MANIFEST) -> None:
    """Check the manifest's shape; every field the runtime reads must be there and typed."""
    if not isinstance(m, dict):
        raise ArtifactError(f"{where}: manifest must be a JSON object")
    schema = m.get("schema")
    if schema not in READABLE_SCHEMAS:
        raise ArtifactError(
            f"{where}: schema {schema!r} is not one this runtime reads ({', '.join(READABLE_SCHEMAS)}); "
            "recompile the model with a matching tvm-hybrid"
        )
    _need(m, "model", dict, where)
    _need(m, "inputs", list, where)
    _need(m, "outputs", list, where)
    _need(m, "segments", list, where)
    _need(m, "files", list, where)
    _need(m, "versions", dict, where)
    _need(m, "target", dict, where)
    for key in ("inputs", "outputs"):
        for t in m[key]:
            _tensor(t, f"{where}: {key}")
    if not m["segments"]:
        raise ArtifactError(f"{where}: no segments")
    for i, seg in enumerate(m["segments"]):
        w = f"{where}: segment {i}"
        if not isinstance(seg, dict):
            raise ArtifactError(f"{w} must be an object")
        for k, typ in (("id", int), ("placement", str), ("inputs", list), ("outputs", list)):
            _need(seg, k, typ, w)
        if seg["placement"] not in ("device", "cloud"):
            raise ArtifactError(f"{w}: placement must be 'device' or 'cloud', not {seg['placement']!r}")
        for t in seg["inputs"] + seg["outputs"]:
            _tensor(t, w)
    paths = set()
    for f in m["files"]:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("sha256"), str):
            raise ArtifactError(f"{where}: every files[] entry needs path and sha256")
        p = f["path"]
        if p.startswith("/") or ".." in Path(p).parts or "\\" in p:
            raise ArtifactError(f"{where}: file path {p!r} escapes the artifact")
        paths.add(p)
    for i, seg in enumerate(m["segments"]):
        for key in ("library", "fallback_library", "onnx"):
            lib = seg.get(key)
            if lib is not None and lib not in paths:
                raise ArtifactError(f"{where}: segment {i} {key} {lib!r} is not among the listed files")
        if seg["placement"] == "device" and "library" not in seg:
            raise ArtifactError(f"{where}: device segment {i} names no library")
        ep = seg.get("endpoint")
        if ep is not None and not (isinstance(ep, dict) and isinstance(ep.get("model"), str)
                                   and isinstance(ep.get("version"), str)):  # fmt: skip
            raise ArtifactError(f"{where}: segment {i} endpoint needs model and version")
        if seg["placement"] == "cloud" and ep is None:
            raise ArtifactError(f"{where}: cloud segment {i} names no endpoint")


def _need(d: dict, key: str, typ: type, where: str) -> None:
    if key not in d:
        raise ArtifactError(f"{where}: missing {key!r}")
    if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
        raise ArtifactError(f"{where}: {key!r} must be a {typ.__name__}")


def _tensor(t: Any, where: str) -> None:
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str):
        raise ArtifactError(f"{where}: tensor entries need name and dtype")
    shape = t.get("shape")
    if shape is not None and (
        not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)
    ):
        raise ArtifactError(f"{where}: tensor {t['name']!r} has a bad shape {shape!r}")


def verify_files(artifact_dir: Path, m: dict[str, Any]) -> None:
    """Check every listed file's sha256 before anything is loaded."""
    root = Path(artifact_dir)
    for f in m["files"]:
        p = root / f["path"]
        if not p.is_file():
            raise ArtifactError(f"artifact file {f['path']} is missing from {root}")
        if p.is_symlink():
            raise ArtifactError(f"artifact file {f['path']} is a symbolic link; artifacts hold plain files")
        digest = sha256_file(p)
        if digest != f["sha256"]:
            raise ArtifactError(
                f"artifact file {f['path']} fails its checksum (sha256 {digest[:12]}…, manifest says "
                f"{f['sha256'][:12]}…): the artifact was modified or damaged; recompile or re-download it"
            )
