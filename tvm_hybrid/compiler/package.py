"""compile: import once, build per target, write each artifact atomically."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from .. import __version__
from .. import manifest as mf
from ..errors import UsageError
from ..targets import TargetProfile, resolve
from . import analysis, build, importer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Everything `tvm-hybrid compile` needs, resolved before the long work starts."""

    model: Path
    targets: tuple[str, ...]
    output: Path
    inputs: tuple[importer.InputOverride, ...] = ()


@dataclasses.dataclass
class ArtifactSummary:
    target: str
    path: Path
    files: int
    bytes: int
    segments: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def compile_model(opts: CompileOptions) -> list[ArtifactSummary]:
    """Build one artifact per target under ``opts.output``; nothing is left behind on failure."""
    if not opts.targets:
        raise UsageError("no --target given; run `tvm-hybrid targets` to list them, or use --target host")
    profiles = [resolve(t) for t in opts.targets]
    names = [p.name for p in profiles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"target {', '.join(dup)} given twice (host resolves to {resolve('host').name})")
    imported = importer.load(opts.model, list(opts.inputs))
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    summaries = []
    try:
        for prof in profiles:
            t0 = time.perf_counter()
            stage = Path(tempfile.mkdtemp(prefix=f".{prof.name}.tmp-", dir=out))
            stage.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
            staged.append((stage, out / prof.name))
            m = build_artifact(imported, prof, stage)
            summaries.append(
                ArtifactSummary(
                    target=prof.name,
                    path=out / prof.name,
                    files=len(m["files"]) + 1,
                    bytes=sum(f["size"] for f in m["files"]),
                    segments=len(m["segments"]),
                    seconds=round(time.perf_counter() - t0, 2),
                )
            )
        for stage, final in staged:
            _replace_dir(stage, final)
    except BaseException:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
        if created:  # a failed compile leaves no trace, not even an empty output directory
            shutil.rmtree(out, ignore_errors=True)
        raise
    return summaries


def _replace_dir(stage: Path, final: Path) -> None:
    """Swap the staged directory in; an older artifact is removed only after the rename."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_artifact(imported: importer.ImportedModel, profile: TargetProfile, root: Path) -> dict[str, Any]:
    """Compile the whole model as one device segment into ``root``; returns the manifest."""
    unsupported = importer.unsupported_ops(imported, profile.capacity.get("unsupported_ops", []))
    if unsupported:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"unsupported ops for target {profile.name}: {', '.join(unsupported)}")
    log.info("building %s for %s", imported.name, profile.name)
    mod = importer.to_relax(imported)
    mod = build.optimize(mod, profile)
    lib_rel = "segments/0.so"
    result = build.build(mod, profile, root / lib_rel)
    infos = analysis.analyze(imported, profile)
    flops = sum(i.flops for i in infos)
    moved = sum(i.param_bytes + i.activation_bytes for i in infos)
    segment = {
        "id": 0,
        "placement": "device",
        "format": "tvm-vm",
        "library": lib_rel,
        "nodes": [i.name for i in infos],
        "inputs": [t.to_dict() for t in imported.inputs],
        "outputs": [t.to_dict() for t in imported.outputs],
        "predicted": {"flops": flops, "ms": round(analysis.predicted_ms(flops, moved, profile), 4)},
        "kernels": {"tuned": result.tuned_kernels, "default": result.default_kernels},
    }
    import tvm
    import tvm_ffi

    manifest = {
        "schema": mf.SCHEMA,
        "tool": {"name": "tvm-hybrid", "version": __version__},
        "versions": {
            "tvm_hybrid": __version__,
            "tvm": tvm.__version__,
            "tvm_ffi": getattr(tvm_ffi, "__version__", ""),
            "onnx": onnx.__version__,
        },
        "model": {"name": imported.name, "sha256": imported.sha256, "opset": imported.opset},
        "inputs": [t.to_dict() for t in imported.inputs],
        "outputs": [t.to_dict() for t in imported.outputs],
        "target": profile.to_dict(),
        "segments": [segment],
        "files": [mf.file_entry(root, lib_rel)],
    }
    mf.validate(manifest)
    (root / mf.MANIFEST).write_text(mf.dumps(manifest))
    return manifest
