"""Open an artifact (directory or .tar): safe unpacking, manifest, checksums, version check."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from .. import manifest as mf
from ..errors import ArtifactError, one_line
from ._tvm import versions

log = logging.getLogger(__name__)

# A .tar artifact is unpacked before anything is checked; these caps keep a hostile one (a "tar
# bomb" declaring huge or countless members) from filling the disk or memory first.
MAX_TAR_BYTES_ENV = "TVM_HYBRID_MAX_ARTIFACT_BYTES"
MAX_TAR_BYTES = 8 << 30
MAX_TAR_MEMBERS = 10_000


@dataclasses.dataclass
class Artifact:
    """A verified artifact on disk. ``close()`` removes the unpacked copy of a .tar."""

    root: Path
    manifest: mf.Manifest
    signed_by: str | None = None  # the key id whose signature was verified, if one was required
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def inputs(self) -> list[mf.TensorSpec]:
        return list(self.manifest.inputs)

    @property
    def outputs(self) -> list[mf.TensorSpec]:
        return list(self.manifest.outputs)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def open_artifact(path: str | Path, verify_key=None, *, use_env: bool = True) -> Artifact:
    """Open, unpack if needed, validate and checksum an artifact; raises ArtifactError.

    ``verify_key`` (a public key file, or PEM bytes) requires a valid ``manifest.sig`` made with
    its private key; without it, ``$TVM_HYBRID_VERIFY_KEY`` is used when set (``use_env``).
    The signature is checked on the manifest bytes before they are parsed, and the manifest
    pins every file's sha256, so nothing unsigned is ever loaded.
    """
    path = Path(path)
    if isinstance(verify_key, str) and not verify_key:  # an empty setting is no setting, as in the env
        verify_key = None
    if verify_key is None and use_env:
        from ..signing import key_from_env

        verify_key = key_from_env()
    tmp = None
    if path.is_dir():
        root = path
    elif path.is_file() and _is_tar(path):
        tmp = tempfile.TemporaryDirectory(prefix="tvm-hybrid-")
        root = Path(tmp.name)
        try:
            safe_extract(path, root)
        except BaseException:
            tmp.cleanup()
            raise
        # A tar of the directory holds one top folder with the manifest; accept both layouts.
        if not (root / mf.MANIFEST).exists():
            entries = list(root.iterdir())
            if len(entries) == 1 and entries[0].is_dir() and (entries[0] / mf.MANIFEST).exists():
                root = entries[0]
    elif path.exists():
        raise ArtifactError(f"{path} is neither an artifact directory nor a .tar of one")
    else:
        raise ArtifactError(f"artifact {path} does not exist; compile one with `tvm-hybrid compile MODEL -o DIR`")
    try:
        data = mf.read_bytes(root)
        signed_by = None
        if verify_key is not None:
            from ..signing import verify_artifact_signature

            signed_by = verify_artifact_signature(root, data, verify_key)
        m = mf.loads(data, str(root / mf.MANIFEST))
        check_versions(m)
        mf.verify_files(root, m)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return Artifact(root=root, manifest=m, signed_by=signed_by, _tmp=tmp)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from e


def check_versions(m: mf.Manifest) -> None:
    """Refuse artifacts built by a TVM whose runtime ABI this one may not load.

    Policy: the manifest schema's major (checked by manifest.validate) is the tool's contract;
    the TVM major.minor must match this runtime's, since TVM keeps no ABI promise across minors
    (a .so built by 0.26 calls runtime functions 0.27 may have renamed).
    """
    from .executors import NEEDS_TVM

    if not any((seg.format or mf.FORMAT_TVM_VM) in NEEDS_TVM for seg in m.segments if seg.placement == "device"):
        return  # e.g. wgsl-plan segments run on wgpu alone: no TVM on the device
    built = m.versions.get("tvm", "")
    here = versions()["tvm"]
    if _minor(built) != _minor(here):
        from .. import __version__

        raise ArtifactError(
            f"artifact was built with TVM {built[:40] or '?'}, this runtime (tvm-hybrid {__version__}) loads "
            f"TVM {_minor(here)}.x artifacts of schema {', '.join(mf.READABLE_SCHEMAS)}; "
            "recompile the model with this version, or install the runtime it was built with"
        )


def _minor(v: str) -> str:
    return ".".join(v.split(".")[:2])


def safe_extract(tar_path: Path, dest: Path, max_bytes: int | None = None) -> None:
    """Extract plain files and directories only; anything else (links, devices, escapes) is refused.

    Members are checked as they are read, so a tar declaring more than ``max_bytes`` in all
    (``$TVM_HYBRID_MAX_ARTIFACT_BYTES``, 8 GiB by default) or more than MAX_TAR_MEMBERS members
    is refused before it is unpacked.
    """
    if max_bytes is None:
        max_bytes = _max_tar_bytes()
    total = 0
    seen: set[str] = set()
    try:
        with tarfile.open(tar_path) as tf:
            members = []
            for m in tf:  # streams headers: a member-count bomb stops at the cap
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts or m.name.startswith(("/", "\\")) or "\\" in m.name:
                    raise ArtifactError(f"{tar_path}: member {m.name[:200]!r} escapes the artifact; refusing to unpack")
                if not (m.isfile() or m.isdir()):
                    raise ArtifactError(
                        f"{tar_path}: member {m.name[:200]!r} is a link or special file; artifacts hold plain files only"
                    )
                key = name.as_posix()
                if key in seen and not m.isdir():
                    raise ArtifactError(f"{tar_path}: member {m.name[:200]!r} appears twice; refusing an ambiguous artifact")
                seen.add(key)
                total += m.size
                if len(seen) > MAX_TAR_MEMBERS or total > max_bytes:
                    raise ArtifactError(
                        f"{tar_path} declares more than {MAX_TAR_MEMBERS} members or {max_bytes} bytes; refusing "
                        f"to unpack it (raise {MAX_TAR_BYTES_ENV} for a bigger artifact you trust)"
                    )
                members.append(m)
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                with open(target, "xb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ArtifactError(f"{tar_path} is not a readable artifact tar: {one_line(e)}") from e


def _max_tar_bytes() -> int:
    text = os.environ.get(MAX_TAR_BYTES_ENV, "")
    if not text:
        return MAX_TAR_BYTES
    try:
        value = int(text)
    except ValueError:
        raise ArtifactError(f"{MAX_TAR_BYTES_ENV}={text[:40]!r} is not a number of bytes") from None
    return value
