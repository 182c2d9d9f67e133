"""Open an artifact (directory or .tar): safe unpacking, manifest, checksums, version check."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from .. import manifest as mf
from ..errors import ArtifactError
from ._tvm import versions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Artifact:
    """A verified artifact on disk. ``close()`` removes the unpacked copy of a .tar."""

    root: Path
    manifest: dict[str, Any]
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def inputs(self) -> list[mf.TensorSpec]:
        return [mf.TensorSpec.from_dict(t) for t in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[mf.TensorSpec]:
        return [mf.TensorSpec.from_dict(t) for t in self.manifest["outputs"]]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def open_artifact(path: str | Path) -> Artifact:
    """Open, unpack if needed, validate and checksum an artifact; raises ArtifactError."""
    path = Path(path)
    tmp = None
    if path.is_dir():
        root = path
    elif path.is_file() and tarfile.is_tarfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="tvm-hybrid-")
        root = Path(tmp.name)
        try:
            safe_extract(path, root)
        except BaseException:
            tmp.cleanup()
            raise
        # A tar of the directory holds one top folder with the manifest; accept both layouts.
        if not (root / mf.MANIFEST).exists():
            subs = [p for p in root.iterdir() if p.is_dir()]
            if len(subs) == 1 and (subs[0] / mf.MANIFEST).exists():
                root = subs[0]
    elif path.exists():
        raise ArtifactError(f"{path} is neither an artifact directory nor a .tar of one")
    else:
        raise ArtifactError(f"artifact {path} does not exist; compile one with `tvm-hybrid compile MODEL -o DIR`")
    try:
        m = mf.read(root)
        check_versions(m)
        mf.verify_files(root, m)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return Artifact(root=root, manifest=m, _tmp=tmp)


def check_versions(m: dict[str, Any]) -> None:
    """Refuse artifacts built by a TVM whose runtime ABI this one may not load."""
    from .executors import NEEDS_TVM

    if not any(seg.get("format", "tvm-vm") in NEEDS_TVM for seg in m["segments"] if seg["placement"] == "device"):
        return  # e.g. wgsl-plan segments run on wgpu alone: no TVM on the device
    built = m["versions"].get("tvm", "")
    here = versions()["tvm"]
    if _minor(built) != _minor(here):
        raise ArtifactError(
            f"artifact was built with TVM {built or '?'}, this runtime loads TVM {_minor(here)}.x artifacts; "
            "recompile the model with this version, or install the runtime it was built with"
        )


def _minor(v: str) -> str:
    return ".".join(v.split(".")[:2])


def safe_extract(tar_path: Path, dest: Path) -> None:
    """Extract plain files and directories only; anything else (links, devices, escapes) is refused."""
    try:
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
            for m in members:
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts or m.name.startswith(("/", "\\")):
                    raise ArtifactError(f"{tar_path}: member {m.name!r} escapes the artifact; refusing to unpack")
                if not (m.isfile() or m.isdir()):
                    raise ArtifactError(
                        f"{tar_path}: member {m.name!r} is a link or special file; artifacts hold plain files only"
                    )
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArtifactError(f"{tar_path} is not a readable artifact tar: {e}") from e
