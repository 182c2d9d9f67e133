"""A portable x86-64 artifact carries AVX2 and AVX-512 builds too (the profile's ``dispatch``);
the runtime loads the best one this CPU runs, the SSE4.2 build where it runs none of them or
where ``TVM_HYBRID_DISPATCH=0``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_close, cli, reference

from tvm_hybrid import hostcpu
from tvm_hybrid.errors import ArtifactError
from tvm_hybrid.manifest import Manifest


@pytest.fixture(scope="module")
def portable(tmp_path_factory, zoo_files):
    z, path = zoo_files("resnet_block")
    out = tmp_path_factory.mktemp("portable")
    shape = "x".join(map(str, z.input_shapes["input"]))
    cli("compile", str(path), "--input", f"input:{shape}", "-t", "x86-64", "--cloud", "none", "-o", str(out), check=True)
    return out / "x86-64", z


def _run(art, z, tmp_path, env=None):
    import os
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", z.feeds["input"])
    proc = subprocess.run([sys.executable, "-m", "tvm_hybrid", "run", str(art), "--input", f"input={tmp_path / 'x.npy'}",
                           "--output-dir", str(tmp_path / "out"), "--json"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    return doc["trace"][0]["build"], {name: np.load(o["file"]) for name, o in doc["outputs"].items()}


def test_portable_artifact_lists_its_cpu_level_builds(portable):
    art, _ = portable
    m = Manifest.from_dict(json.loads((art / "manifest.json").read_text()))
    [seg] = m.segments
    assert seg.library == "segments/0.so"
    assert [v["profile"] for v in seg.variants] == ["x86-64-avx512", "x86-64-avx2"]
    files = {f.path for f in m.files}
    assert {v["library"] for v in seg.variants} <= files
    assert all((art / v["library"]).is_file() for v in seg.variants)
    assert seg.variants[0]["tvm_target"]["mcpu"] != seg.variants[1]["tvm_target"]["mcpu"]
    # the weights once, out of the three libraries, in a file every build reads
    assert seg.weights["file"] in files and seg.weights["keys"]
    assert all(v["weights"] == seg.weights["keys"] for v in seg.variants)
    with np.load(art / seg.weights["file"]) as z:
        assert set(z.files) == set(seg.weights["keys"])
        weight_bytes = sum(z[k].nbytes for k in z.files)
    z_model = portable[1].model
    assert weight_bytes >= 0.9 * sum(np.prod(t.dims) * 4 for t in z_model.graph.initializer if len(t.dims) == 4)


def test_runtime_loads_the_best_build_this_cpu_runs(portable, tmp_path):
    art, z = portable
    m = json.loads((art / "manifest.json").read_text())
    best = hostcpu.pick_variant(m["segments"][0]["variants"])
    build, got = _run(art, z, tmp_path)
    assert build == (best["profile"] if best else "x86-64")
    want = reference(z.model, z.feeds)
    assert_close({k: got[k] for k in want}, want, z.rtol, z.atol)
    build, got = _run(art, z, tmp_path, {"TVM_HYBRID_DISPATCH": "0"})
    assert build == "x86-64"
    assert_close({k: got[k] for k in want}, want, z.rtol, z.atol)


def test_pick_variant_by_cpu_flags():
    v512 = {"profile": "a", "library": "a.so", "tvm_target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                                                 "mcpu": "skylake-avx512"}}  # fmt: skip
    v2 = {"profile": "b", "library": "b.so", "tvm_target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                                               "mcpu": "haswell"}}  # fmt: skip
    arm = {"profile": "c", "library": "c.so", "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}
    if hostcpu.host_arch() != "x86_64":
        pytest.skip("x86 flags")
    avx2 = frozenset({"ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"})
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert hostcpu.pick_variant([arm, v512, v2], avx512) is v512
    assert hostcpu.pick_variant([v512, v2], avx2) is v2
    assert hostcpu.pick_variant([v512, v2], frozenset({"sse4_2", "popcnt"})) is None
    assert hostcpu.pick_variant([v512, v2], frozenset()) is None  # features unknown: the portable build


def test_a_variant_outside_the_files_is_an_invalid_manifest(portable):
    art, _ = portable
    m = json.loads((art / "manifest.json").read_text())
    m["segments"][0]["variants"][0]["library"] = "segments/missing.so"
    with pytest.raises(ArtifactError, match="variants"):
        Manifest.from_dict(m)
