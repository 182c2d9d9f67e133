"""Control flow and state through compile and run, against onnxruntime (rtol 1e-4, atol 1e-5):
If on a run-time condition, Loop and Scan (unrolled at import), LSTM and GRU (one fused kernel
on CPUs, unrolled elsewhere) and RNN (unrolled), a
VAD-shaped model fed its own state for 20 steps, and inputs whose values fix shapes
(``--input NAME=VALUE``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import assert_close, reference
from onnx import TensorProto, helper

from tvm_hybrid.errors import UsageError
from tvm_hybrid.runtime import Session


@pytest.mark.parametrize("name", ["if_runtime", "loop_scan", "crnn_lstm"])
def test_control_flow_model_matches_onnxruntime(name, artifacts, zoo_files):
    z, path = zoo_files(name)
    with Session(artifacts.get(path, z.input_shapes), threads=1) as sess:
        feeds = [z.feeds]
        if name == "if_runtime":  # both branches: the condition is the sign of a mean
            feeds = [z.feeds, {"x": -z.feeds["x"]}, {"x": z.feeds["x"] * 3 + 1}]
        for f in feeds:
            assert_close(sess.run(f), reference(z.model, f), z.rtol, z.atol)


def test_loops_unrolled_at_import_and_lstms_fused_on_cpus(zoo_files):
    from tvm_hybrid.compiler import importer, package
    from tvm_hybrid.targets import resolve

    _, path = zoo_files("loop_scan")
    assert not {"Loop", "Scan"} & set(importer.load(path).op_types)
    _, path = zoo_files("crnn_lstm")
    imported = importer.load(path)
    assert "LSTM" in imported.op_types  # one matmul and one recurrence kernel on CPUs
    assert "LSTM" in package.prepare(imported, resolve("host")).op_types
    gpu = package.prepare(imported, resolve("webgpu")).op_types  # no fused kernel there: unrolled
    assert not {"LSTM", "GRU", "RNN"} & set(gpu) and "MatMul" in gpu


def test_vad_fed_its_own_state_for_20_steps(artifacts, zoo_files):
    """The VAD's state comes back as an output and goes in again; ``sr`` is a scalar input the
    compile needs no dims for, and the If on it picks the front end at run time."""
    import onnxruntime as ort

    z, path = zoo_files("vad")
    ref = ort.InferenceSession(z.model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(7)
    with Session(artifacts.get(path, {}), threads=1) as sess:
        assert [s.shape for s in sess.inputs] == [(1, 256), (2, 1, 32), ()]
        for sr in (16000, 8000):
            state = ref_state = np.zeros((2, 1, 32), np.float32)
            probs = []
            for step in range(20):
                x = (rng.standard_normal((1, 256)) * 0.5).astype(np.float32)
                got = sess.run({"input": x, "state": state, "sr": np.array(sr, np.int64)})
                want = dict(zip(["output", "stateN"], ref.run(None, {"input": x, "state": ref_state, "sr": np.array(sr)})))
                assert_close(got, want, 1e-4, 1e-5)
                state, ref_state = got["stateN"], want["stateN"]
                probs.append(float(got["output"][0, 0]))
            assert np.abs(state).max() > 0.05  # the state really carries from step to step
            assert np.ptp(probs) > 0.01


def _unsqueeze_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 4])
    g = helper.make_graph([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], "g", [x, axes], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_input_value_fixes_a_shape_at_compile_time(tmp_path):
    """An output whose shape depends on an input's value: compile says which input, in one
    line and exit 3; ``--input NAME=VALUE`` fixes it; the artifact refuses another value."""
    model = tmp_path / "unsqueeze.onnx"
    _unsqueeze_model(model)
    cli = [sys.executable, "-m", "tvm_hybrid", "compile", str(model), "-t", "host", "-o", str(tmp_path / "out")]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and "--input axes=VALUE" in r.stderr, r.stderr
    r = subprocess.run([*cli, "--input", "axes=[-2]", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)["artifacts"][0]["path"]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with Session(art) as sess:
        assert sess.inputs[1].value == [-2]
        np.testing.assert_array_equal(sess.run({"x": x, "axes": np.array([-2])})["y"], x[:, None, :])
        with pytest.raises(UsageError, match="fixed to \\[-2\\] at compile time"):
            sess.run({"x": x, "axes": np.array([0])})
    np.save(tmp_path / "axes.npy", np.array([2]))  # a .npy file, as `run --input NAME=FILE.npy`
    cli2 = [*cli[:-1], str(tmp_path / "out2"), "--input", f"axes={tmp_path / 'axes.npy'}", "--json"]
    r = subprocess.run(cli2, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Session(json.loads(r.stdout)["artifacts"][0]["path"]) as sess:
        assert sess.inputs[1].value == [2] and sess.run({"x": x, "axes": np.array([2])})["y"].shape == (3, 4, 1)
    r = subprocess.run([*cli, "--input", "axes=[0.5]"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a value of the input's dtype int64" in r.stderr, r.stderr


def test_constant_outputs_are_carried_as_values(tmp_path):
    """Outputs folded to constants at compile time (a Shape of static dims) are values in the manifest, in the model's output order, beside computed ones; a
    model whose every output is constant compiles to an artifact with no segments, which runs."""
    anchors = np.arange(6, dtype=np.float32).reshape(3, 2)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Identity", ["anchors"], ["anchors_out"])],
        "consts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
         helper.make_tensor_value_info("anchors_out", TensorProto.FLOAT, [3, 2])],
        [onnx.numpy_helper.from_array(anchors, "anchors")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "consts.onnx"
    onnx.save(model, path)
    x = np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)
    r = subprocess.run([sys.executable, "-m", "tvm_hybrid", "compile", str(path), "-t", "host", "-o",
                        str(tmp_path / "out"), "--json"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)["artifacts"][0]["path"]
    manifest = json.loads((tmp_path / "out" / json.loads(r.stdout)["artifacts"][0]["target"] / "manifest.json").read_text())
    assert [(o["name"], o.get("value")) for o in manifest["outputs"][:2]] == [("shape", [2, 5]), ("y", None)]
    assert manifest["outputs"][2]["name"] == "anchors_out"  # (an Identity of a weight: a copy kernel)
    assert len(manifest["segments"]) == 1
    with Session(art) as sess:
        got = sess.run({"x": x})
        assert list(got) == ["shape", "y", "anchors_out"]
        assert_close(got, reference(model, {"x": x}), 0, 0)
    # Every output constant: no segment at all.
    only = helper.make_model(helper.make_graph([helper.make_node("Shape", ["x"], ["shape"])], "shape",
                                               graph.input, [graph.output[0]]), opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    onnx.save(only, tmp_path / "shape.onnx")
    r = subprocess.run([sys.executable, "-m", "tvm_hybrid", "compile", str(tmp_path / "shape.onnx"), "-t", "host",
                        "-o", str(tmp_path / "out2"), "--json"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)["artifacts"][0]["path"]
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "tvm_hybrid", "run", art, "--input", f"x={tmp_path / 'x.npy'}", "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["outputs"]["shape"]["min"] == 2 and doc["outputs"]["shape"]["max"] == 5 and doc["trace"] == []


def _recurrent(op: str, seq: int, batch: int, size: int, hidden: int, layout: int = 0, *, bias=True, initial=True,
               peep=False, lbr=0, acts=None, direction="bidirectional", **extra) -> tuple[onnx.ModelProto, dict]:  # fmt: skip
    """A recurrent ``op`` node alone (bidirectional unless said), every output, and random feeds."""
    rng = np.random.default_rng(3)
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]

    def rand(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x_shape = [batch, seq, size] if layout else [seq, batch, size]
    nd = 2 if direction == "bidirectional" else 1
    state = [batch, nd, hidden] if layout else [nd, batch, hidden]
    inits = [onnx.numpy_helper.from_array(rand(nd, gates * hidden, size), "W"),
             onnx.numpy_helper.from_array(rand(nd, gates * hidden, hidden), "R")]  # fmt: skip
    ins = ["X", "W", "R", "B" if bias else "", "", "h0" if initial else ""]
    if bias:
        inits.append(onnx.numpy_helper.from_array(rand(nd, 2 * gates * hidden, scale=0.1), "B"))
    feeds = {"X": rand(*x_shape, scale=1.0)}
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if initial:
        feeds["h0"] = rand(*state)
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state))
    outs = ["Y", "Y_h"]
    if op == "LSTM":
        ins.append("c0" if initial else "")
        if initial:
            feeds["c0"] = rand(*state)
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, state))
        if peep:
            ins.append("P")
            inits.append(onnx.numpy_helper.from_array(rand(nd, 3 * hidden), "P"))
        outs.append("Y_c")
    attrs = {"hidden_size": hidden, "direction": direction, "layout": layout, **extra}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    if acts:
        attrs["activations"] = acts
    y_shape = [batch, seq, nd, hidden] if layout else [seq, nd, batch, hidden]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, state) for n in outs[1:]]  # fmt: skip
    g = helper.make_graph([helper.make_node(op, ins, outs, **attrs)], f"bi_{op.lower()}", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), feeds


def _batch_first(model, feeds: dict, want: dict) -> tuple[dict, dict]:
    """``model``'s node made batch-first (layout 1), its inputs and outputs transposed to match;
    the feeds and the (layout-0) reference outputs transposed the same way."""
    model.graph.node[0].attribute.remove(next(a for a in model.graph.node[0].attribute if a.name == "layout"))
    model.graph.node[0].attribute.append(helper.make_attribute("layout", 1))
    perms = {"X": (1, 0, 2), "h0": (1, 0, 2), "c0": (1, 0, 2), "Y": (2, 0, 1, 3), "Y_h": (1, 0, 2), "Y_c": (1, 0, 2)}
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        for d, v in zip(dims, [dims[i].dim_value for i in perms[vi.name]]):
            d.dim_value = v
    return ({k: np.ascontiguousarray(v.transpose(perms[k])) for k, v in feeds.items()},
            {k: v.transpose(perms[k]) for k, v in want.items()})


@pytest.mark.parametrize("case", [
    dict(op="LSTM", peep=True),
    dict(op="LSTM", initial=False, bias=False),
    dict(op="LSTM", acts=["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"]),  # directions differ: one at a time
    dict(op="GRU", lbr=1),
    dict(op="GRU", lbr=0),
    dict(op="RNN"),
    dict(op="LSTM", layout=1),
    dict(op="GRU", layout=1, direction="reverse"),
    dict(op="GRU", lbr=1, acts=["Sigmoid", "Tanh", "Sigmoid", "Relu"]),  # unrolled, a direction at a time
], ids=["lstm-peepholes", "lstm-bare", "lstm-own-activations", "gru-lbr", "gru", "rnn", "lstm-batch-first",
        "gru-reverse-batch-first", "gru-own-activations"])  # fmt: skip
def test_bidirectional_recurrences_match_onnxruntime(case, artifacts, tmp_path):
    """Bidirectional RNN/GRU/LSTM nodes with every output: both directions step together (one
    batched matmul and one set of gate ops a step), the backward one over the reversed sequence.
    Batch-first (layout 1) nodes, their initial states included, against the same node with
    layout 0 in onnxruntime (which has no batch-first recurrences), transposed."""
    layout = case.pop("layout", 0)
    model, feeds = _recurrent(seq=5, batch=2, size=6, hidden=4, **case)
    want = reference(model, feeds)
    if layout:  # onnxruntime has no batch-first recurrences: the same node with layout 1, transposed
        feeds, want = _batch_first(model, feeds, want)
    path = tmp_path / "bi.onnx"
    onnx.save(model, path)
    with Session(artifacts.get(path, {}), threads=1) as sess:
        assert_close(sess.run(feeds), want, 1e-4, 1e-5)


@pytest.mark.parametrize("case", [
    dict(direction="forward", hidden=32),
    dict(direction="reverse", layout=1, peep=True),
    dict(clip=0.6, input_forget=1, hidden=24),
    dict(batch=3, hidden=16, initial=False),
    dict(op="GRU", direction="forward", hidden=32, lbr=1),
    dict(op="GRU", direction="reverse", layout=1, hidden=12),
    dict(op="GRU", clip=0.7, hidden=16, lbr=0, bias=False),
], ids=["forward-h32", "reverse-batch-first-peepholes", "clip-input-forget", "batch3", "gru-forward-lbr",
        "gru-reverse-batch-first", "gru-clip-no-bias"])  # fmt: skip
def test_fused_recurrence_kernel_matches_onnxruntime(case, artifacts, tmp_path):
    """The LSTMs and GRUs import keeps whole (one fused recurrence kernel on CPUs), in each
    direction and option onnxruntime has; hidden sizes that fill 16 lanes and ones that do not."""
    from tvm_hybrid.compiler import importer

    layout = case.pop("layout", 0)
    op = case.pop("op", "LSTM")
    hidden, batch = case.pop("hidden", 8), case.pop("batch", 2)
    model, feeds = _recurrent(op, seq=7, batch=batch, size=5, hidden=hidden, **case)
    want = reference(model, feeds)
    if layout:  # onnxruntime has no batch-first recurrences: the same node with layout 1, transposed
        feeds, want = _batch_first(model, feeds, want)
    path = tmp_path / "rnn.onnx"
    onnx.save(model, path)
    assert op in importer.load(path).op_types
    with Session(artifacts.get(path, {}), threads=2) as sess:
        assert_close(sess.run(feeds), want, 1e-4, 1e-5)
