"""ONNX's narrow types (float8 in its five formats, float4, E8M0, int4, int2) through compile and
run: casts into and out of each, bit for bit over every float16 value and random float32 bit
patterns, quantization to and from them (blocked too), and models that take and return them.
The reference is ONNX's own (``onnx.reference``; onnxruntime's Python API takes none of these types)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import zoo
from conftest import cli
from onnx.reference import ReferenceEvaluator

from tvm_hybrid.compiler.package import CompileOptions, compile_model
from tvm_hybrid.dtypes import to_carrier
from tvm_hybrid.errors import UsageError
from tvm_hybrid.runtime import Session


def _compile(z, tmp_path):
    path = tmp_path / f"{z.name}.onnx"
    onnx.save(z.model, path)
    [summary] = compile_model(CompileOptions(model=path, targets=("host",), output=tmp_path / "out", cloud=None,
                                             inputs=(), tuning_logs=None))  # fmt: skip
    return summary.path


def _reference(z) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        outs = ReferenceEvaluator(z.model).run(None, z.feeds)
    return dict(zip([o.name for o in z.model.graph.output], outs))


@pytest.fixture(scope="module")
def casts(tmp_path_factory):
    z = zoo.narrow_casts()
    with Session(_compile(z, tmp_path_factory.mktemp("narrow")), threads=1) as sess:
        return z, sess.run(z.feeds), _reference(z)


def test_casts_to_narrow_types_are_bit_exact(casts):
    z, got, want = casts
    x = z.feeds["x"]
    for name, w in want.items():
        if name.startswith("from_"):
            continue
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.dtype.name.startswith("float"):
            same = g.view(np.uint8) == w.view(np.uint8)
            same |= np.isnan(g.astype(np.float32)) & np.isnan(w.astype(np.float32))  # any NaN code
            if name.startswith("float4"):  # no NaN in float4: ±0 for NaN (ml_dtypes -0, ONNX's reference +0)
                same |= np.isnan(x) & (g.astype(np.float32) == 0) & (w.astype(np.float32) == 0)
        else:
            same = g.astype(np.int8) == w.astype(np.int8)
        bad = np.flatnonzero(~same)
        assert not bad.size, (name, [(x[i], g.view(np.uint8)[i], w.view(np.uint8)[i]) for i in bad[:5]])


def test_casts_from_narrow_floats_give_every_code_value(casts):
    _, got, want = casts
    for name, w in want.items():
        if name.startswith("from_"):
            g = got[name]
            assert g.dtype == w.dtype, name
            np.testing.assert_array_equal(g, w, err_msg=name)  # (NaN == NaN here)


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    z = zoo.narrow_qdq()
    return z, _compile(z, tmp_path_factory.mktemp("narrow_qdq"))


def test_narrow_inputs_outputs_and_quantization(qdq):
    z, art = qdq
    with Session(art, threads=1) as sess:
        assert {s.name: s.dtype for s in sess.inputs} == {"q": "int4", "x": "float32", "f8": "float8_e5m2"}
        got = sess.run(z.feeds)
        want = _reference(z)
        for name, w in want.items():
            assert got[name].dtype == w.dtype, name
            if w.dtype.kind == "f":
                np.testing.assert_allclose(got[name], w, rtol=z.rtol, atol=z.atol, err_msg=name)
            else:
                np.testing.assert_array_equal(got[name].astype(np.float32), w.astype(np.float32), err_msg=name)
        with pytest.raises(UsageError, match="input q must be int4"):
            sess.run({**z.feeds, "q": z.feeds["q"].astype(np.int8)})


def test_run_reads_and_writes_narrow_npy(qdq, tmp_path):
    """.npy has no narrow types: ``run`` reads an input saved from an ml_dtypes array (numpy
    writes its bytes, as void or a descr it cannot read back) or given as its carrier (bit
    patterns as uint8, integers' values as int8), and writes narrow outputs as their carriers."""
    z, art = qdq
    want = _reference(z)
    for form in ("ml_dtypes", "carrier"):
        args = []
        for name, arr in z.feeds.items():
            path = tmp_path / f"{form}_{name}.npy"
            np.save(path, arr if form == "ml_dtypes" else to_carrier(arr, arr.dtype.name))
            args += ["--input", f"{name}={path}"]
        out = tmp_path / form
        proc = cli("run", str(art), *args, "--output-dir", str(out), "--json", check=True)
        doc = json.loads(proc.stdout)
        assert doc["outputs"]["qb"]["dtype"] == "uint4" and doc["outputs"]["qb"]["stored_as"] == "uint8"
        assert doc["outputs"]["qb"]["max"] == float(want["qb"].astype(np.float32).max())
        np.testing.assert_array_equal(np.load(out / "qb.npy"), want["qb"].astype(np.uint8))
        np.testing.assert_array_equal(np.load(out / "f8_out.npy"), z.feeds["f8"].view(np.uint8))
        np.testing.assert_allclose(np.load(out / "f8_twice.npy"), want["f8_twice"])
    np.save(tmp_path / "bad.npy", np.full((4, 6), 9, np.int8))  # 9 is no int4
    proc = cli("run", str(art), "--input", f"q={tmp_path / 'bad.npy'}", *args[2:], "--json")
    assert proc.returncode == 2 and "out of range for int4" in proc.stderr, proc.stderr
