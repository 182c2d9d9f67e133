"""`tvm-hybrid prune`: magnitude pruning (zeros), channel pruning that really removes channels
(checked on a model whose weak channels carry nothing, so the output must not change), the
accuracy budget, and the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CLS, cli, reference
from onnx import TensorProto, helper, numpy_helper


def _chain_model(dead: int = 8, c: int = 16, residual: bool = False) -> onnx.ModelProto:
    """conv(3->c) -> Relu -> depthwise conv -> squeeze-excite gate (GAP, conv, conv, Sigmoid, Mul)
    -> conv(c->4). ``dead`` of the first conv's filters (and their biases) are zero: those
    channels are 0 all the way to the last conv, so removing them changes nothing."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    w1[:dead] = 0
    b1 = rng.standard_normal(c).astype(np.float32)
    b1[:dead] = 0
    inits = {
        "w1": w1, "b1": b1,
        "wd": rng.standard_normal((c, 1, 3, 3)).astype(np.float32), "bd": np.zeros(c, np.float32),
        "ws1": rng.standard_normal((4, c, 1, 1)).astype(np.float32),
        "ws2": rng.standard_normal((c, 4, 1, 1)).astype(np.float32), "bs2": rng.standard_normal(c).astype(np.float32),
        "w2": rng.standard_normal((4, c, 1, 1)).astype(np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "wd", "bd"], ["d"], pads=[1, 1, 1, 1], group=c, name="dw"),
        helper.make_node("Relu", ["d"], ["dr"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["dr"], ["p"], name="gap"),
        helper.make_node("Conv", ["p", "ws1"], ["s1"], name="se1"),
        helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se2"),
        helper.make_node("Sigmoid", ["s2"], ["gate"], name="gate"),
        helper.make_node("Mul", ["dr", "gate"], ["m"], name="excite"),
        helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])]
    if residual:  # the first conv's output is also a graph output: its channels cannot go
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, c, 8, 8]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _samples(d, n=5):
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        np.savez(d / f"{i}.npz", x=rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    return d


def test_channel_pruning_removes_channels_and_keeps_what_they_carried(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(_chain_model().SerializeToString())
    out = tmp_path / "p.onnx"
    proc = cli("prune", str(model), "--sparsity", "0.5", "--structured", "channels", "-c", str(_samples(tmp_path / "c")),
               "-o", str(out), "--json", check=True)  # fmt: skip
    r = json.loads(proc.stdout)
    # conv1's 8 dead channels, and the squeeze-excite's first conv (4 -> 2 channels: the weaker half)
    assert r["channels_removed"] >= 8 and r["pruned_layers"] >= 1
    p = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in p.graph.initializer}
    assert inits["w1"].shape == (8, 3, 3, 3) and inits["wd"].shape == (8, 1, 3, 3) and inits["w2"].shape == (4, 8, 1, 1)
    assert inits["ws1"].shape[1] == 8 and inits["ws2"].shape[0] == 8  # the gate's conv writes the same channels
    assert next(a.i for n in p.graph.node if n.name == "dw" for a in n.attribute if a.name == "group") == 8
    assert r["after"]["params"] < r["before"]["params"] and r["after"]["gflops"] < r["before"]["gflops"]
    # with a sparsity below what the squeeze-excite conv can lose (int(0.2 * 4) = 0), only dead
    # channels go (int(0.2 * 16) = 3 of them), and they carried zeros: the output is unchanged
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    full = reference(model, {"x": x})["y"]
    proc = cli("prune", str(model), "--sparsity", "0.2", "--structured", "channels", "-c", str(tmp_path / "c"), "-o",
               str(tmp_path / "p3.onnx"), "--json", check=True)  # fmt: skip
    r3 = json.loads(proc.stdout)
    assert r3["channels_removed"] == 3
    np.testing.assert_allclose(reference(tmp_path / "p3.onnx", {"x": x})["y"], full, rtol=1e-5, atol=1e-5)
    assert r3["loss"] < 1e-5


def test_channels_that_escape_keep_their_group_whole(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(_chain_model(residual=True).SerializeToString())
    out = tmp_path / "p.onnx"
    proc = cli("prune", str(model), "--sparsity", "0.5", "--structured", "channels", "-c", str(_samples(tmp_path / "c")),
               "-o", str(out), "--json", check=True)  # fmt: skip
    p = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in p.graph.initializer}
    assert inits["w1"].shape[0] == 16  # conv1's output is a graph output: untouched
    assert json.loads(proc.stdout)["channels_removed"] == 2  # only the squeeze-excite's 4 -> 2


def test_magnitude_pruning_zeros_the_smallest_weights(tmp_path):
    out = tmp_path / "p.onnx"
    calib = _samples_cls(tmp_path)
    r = json.loads(cli("prune", str(CLS), "--sparsity", "0.5", "-c", str(calib), "-o", str(out), "--json",
                       check=True).stdout)  # fmt: skip
    assert r["pruned_layers"] > 30 and r["after"]["params"] == r["before"]["params"]
    assert 0.4 < 1 - r["after"]["nonzero"] / r["before"]["nonzero"] < 0.5
    assert r["after"]["gzip_bytes"] < 0.8 * r["before"]["gzip_bytes"]
    assert {"max_abs", "mean_abs", "cosine", "rel_l2", "top1", "loss"} <= set(r["outputs"][0])


def test_accuracy_budget_lowers_the_sparsity(tmp_path):
    calib = _samples_cls(tmp_path)
    r = json.loads(cli("prune", str(CLS), "--sparsity", "0.6", "-c", str(calib), "-o", str(tmp_path / "p.onnx"),
                       "--accuracy-budget", "0.5%", "--json", check=True).stdout)  # fmt: skip
    assert r["sparsity_asked"] == 0.6 and 0 < r["sparsity"] < 0.6
    assert r["within_budget"] and r["loss"] <= 0.005


def _samples_cls(tmp_path):
    import sys

    sys.path.insert(0, str(CLS.parent.parent.parent / "scripts"))
    import calibration

    d = tmp_path / "calib"
    calibration.write("cls", d, 10)
    return d


@pytest.mark.parametrize("args, code, expect", [
    (["--sparsity", "1.5"], 2, "bad --sparsity"),
    (["--sparsity", "0.5", "--structured", "rows"], 2, "Invalid value for '--structured'"),
])  # fmt: skip
def test_bad_options_are_one_line(tmp_path, args, code, expect):
    proc = cli("prune", str(CLS), *args, "-c", str(_samples_cls(tmp_path)), "-o", str(tmp_path / "o.onnx"))
    assert proc.returncode == code and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
