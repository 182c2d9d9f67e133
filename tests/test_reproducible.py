"""Reproducible builds: the same model compiled twice for the same target gives identical bytes.

The second build runs in another process with another working directory, temp directory
(TMPDIR, where export_library writes its objects) and string hash seed, into another output
directory; the manifests must be byte-identical and every file's sha256 equal.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLS, TARGET


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _compile_elsewhere(tmp: Path, model: Path, inputs: dict, tag: str, seed: str) -> Path:
    cwd, tmpdir, out = tmp / f"cwd-{tag}", tmp / f"tmp-{tag}", tmp / f"out-{tag}"
    cwd.mkdir()
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONHASHSEED": seed}
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_hybrid", "compile", str(model), "-t", TARGET, "-o", str(out),
         *(a for k, v in inputs.items() for a in ("--input", f"{k}:{'x'.join(map(str, v))}"))],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out / TARGET


def _assert_same(a: Path, b: Path) -> None:
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    da, db = _digests(a), _digests(b)
    assert da == db, {k: (da.get(k), db.get(k)) for k in set(da) | set(db) if da.get(k) != db.get(k)}
    assert "segments/0.so" in da


def test_zoo_model_builds_reproducibly(zoo_files, tmp_path):
    z, path = zoo_files("resnet_block")
    a = _compile_elsewhere(tmp_path, path, z.input_shapes, "a", "1")
    b = _compile_elsewhere(tmp_path, path, z.input_shapes, "b", "2")
    _assert_same(a, b)


@pytest.mark.slow
def test_ppocr_classifier_builds_reproducibly(artifacts, tmp_path):
    """The shared in-process build (tests' cache) and a fresh CLI build elsewhere are identical."""
    a = artifacts.get(CLS, {"x": (1, 3, 48, 192)})
    b = _compile_elsewhere(tmp_path, CLS, {"x": (1, 3, 48, 192)}, "b", "3")
    _assert_same(a, b)
