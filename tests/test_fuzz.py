"""CI-sized fuzzing: malformed models, artifacts, manifests, tars and signatures end cleanly.

The cases come from scripts/fuzz.py (hypothesis, derandomized so CI runs the same cases each
time); `python scripts/fuzz.py --cases 1000` runs a bigger, random campaign. A clean ending is
an exit code from the contract (0 only when a mutation left a valid input; never 1 = internal
error), one `Error: ` line on stderr, no traceback, and no artifact left behind.
"""

from __future__ import annotations

import sys

import pytest
from conftest import HERE

sys.path.insert(0, str(HERE.parent / "scripts"))
import fuzz  # noqa: E402

N_CASES = 100  # per family, spread evenly over the case kinds; about a minute in all on 2 cores


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.delenv("TVM_HYBRID_VERIFY_KEY", raising=False)
    return fuzz.Fuzzer(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _report(fz: fuzz.Fuzzer, family: str) -> None:
    print(f"\n{family}: {len(fz.outcomes)} cases\n{fz.table()}")


def test_malformed_models_end_cleanly(fuzzer):
    fuzzer.outcomes.clear()
    fuzzer.onnx_cases(N_CASES, raise_on_problem=True)
    _report(fuzzer, "compile")
    codes = [o.code for o in fuzzer.outcomes]
    assert len(codes) >= 0.9 * N_CASES  # hypothesis stops a kind early when it has no more distinct cases
    # The generators aim at invalid models: most must be refused, both as bad input and unsupported.
    assert sum(c != 0 for c in codes) >= 0.7 * N_CASES, fuzzer.table()
    assert {2, 3} <= set(codes), fuzzer.table()
    assert {o.kind for o in fuzzer.outcomes} == set(fuzz.ONNX_KINDS)


def test_malformed_artifacts_end_cleanly(fuzzer):
    fuzzer.outcomes.clear()
    fuzzer.artifact_cases(N_CASES, raise_on_problem=True)
    # Structured manifest edits are the richest kind: some more of them.
    fuzzer.artifact_cases(N_CASES // 2, raise_on_problem=True, kinds=("manifest-json",))
    _report(fuzzer, "run")
    codes = [o.code for o in fuzzer.outcomes]
    assert len(codes) >= N_CASES  # kinds with few distinct cases (a FIFO manifest) stop early
    assert sum(c == 4 for c in codes) >= 0.6 * len(codes), fuzzer.table()
    assert {o.kind.split(":")[0] for o in fuzzer.outcomes} == set(fuzz.ARTIFACT_KINDS)


@pytest.mark.parametrize(
    "name",
    ["constant-2**60", "conv-group-0", "random-bytes", "tar-bomb", "signed-by-other-key"],
)
def test_real_processes_end_cleanly(fuzzer, tmp_path, name):
    """A few cases in a real `tvm-hybrid` process: native crashes and native stderr would show here.

    constant-2**60 crashed TVM's constant folder (heap corruption, SIGABRT) before the importer
    checked sizes; conv-group-0 made TVM print a native warning after the error line.
    """
    import tarfile

    import numpy as np
    from onnx import helper, numpy_helper

    if name in ("constant-2**60", "conv-group-0", "random-bytes"):
        m = fuzz.base_model()
        g = m.graph
        if name == "constant-2**60":
            g.initializer.append(numpy_helper.from_array(np.array([1 << 20] * 3, np.int64), "big_shape"))
            g.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["big"]))
            g.node.append(helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=0))
            g.node.append(helper.make_node("Add", ["prob", "big_sum"], ["out"]))
            g.output[0].name = "out"
            data, want = m.SerializeToString(), 3
        elif name == "conv-group-0":
            next(a for a in g.node[0].attribute if a.name == "group").i = 0
            data, want = m.SerializeToString(), 3
        else:
            data, want = bytes(np.random.RandomState(1).randint(0, 256, 300, dtype=np.uint8)), 2
        model = tmp_path / "m.onnx"
        model.write_bytes(data)
        argv = ["compile", str(model), "-t", "x86-64-avx2", *fuzz.BASE_INPUT, "-o", str(tmp_path / "out")]
    elif name == "tar-bomb":
        tar = tmp_path / "bomb.tar"
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
            tf.add(fuzzer.artifact / "manifest.json", arcname="manifest.json")
            info = tarfile.TarInfo("segments/0.so")
            info.size = 1 << 40
            tf.addfile(info)  # the header claims a terabyte; no data follows
        argv, want = ["run", str(tar), "--input", f"x={fuzzer.feed}"], 4
    else:
        import shutil

        from tvm_hybrid.signing import sign_artifact

        art = tmp_path / "art"
        shutil.copytree(fuzzer.artifact, art)
        sign_artifact(art, fuzzer.keys / "other.key")
        argv = ["run", str(art), "--input", f"x={fuzzer.feed}", "--verify-key", str(fuzzer.keys / "release.key.pub")]
        want = 4
    code, stderr = fuzz.run_cli(argv, isolate=True, timeout=300)
    assert code == want, stderr
    assert fuzz.problem_with(code, stderr, {want}) is None, stderr
    assert not (tmp_path / "out").exists()
