"""Default CPU schedules: every kernel stays correct, builds are reproducible, tuned kernels are kept.

Models compile through the same optimize() + build() as the CLI and are compared against
onnxruntime with each zoo model's stated tolerance (f32: rtol 1e-4, atol 1e-5 unless stated).
"""

from __future__ import annotations

import pytest
import zoo
from conftest import CLS, TARGET, assert_close, reference, text_image

from tvm_hybrid.compiler import backends, importer
from tvm_hybrid.compiler.backends import cpu
from tvm_hybrid.targets import host_profile_name, resolve


def _compile(model, shapes: dict, target: str, tmp_path):
    import tvm
    from tvm import relax

    overrides = [importer.InputOverride(k, tuple(v)) for k, v in shapes.items()]
    imported = importer.prepare(model, overrides)
    profile = resolve(target)
    backend = backends.for_profile(profile)
    mod = backend.optimize(importer.to_relax(imported), profile)
    result = backend.build_library(mod, profile, tmp_path / "m.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(result.library)), tvm.cpu())
    names = [s.name for s in imported.inputs]
    outs = [o.name for o in imported.model.graph.output]
    return mod, result, lambda feeds: _run(vm, [feeds[n] for n in names], outs)


def _run(vm, args, out_names):
    import tvm

    res = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    flat = [res] if isinstance(res, tvm.runtime.Tensor) else list(res)
    return {n: t.numpy() for n, t in zip(out_names, flat)}


# Conv stacks, depthwise + squeeze-excite, attention (matmul, softmax), conv-transpose + resize,
# reductions: one model of each kernel family the heuristic schedules differently.
ZOO = ["resnet_block", "dw_se", "attention", "resize_convtranspose", "softmax_argmax", "mlp"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_with_default_schedules_matches_onnxruntime(name, tmp_path):
    z = zoo.build(name)
    mod, result, run = _compile(z.model, z.input_shapes, TARGET, tmp_path)
    assert result.default_kernels > 0
    assert_close(run(z.feeds), reference(z.model, z.feeds), z.rtol, z.atol)


def test_cls_with_default_schedules_matches_onnxruntime(tmp_path):
    import onnx

    model = onnx.load(str(CLS))
    x = text_image(1, 48, 192)
    mod, _, run = _compile(model, {"x": (1, 3, 48, 192)}, host_profile_name(), tmp_path)
    assert _scheduled(mod) >= 0.9 * _kernels(mod), "most kernels should get a default schedule"
    assert_close(run({"x": x}), reference(model, {"x": x}), rtol=1e-4, atol=1e-5)


def _kernels(mod) -> int:
    import tvm

    return sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())


def _scheduled(mod) -> int:
    import tvm

    return sum(
        isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs
        for f in mod.functions.values()
    )


def _fused(name: str, target: str):
    """The zoo model's Relax module after fusion, before default schedules."""
    z = zoo.build(name)
    imported = importer.prepare(z.model, [importer.InputOverride(k, tuple(v)) for k, v in z.input_shapes.items()])
    return backends.for_profile(resolve(target)).fuse(importer.to_relax(imported), resolve(target))


def test_default_schedules_are_deterministic():
    import tvm

    mod = _fused("resnet_block", TARGET)
    a = cpu.apply_default(mod, resolve(TARGET))
    b = cpu.apply_default(mod, resolve(TARGET))
    assert _scheduled(a) == _kernels(a)
    tvm.ir.assert_structural_equal(a, b)


def test_already_scheduled_kernels_are_left_alone():
    import tvm

    mod = _fused("resnet_block", TARGET)
    gv, func = next((gv, f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    marked = func.with_attr("tirx.is_scheduled", True)
    mod[gv] = marked
    out = cpu.apply_default(mod, resolve(TARGET))
    assert out[gv].same_as(marked)


def test_unusual_kernel_falls_back_to_unscheduled(monkeypatch):
    """A schedule that raises keeps TVM's unscheduled lowering for that kernel; the build goes on."""
    mod = _fused("mlp", TARGET)

    def boom(func, cfg):
        raise RuntimeError("analysis failed")

    monkeypatch.setattr(cpu, "schedule_func", boom)
    out = cpu.apply_default(mod, resolve(TARGET))
    assert _scheduled(out) == 0


def test_simd_width_follows_the_profile():
    assert cpu.cpu_config(resolve("x86-64-avx512").tvm()).lanes == 16
    assert cpu.cpu_config(resolve("x86-64-avx2").tvm()).lanes == 8
    assert cpu.cpu_config(resolve("x86-64").tvm()).lanes == 4


def test_register_tile_takes_the_most_multiply_adds_per_load():
    """AVX2's 16 registers: 6 rows x 2 vectors (8 loads, 12 FMAs) beats 8 x 1 (9 loads, 8 FMAs);
    AVX-512's 32 take as many columns as its 24 accumulators allow (an 80-wide row: 4 x 5);
    partial vectors keep one column; tiles divide axes."""
    avx2 = cpu.CpuConfig(lanes=8)
    avx512 = cpu.cpu_config(resolve("x86-64-avx512").tvm())
    assert cpu._register_tile(24, 10, 8, avx2) == (6, 2)  # PP-OCRv4 det's 96->24 3x3 head conv
    assert cpu._register_tile(16, 40, 8, avx2) == (4, 2)  # 6 does not divide 16
    assert cpu._register_tile(24, 5, 8, avx2) == (8, 1)  # 2 does not divide 5 vectors
    assert cpu._register_tile(192, 4, 5, avx2) == (6, 1)  # 5-lane vectors: one column
    assert cpu._register_tile(24, 5, 16, avx512) == (4, 5)  # det's 96->24 3x3 head conv at 80x80
    assert cpu._register_tile(192, 25, 16, avx512) == (4, 5)  # a 1x1 conv on 20x20 pixels
    assert cpu._register_tile(24, 1, 10, avx512) == (8, 1)  # 10-lane vectors: one column
    for cfg in (avx2, avx512):
        for rows_extent, vectors in ((24, 10), (7, 6), (1, 1), (384, 2), (96, 7)):
            rows, cols = cpu._register_tile(rows_extent, vectors, cfg.lanes, cfg)
            assert rows_extent % rows == 0 and vectors % cols == 0 and rows * cols <= cfg.accumulators


def _conv_chain_model():
    """A 3x3 stride-2 conv (3 -> 16), a 16 -> 96 1x1 conv + HardSwish, a 96 -> 24 3x3 conv at
    80x80 (a 2.6 MB padded input), a stride-2 pooling conv and a 24 -> 32 1x1 conv + bias at
    20x20: one kernel for each layout the default schedules change."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w1"], ["b0"], kernel_shape=[1, 1]),
        helper.make_node("HardSwish", ["b0"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w3"], ["d"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["d", "w4", "b4"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [w("w0", 16, 3, 3, 3), w("w1", 96, 16, 1, 1), w("w2", 24, 96, 3, 3), w("w3", 24, 24, 4, 4),
             w("w4", 32, 24, 1, 1), numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b4")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 160, 160])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 20, 20])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_layouts_vectorize_fully_and_match_onnxruntime(tmp_path):
    """Stride-2 windows read column phases (unit stride), a 20x20 1x1 conv vectorizes its 400
    fused pixels by 8 instead of rows of 20 by 5, and the big 3x3 conv keeps its channel
    tiles innermost (inside blocks of 32 input channels: ``CpuConfig.conv_k_block``); the
    results still match onnxruntime."""
    import numpy as np
    import tvm

    model = _conv_chain_model()
    x = np.random.default_rng(1).standard_normal((1, 3, 160, 160)).astype(np.float32)
    mod, _, run = _compile(model, {"x": (1, 3, 160, 160)}, TARGET, tmp_path)
    assert_close(run({"x": x}), reference(model, {"x": x}), rtol=1e-4, atol=1e-5)

    scripts = {gv.name_hint: f.script() for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    strided = [s for s in scripts.values() if "T.int64(162), T.int64(2), T.int64(81)" in s]
    assert strided, "the stride-2 conv's padded input should be stored as two column phases"
    assert "T.vectorized(T.int64(8))" in strided[0]
    pointwise = [s for n, s in scripts.items() if "T.int64(32), T.int64(400)" in s]
    assert pointwise and "T.vectorized(T.int64(8))" in pointwise[0], "20x20 pixels as one axis of 400"
    big = next(s for s in scripts.values() if "T.int64(96), T.int64(82), T.int64(82)" in s)
    assert "yy_xx_0_fused in T.parallel" in big and "for rc_0, ff_0, rc_1, ry, rx," in big, \
        "pixel tiles in parallel, channel tiles innermost of them, inside blocks of input channels"


def test_reductions_along_memory_are_vectorized():
    """The squeeze-excite's global average pool sums in vectors (rfactor), not one scalar chain."""
    import tvm

    mod = cpu.apply_default(_fused("dw_se", TARGET), resolve(TARGET))
    pools = [f.script() for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "mean" in gv.name_hint]
    assert pools, "dw_se should have a mean kernel"
    assert all("_rf" in s and "T.vectorized" in s for s in pools)


def _one_node_model(node, x_shape: tuple[int, ...], weights):
    """An ONNX model of one node from input x (float, ``x_shape``) and initializers to output y."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node], node.op_type, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _depthwise(channels: int, size: int):
    """A depthwise 5x5 conv (same padding) on a channels x size x size map."""
    import numpy as np
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((channels, 1, 5, 5), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], group=channels)
    model = _one_node_model(node, (1, channels, size, size), [w])
    imported = importer.prepare(model, [importer.InputOverride("x", (1, channels, size, size))])
    return backends.for_profile(resolve(TARGET)).fuse(importer.to_relax(imported), resolve(TARGET))


def test_kernels_worth_a_thread_pool_wakeup_go_parallel():
    """PP-OCRv4 det's 10x10 depthwise convs (384 channels, 0.96M multiply-adds, 0.1 ms on one
    core) run on every core; a kernel of a few microseconds stays on the calling thread."""
    import tvm

    def parallel(mod) -> bool:
        out = cpu.apply_default(mod, resolve(TARGET))
        kernels = [f.script() for _, f in out.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
        return any("conv" in k and "T.parallel" in k for k in kernels)

    assert parallel(_depthwise(384, 10)), "a 0.1 ms depthwise conv should use the thread pool"
    assert not parallel(_depthwise(8, 6)), "7200 multiply-adds are not worth waking a thread"


def test_depthwise_conv_keeps_independent_accumulators():
    """A depthwise conv's read depends on every output axis, so no row of its tile reuses a
    load; rows of output pixels still run as separate accumulators (``CpuConfig.ilp_rows``), so a
    tap's FMAs do not wait on each other. (dw_se in the zoo test checks the numbers.)"""
    import re

    import tvm

    out = cpu.apply_default(_depthwise(32, 20), resolve(TARGET))
    [k] = [f.script() for gv, f in out.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in gv.name_hint]
    assert re.search(r"for rc, ry, rx, yy_1, xx_1 in T.grid\(T.int64\(1\), T.int64\(5\), T.int64\(5\), T.int64\(4\)", k), k


@pytest.mark.parametrize("op, channels, size, stride, per_plane", [
    ("Conv", 32, 30, 2, True),  # MobileNet's stride-2 depthwise
    ("Conv", 24, 17, 1, True),  # odd side, stride 1
    ("Conv", 8, 24, 1, False),  # too few planes to share among threads: the map's rows are the parallel work
    ("MaxPool", 32, 20, 1, True),  # a pool reads its padded copy the same way
    ("AveragePool", 16, 13, 1, True),  # (without the padding in its divisor)
])  # fmt: skip
def test_depthwise_conv_pads_its_input_one_plane_at_a_time(op, channels, size, stride, per_plane, tmp_path):
    """A depthwise conv's (or a pool's) padded copy of its input is made one channel plane at a
    time, inside the loop over planes, and read back from cache (``cpu._plane_pad``); the outputs
    match onnxruntime."""
    import re

    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(channels + stride)
    window = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
    if op == "Conv":
        w = [numpy_helper.from_array(rng.uniform(-1, 1, (channels, 1, 3, 3)).astype(np.float32), "w")]
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=channels, **window)
    else:
        w = []
        node = helper.make_node(op, ["x"], ["y"], **window)
    shape = (1, channels, size, size)
    model = _one_node_model(node, shape, w)
    feeds = {"x": rng.uniform(-1, 1, shape).astype(np.float32)}
    mod, _, run = _compile(model, {"x": shape}, "x86-64-avx512", tmp_path)
    [kernel] = [f.script() for gv, f in mod.functions.items() if "conv2d" in gv.name_hint or "pool" in gv.name_hint]
    # a loop over the planes, and right inside it (under its row loops) the copy
    plane = re.search(rf"for \w+ in T\.(?:parallel|serial)\(T\.int64\({channels}\)[^\n]*\n(?:\s+for [^\n]*\n)*"
                      r"\s+with T\.sblock\(\"pad_temp\"\)", kernel)  # fmt: skip
    assert bool(plane) == per_plane, kernel
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_non_llvm_target_is_unchanged():
    import dataclasses

    mod = _fused("mlp", TARGET)
    cuda = dataclasses.replace(resolve(TARGET), tvm_target={"kind": "cuda"}, tvm_host=None)
    assert cpu.apply_default(mod, cuda).same_as(mod)


@pytest.mark.parametrize(
    "kernel,stride,pads",
    [((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (2, 2), (1, 1, 1, 1))],
    ids=["k2s2-rewritten", "k3s2p1-kept"],
)
def test_conv_transpose_matches_onnxruntime(kernel, stride, pads, tmp_path):
    """stride == kernel becomes a 1x1 conv + pixel shuffle; any other keeps TVM's own kernel."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(0)
    w = numpy_helper.from_array(rng.uniform(-1, 1, (8, 4, *kernel)).astype(np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=kernel, strides=stride, pads=pads)
    model = _one_node_model(node, (1, 8, 10, 12), [w])
    feeds = {"x": rng.uniform(-1, 1, (1, 8, 10, 12)).astype(np.float32)}
    mod, _, run = _compile(model, {"x": (1, 8, 10, 12)}, TARGET, tmp_path)
    rewritten = "conv2d_transpose" not in " ".join(gv.name_hint for gv in mod.functions)
    assert rewritten == (kernel == stride)
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)
    if rewritten:  # the pixel shuffle iterates (w, phase), phase unrolled: unit-stride reads
        shuffle = [f.script() for gv, f in mod.functions.items() if "transpose" in gv.name_hint]
        assert shuffle and "T.unroll(T.int64(2))" in shuffle[0]


def test_matmuls_on_awkward_extents_tile_fully_and_match_onnxruntime(tmp_path):
    """197 tokens (a ViT's, prime): the rows take full 8-row tiles with a guarded last one,
    Q·Kᵀ's 197-wide output is padded to whole vectors, and the softmax over it is the row kernel
    of any width (no padded copy, no slice after); all still equal onnxruntime's."""
    import numpy as np
    from onnx import helper, numpy_helper

    assert cpu._row_factor(197, 8) == 8 and cpu._row_factor(200, 8) == 8 and cpu._row_factor(12, 8) == 6
    assert cpu._row_factor(7, 8) == 7 and cpu._row_factor(13, 8) == 1  # short axes keep exact tiles
    rng = np.random.RandomState(0)
    # x (197 x 64) @ w (64 x 96): rows 197; then (x @ w) @ (x @ w)^T: a 197 x 197 output.
    w = numpy_helper.from_array(rng.uniform(-1, 1, (64, 96)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 197, 64])],
                              [helper.make_tensor_value_info("y", 1, None)], [w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.uniform(-1, 1, (1, 197, 64)).astype(np.float32)}
    mod, _, run = _compile(model, {"x": (1, 197, 64)}, TARGET, tmp_path)
    scripts = " ".join(f.script() for _, f in mod.functions.items() if hasattr(f, "script"))
    assert "_pad" in scripts  # pad_einsum's zero-padded copies
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.startswith("softmax_rows") for n in names) and not any("strided_slice" in n or "pad" in n for n in names), names
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-4)


def test_patch_embedding_conv_becomes_a_matmul(tmp_path):
    """kernel == stride, no padding (ViT's patch embedding): a patchify transpose and one matmul on
    CPUs; a padded or 1x1 conv stays a conv."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(0)
    for k, pads, rewritten in ((4, 0, True), (4, 1, False), (1, 0, False)):
        w = numpy_helper.from_array(rng.uniform(-1, 1, (24, 3, k, k)).astype(np.float32), "w")
        b = numpy_helper.from_array(rng.uniform(-1, 1, (24,)).astype(np.float32), "b")
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], strides=[k, k], pads=[pads] * 4)
        model = _one_node_model(node, (1, 3, 32, 32), [w, b])
        feeds = {"x": rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)}
        mod, _, run = _compile(model, {"x": (1, 3, 32, 32)}, TARGET, tmp_path / f"k{k}p{pads}")
        names = " ".join(gv.name_hint for gv in mod.functions)
        assert ("conv2d" not in names) == rewritten, names
        assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_fast_math_accuracy_is_as_the_readme_states():
    """The CPU backend's fast exp/erf/tanh (FastMathTransform), over [-100, 100] against float64:
    exp within 5e-6 relative where float32 is normal, erf and tanh within 5e-7 absolute."""
    import math

    import numpy as np
    import tvm
    from tvm import te, topi

    x = np.concatenate([np.linspace(-100, 100, 200001), np.linspace(-5, 5, 100001)]).astype(np.float32)
    wide = x.astype(np.float64)
    refs = {"exp": np.exp(wide), "erf": np.vectorize(math.erf)(wide), "tanh": np.tanh(wide)}
    for name, fast in (("exp", topi.fast_exp), ("erf", topi.fast_erf), ("tanh", topi.fast_tanh)):
        a = te.placeholder(x.shape, "float32", "a")
        f = tvm.compile(te.create_prim_func([a, fast(a)]), target="llvm")
        out = tvm.runtime.tensor(np.zeros_like(x))
        f(tvm.runtime.tensor(x), out)
        got, want = out.numpy().astype(np.float64), refs[name]
        if name == "exp":
            normal = (want > 1.2e-38) & (want < 2.0e38)
            assert np.max(np.abs(got - want)[normal] / want[normal]) < 5e-6
            assert np.all(got[x < -88.5] == 0)
        else:
            assert np.max(np.abs(got - want)) < 5e-7, name


@pytest.mark.parametrize("shape", [(1, 197, 384), (2, 5, 64), (3, 50)], ids=["vit-tokens", "batch", "unaligned"])
def test_layer_norm_rows_kernel_matches_onnxruntime(shape, tmp_path):
    """LayerNorm over the last axis is one row-parallel vectorized kernel (rewrites.layer_norm_rows)
    where the row is a whole number of vectors; other rows keep TVM's kernel. Inputs far from zero
    mean (mean 5, std 3), where a one-pass variance would lose digits."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    c = shape[-1]
    rng = np.random.RandomState(0)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "y")]
    params = [numpy_helper.from_array(rng.rand(c).astype(np.float32) + 0.5, "g"),
              numpy_helper.from_array(rng.rand(c).astype(np.float32), "b")]  # fmt: skip
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)
    model = helper.make_model(helper.make_graph([node], "ln", io[:1], io[1:], params),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    mod, _, run = _compile(model, {"x": shape}, TARGET, tmp_path)
    lanes = cpu.cpu_config(resolve(TARGET).tvm()).lanes
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.startswith("layer_norm_rows") for n in names) == (c % lanes == 0), names
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    assert_close(run({"x": x}), reference(model, {"x": x}), 1e-4, 1e-5)


@pytest.mark.parametrize("shape", [(1, 6, 197, 197), (4, 64), (3, 5, 40), (1, 40, 6625)],
                         ids=["vit-scores", "aligned", "short", "ctc-head"])  # fmt: skip
def test_softmax_rows_kernel_matches_onnxruntime(shape, tmp_path):
    """Softmax over the last axis is one row-parallel vectorized kernel (rewrites.softmax_rows)
    for rows of two vectors or more: whole vectors, or whole vectors and a scalar tail
    (197, 6625) with no padding; short rows keep TVM's."""
    import numpy as np
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "sm", io[:1], io[1:]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    mod, _, run = _compile(model, {"x": shape}, TARGET, tmp_path)
    lanes = cpu.cpu_config(resolve(TARGET).tvm()).lanes
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.startswith("softmax_rows") for n in names) == (shape[-1] >= 2 * lanes), names
    x = (np.random.RandomState(1).standard_normal(shape) * 4).astype(np.float32)
    assert_close(run({"x": x}), reference(model, {"x": x}), 1e-4, 1e-6)


@pytest.mark.parametrize("width, mask_shape", [(6625, [6625]), (197, [1, 1, 197]), (77, [3, 77])],
                         ids=["gemm-bias", "attention-mask", "per-row-mask"])  # fmt: skip
def test_softmax_rows_of_any_width_take_the_add_before_them(width, mask_shape, tmp_path):
    """Softmax(x + b), b broadcast over the leading axes (a CTC head's Gemm bias, an attention
    mask with large negative entries), over rows no vector divides: one softmax_rows kernel that
    reads x and b (no add, pad or slice kernels), equal to onnxruntime's."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    shape = [2, 3, width]
    rng = np.random.RandomState(2)
    b = (rng.standard_normal(mask_shape) * 3).astype(np.float32)
    b[..., ::7] = -1e9  # masked positions: exp underflows to 0
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y")]
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "sm", io[:1], io[1:], [numpy_helper.from_array(b, "b")]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    mod, _, run = _compile(model, {"x": shape}, TARGET, tmp_path)
    names = [gv.name_hint for gv in mod.functions if gv.name_hint != "main"]
    assert names == ["softmax_rows"], names
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    assert_close(run({"x": x}), reference(model, {"x": x}), 1e-4, 1e-6)


@pytest.mark.parametrize(
    "c, o, hw, k, s, pads, batch, kind",
    [
        # (fewer than 32 output channels where 3x3 stride-1: more, over 64 tiles, run as Winograd's)
        (32, 24, (20, 20), 3, 1, [1, 1, 1, 1], 1, "flat"),  # YOLO's 20x20 maps: rows of 1.25 vectors
        (32, 16, (20, 20), 3, 1, [1, 1, 1, 1], 1, "chv"),  # output channels in whole vectors
        (64, 16, (10, 10), 3, 1, [1, 1, 1, 1], 2, "chv"),
        (32, 24, (15, 40), 3, 1, [1, 1, 1, 1], 1, "flat"),  # a CRNN's 15x40: 640 pixels for 600, flattened
        (32, 24, (13, 11), 5, 1, [2, 1, 1, 3], 1, "flat"),  # uneven padding, a 5x5 kernel
        (32, 32, (13, 11), 5, 1, [2, 1, 1, 3], 1, "chv"),
        (32, 32, (12, 12), 3, 1, [0, 0, 0, 0], 1, "chv"),  # no padding: a smaller output
        (32, 40, (40, 40), 3, 2, [1, 1, 1, 1], 1, "flat"),  # stride 2: YOLO's downsampling, 20-wide rows
        (32, 32, (40, 40), 3, 2, [1, 1, 1, 1], 1, "chv"),  # stride 2 onto 400 pixels
        (32, 32, (20, 20), 3, 2, [1, 1, 1, 1], 1, "flat"),  # stride 2 onto 100 pixels: phases won
        (32, 24, (21, 19), 3, 2, [1, 0, 1, 2], 2, "flat"),  # stride 2, odd sides, uneven padding
        (48, 32, (10, 10), 1, 1, [0, 0, 0, 0], 1, "chv"),  # pointwise over 100 pixels
        (48, 24, (10, 10), 1, 1, [0, 0, 0, 0], 1, "flat"),
        (256, 64, (7, 7), 1, 1, [0, 0, 0, 0], 1, "chv"),  # pointwise onto 49 pixels (ResNet-50's 7x7)
        (64, 32, (28, 28), 1, 2, [0, 0, 0, 0], 1, "chv"),  # 1x1 stride 2 onto 196 (its downsampling)
        (16, 32, (20, 20), 3, 1, [1, 1, 1, 1], 1, None),  # few input channels: TVM's kernel
        (32, 24, (16, 32), 3, 1, [1, 1, 1, 1], 1, None),  # whole vectors a row: TVM's kernel
        (32, 32, (16, 16), 1, 1, [0, 0, 0, 0], 1, None),  # pointwise over whole vectors of pixels
    ],
)
def test_convs_over_rows_of_partial_vectors(c, o, hw, k, s, pads, batch, kind, tmp_path):
    """A conv (stride 1 or 2, or pointwise) whose output rows are no whole number of vectors
    runs with its output channels as the vectors where they fill them (``chv``:
    ``rewrites._conv_channel_vectors``), else over the padded input flattened row after row, at
    stride 2 each of its phases (``flat``: ``rewrites.conv2d_flat_rows``), and matches
    onnxruntime."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(c + o + k)
    w = numpy_helper.from_array(rng.uniform(-1, 1, (o, c, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.uniform(-1, 1, (o,)).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], pads=pads, strides=[s, s])
    shape = (batch, c, *hw)
    model = _one_node_model(node, shape, [w, b])
    feeds = {"x": rng.uniform(-1, 1, shape).astype(np.float32)}
    mod, _, run = _compile(model, {"x": shape}, "x86-64-avx512", tmp_path)
    names = " ".join(gv.name_hint for gv in mod.functions)
    assert ("conv2d_flat" in names) == (kind == "flat") and ("conv2d_chv" in names) == (kind == "chv"), names
    conv = next(f for gv, f in mod.functions.items() if "conv2d" in gv.name_hint)
    assert conv.attrs["tirx.is_scheduled"], names  # (a schedule that failed leaves TVM's naive loops)
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "c, o, hw, k, stride, blocks",
    [
        (256, 256, 14, 3, 1, "T.int64(8), T.int64(49), T.int64(32)"),
        # ResNet-50's 512->1024 1x1 stride-2 downsampling onto 14x14: it reads a quarter of its
        # 1.6 MB input (``cpu._touched_bytes``), so the 2 MB weight is what streams
        (512, 1024, 28, 1, 2, "T.int64(16), T.int64(49), T.int64(32)"),
    ],
    ids=["3x3", "1x1-stride-2"],
)
def test_a_conv_with_its_pixel_tiles_innermost_sums_in_blocks_of_input_channels(tmp_path, c, o, hw, k, stride, blocks):
    """ResNet-50's 3x3 256->256 conv at 14x14: its 2.4 MB of weights stream past the pixel
    tiles, so its reduction goes in blocks of 32 input channels (``CpuConfig.conv_k_block``),
    every pixel tile summing one block (74 KB of weights) before the next is read; it matches
    onnxruntime. Its 1x1 stride-2 downsampling conv (2 MB of weights) too: it had streamed the
    weight once for every tile of 4 pixels (2.83 -> 1.70 ms alone on 2 Xeon vCPUs); its weight
    rows of 1024 channels are spread apart (``rewrites._conv_channel_vectors``). Alone, it keeps
    its NCHW output: no channels-last island of one conv (``channels_last``)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(14)
    w = numpy_helper.from_array(rng.uniform(-0.1, 0.1, (o, c, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.uniform(-1, 1, (o,)).astype(np.float32), "b")
    pad = k // 2
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2)
    model = _one_node_model(node, (1, c, hw, hw), [w, b])
    mod, _, run = _compile(model, {"x": (1, c, hw, hw)}, "x86-64-avx512", tmp_path)
    [(name, conv)] = [(gv.name_hint, f.script()) for gv, f in mod.functions.items() if "conv2d_chv" in gv.name_hint]
    assert "nhwc" not in name, name
    # blocks of 32 channels, outside the 49 tiles of 4 pixels, their taps inside
    assert "for i_0, p_0, i_1, ry, rx," in conv and blocks in conv, conv[:3000]
    # a 1x1 conv's weight rows of 4 KB get a vector of zeros each, so they do not share L1 sets
    assert k > 1 or f"T.int64({c}), T.int64(1), T.int64(1), T.int64({o + 16})" in conv, conv[:1000]
    feeds = {"x": rng.uniform(-1, 1, (1, c, hw, hw)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_split_undoing_a_concat_takes_the_pieces_directly(tmp_path):
    """A YOLOv8 head's box/class maps: concatenated on channels per scale, flattened, concatenated
    over scales, split into boxes and classes again (``rewrites.split_of_concat``): no kernel
    splits, the results match onnxruntime, and a split whose sections do not match the
    concat's keeps its split."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def head(box_sections):
        nodes, inits, inputs, flat = [], [], [], []
        for i, hw in enumerate((8, 4)):
            b, c = f"b{i}", f"c{i}"
            inputs += [helper.make_tensor_value_info(b, TensorProto.FLOAT, [1, 6, hw, hw]),
                       helper.make_tensor_value_info(c, TensorProto.FLOAT, [1, 5, hw, hw])]  # fmt: skip
            nodes += [helper.make_node("Concat", [b, c], [f"cat{i}"], axis=1),
                      helper.make_node("Reshape", [f"cat{i}", "shape"], [f"flat{i}"])]  # fmt: skip
            flat.append(f"flat{i}")
        inits += [numpy_helper.from_array(np.array([1, 11, -1], np.int64), "shape"),
                  numpy_helper.from_array(np.array(box_sections, np.int64), "sections")]  # fmt: skip
        nodes += [helper.make_node("Concat", flat, ["all"], axis=2),
                  helper.make_node("Split", ["all", "sections"], ["box", "cls"], axis=1),
                  helper.make_node("Sigmoid", ["cls"], ["score"])]  # fmt: skip
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("box", "score")]
        graph = helper.make_graph(nodes, "head", inputs, outs, inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    rng = np.random.RandomState(0)
    for sections, split_kept in (([6, 5], False), ([4, 7], True)):
        model = head(sections)
        feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
                 for i in model.graph.input}  # fmt: skip
        mod, _, run = _compile(model, {k: v.shape for k, v in feeds.items()}, TARGET, tmp_path / str(sections[0]))
        names = " ".join(gv.name_hint for gv in mod.functions)
        assert ("split" in names) == split_kept, names
        assert_close(run(feeds), reference(model, feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("classes", [97, 2501])
def test_matmul_by_a_constant_of_partial_vectors_reads_it_padded_at_compile_time(classes, tmp_path):
    """A CTC-style head (MatMul by a constant [120, classes], its bias, a Softmax over the
    classes): the weight is padded to whole vectors once, at compile time
    (``rewrites.matmul_weights_padded_to``), not copied padded inside the kernel on every call;
    the softmax reads the valid columns of the padded sums in place and adds the bias in its
    passes (no slice or add kernel). A weight of 1 MB or more (2501 classes) is packed in panels
    of 48 columns ([53, 120, 48]); it matches onnxruntime."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(4)
    w = numpy_helper.from_array(rng.uniform(-1, 1, (120, classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.uniform(-1, 1, (classes,)).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["s"]),
             helper.make_node("Softmax", ["s"], ["y"], axis=-1)]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 40, 120])],
                              [helper.make_tensor_value_info("y", 1, None)], [w, b])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.uniform(-1, 1, (1, 40, 120)).astype(np.float32)}
    mod, _, run = _compile(model, {"x": (1, 40, 120)}, "x86-64-avx512", tmp_path)
    assert sorted(gv.name_hint for gv in mod.functions) == ["main", "matmul" if classes == 97 else "matmul_panels", "softmax_rows"]
    [head] = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("matmul")]
    script = head.script()
    weight = "(T.int64(120), T.int64(112))" if classes == 97 else "(T.int64(53), T.int64(120), T.int64(48))"
    assert weight in script and "_pad" not in script, script[:600]
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-6)


def test_a_classifier_of_1000_classes_reads_its_weight_in_panels(tmp_path):
    """An ImageNet classifier's Gemm (1280 -> 1000, 5 MB of weights): 1000 columns run in vectors
    of 10, each k of a tile 40 bytes of a 4 KB row, unless the weight goes in panels of 48 columns
    (21 of them, the last 8 columns zero); it matches onnxruntime."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(10)
    w = numpy_helper.from_array(rng.uniform(-0.1, 0.1, (1000, 1280)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.uniform(-1, 1, (1000,)).astype(np.float32), "b")
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 1280])],
                              [helper.make_tensor_value_info("y", 1, None)], [w, b])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod, _, run = _compile(model, {"x": (1, 1280)}, "x86-64-avx512", tmp_path)
    [head] = [f.script() for gv, f in mod.functions.items() if gv.name_hint == "matmul_panels"]
    assert "(T.int64(21), T.int64(1280), T.int64(48))" in head, head[:600]
    feeds = {"x": rng.uniform(-1, 1, (1, 1280)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c, o, hw, k, s, pads, group, taps", [
    (64, 32, (1, 40), 3, 1, [1, 1, 1, 1], 1, (1, 3)),  # a text recognizer's neck: one row high
    (32, 32, (1, 40), 3, 1, [1, 1, 1, 1], 32, (1, 3)),  # depthwise
    (16, 16, (2, 9), 5, 2, [2, 2, 2, 2], 1, (2, 5)),  # stride 2 over two rows: kernel rows 2-3 read them
    (16, 16, (3, 20), 3, 1, [1, 1, 1, 1], 1, (3, 3)),  # every tap reads the map somewhere: as it was
])  # fmt: skip
def test_conv_taps_that_only_read_padding_are_dropped(c, o, hw, k, s, pads, group, taps, tmp_path):
    """Kernel rows (or columns) of a conv that only ever multiply padding are cut from the
    weight, the padding adjusted so every output stays where it was (``rewrites.conv_taps_in_bounds``);
    the outputs match onnxruntime."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.RandomState(c + k)
    w = numpy_helper.from_array(rng.uniform(-1, 1, (o, c // group, k, k)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], pads=pads, strides=[s, s], group=group)
    shape = (1, c, *hw)
    model = _one_node_model(node, shape, [w])
    feeds = {"x": rng.uniform(-1, 1, shape).astype(np.float32)}
    mod, _, run = _compile(model, {"x": shape}, "x86-64-avx512", tmp_path)
    [conv] = [f for gv, f in mod.functions.items() if "conv2d" in gv.name_hint]
    assert f"T.int64({c // group}), T.int64({taps[0]}), T.int64({taps[1]}))" in conv.script()
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, kernel, strides, pads, ceil, rows",
    [
        ((1, 8, 60, 160), (2, 2), (2, 2), (0, 0, 0, 0), 0, True),  # a CRNN's pool
        ((2, 5, 31, 45), (3, 3), (2, 2), (1, 1, 1, 1), 0, True),  # ResNet's stem pool, odd sides
        ((1, 4, 17, 33), (2, 2), (2, 2), (0, 0, 0, 0), 1, True),  # ceil_mode: a last window cut short
        ((1, 6, 20, 40), (3, 2), (1, 2), (1, 0, 1, 0), 0, True),  # vertical stride 1
        ((1, 8, 15, 40), (2, 1), (2, 1), (0, 0, 0, 0), 0, False),  # no horizontal stride: TVM's kernel
        ((1, 16, 10, 10), (5, 5), (1, 1), (2, 2, 2, 2), 0, False),  # YOLO's SPPF
    ],
)
def test_max_pool_rows_kernel_matches_onnxruntime(shape, kernel, strides, pads, ceil, rows, tmp_path):
    """A max pool with a horizontal stride is one output row a task (rewrites.max_pool_rows)."""
    import numpy as np
    from onnx import helper

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                            ceil_mode=ceil)  # fmt: skip
    model = _one_node_model(node, shape, [])
    mod, _, run = _compile(model, {"x": shape}, TARGET, tmp_path)
    assert any(gv.name_hint.startswith("max_pool_rows") for gv in mod.functions) == rows, list(mod.functions)
    x = np.random.RandomState(3).standard_normal(shape).astype(np.float32)
    assert_close(run({"x": x}), reference(model, {"x": x}), 0, 0)


@pytest.mark.parametrize("c, o, hw, pads, batch, epilogue, winograd", [
    (32, 48, (17, 19), [1, 1, 1, 1], 1, "relu", True),  # odd sides: the last tiles' second row and column cut off
    (40, 32, (18, 20), [0, 0, 0, 0], 1, None, True),  # no padding
    (32, 32, (16, 18), [2, 0, 1, 3], 1, "bias", True),  # lopsided padding
    (32, 32, (14, 14), [1, 1, 1, 1], 2, "bn_pool", True),  # batch 2; BatchNorm, ReLU and a stride-2 pool (a CRNN's)
    (48, 32, (13, 21), [1, 2, 0, 1], 3, "relu", True),  # rows of 11 tiles written as 12: each overruns into the next, the next image's too
    (32, 40, (16, 20), [1, 1, 1, 1], 1, "relu_reshape", True),  # a 3-D output (a CRNN's reshape fused in): channels the parallel loop
    (256, 64, (10, 10), [1, 1, 1, 1], 1, None, False),  # 25 tiles: too few, as it was
    (16, 16, (20, 20), [1, 1, 1, 1], 1, None, False),  # 16 channels: too few, as it was
])  # fmt: skip
def test_winograd_convs_match_onnxruntime(c, o, hw, pads, batch, epilogue, winograd, tmp_path):
    """3x3 stride-1 convs of 32 channels or more over 64 output tiles or more run as Winograd's
    F(2x2, 3x3) (``rewrites.conv_winograd``): input transform, 16 matmuls by weights transformed
    at compile time, output transform with the epilogue; within rtol 1e-4 / atol 1e-5 of
    onnxruntime's direct convolution."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(c + o)
    inits = [numpy_helper.from_array(rng.uniform(-0.2, 0.2, (o, c, 3, 3)).astype(np.float32), "w")]
    conv_in = ["x", "w"]
    if epilogue == "bias":
        inits.append(numpy_helper.from_array(rng.uniform(-1, 1, (o,)).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["y0"], kernel_shape=[3, 3], pads=pads)]
    if epilogue == "relu":
        nodes.append(helper.make_node("Relu", ["y0"], ["y1"]))
    elif epilogue == "bn_pool":
        for name, lo, hi in (("scale", 0.5, 1.5), ("shift", -1, 1), ("mean", -1, 1), ("var", 0.5, 2)):
            inits.append(numpy_helper.from_array(rng.uniform(lo, hi, (o,)).astype(np.float32), name))
        nodes += [helper.make_node("BatchNormalization", ["y0", "scale", "shift", "mean", "var"], ["bn"]),
                  helper.make_node("Relu", ["bn"], ["r"]),
                  helper.make_node("MaxPool", ["r"], ["y1"], kernel_shape=[2, 2], strides=[2, 2])]  # fmt: skip
    elif epilogue == "relu_reshape":
        inits.append(numpy_helper.from_array(np.array([o, *hw], np.int64), "rs"))
        nodes += [helper.make_node("Relu", ["y0"], ["r"]), helper.make_node("Reshape", ["r", "rs"], ["y1"])]
    nodes[-1].output[0] = "y"
    shape = (batch, c, *hw)
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod, _, run = _compile(model, {"x": shape}, "x86-64-avx512", tmp_path)
    assert any("winograd_input" in gv.name_hint for gv in mod.functions) == winograd, list(mod.functions)
    if epilogue == "relu_reshape":  # the reshape fused into the output transform: a 3-D output, a channel a task
        out = [f for gv, f in mod.functions.items() if "winograd_output" in gv.name_hint and "reshape" in gv.name_hint]
        assert len(out) == 1 and f"T.parallel(T.int64({o}))" in out[0].script(), list(mod.functions)
    feeds = {"x": rng.uniform(-1, 1, shape).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_relax_rewrites_leave_the_callers_module_alone():
    """A rewrite pass returns a new module and leaves the one it was given as it was (the CPU
    backend fuses a model twice, with and without BatchNorm folded, from the same module)."""
    from tvm_hybrid.compiler.rewrites import conv_affine_folded

    mod = importer.to_relax(importer.load(str(CLS), [importer.InputOverride.parse("x:1x3x48x192")]))
    before = mod.script()
    folded = conv_affine_folded()(mod)
    assert mod.script() == before
    assert folded.script() != before  # (cls has BatchNorms to fold)


@pytest.mark.parametrize("seq", [128, 197])
def test_long_reductions_go_in_blocks_and_match_onnxruntime(tmp_path, seq):
    """A matmul whose 1536-long reduction runs with its row tiles innermost (a transformer's FFN
    down projection) is split into blocks of 256 (``CpuConfig.k_block`` on AVX-512), the bias and
    the residual added after the last block; it matches onnxruntime. At ViT's 197 tokens the
    activation (1.2 MB) is more than the 1 MB the row tiles go innermost for, but one block's
    columns of it (200 KB) are what cycles through L2, and that decides."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(7)
    inits = [numpy_helper.from_array(rng.uniform(-0.1, 0.1, (1536, 384)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(-1, 1, (384,)).astype(np.float32), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["mb"]),
             helper.make_node("Add", ["mb", "r"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, 1536]),
                                             helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, seq, 384])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod, _, run = _compile(model, {"x": (1, seq, 1536), "r": (1, seq, 384)}, "x86-64-avx512", tmp_path)
    [mm] = [f for gv, f in mod.functions.items() if "matmul" in gv.name_hint]
    assert "for k_0, " in mm.script() and "T.int64(256)" in mm.script(), mm.script()[:1500]  # 6 blocks of 256
    feeds = {"x": rng.uniform(-1, 1, (1, seq, 1536)).astype(np.float32), "r": rng.uniform(-1, 1, (1, seq, 384)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)




def _constants(func) -> list[tuple[int, ...]]:
    import tvm
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, tvm.ir.GenericConst) else None)
    return [tuple(c.value.shape) for c in {c.__chandle__(): c for c in found}.values()]


def _weight_model(rng, k=384, n=1152):
    """y = x @ W + b and z = x2 @ W (one constant weight for two matmuls), u = x @ v (no constant)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(rng.uniform(-0.1, 0.1, (k, n)).astype("float32"), "w"),
             numpy_helper.from_array(rng.uniform(-1, 1, (n,)).astype("float32"), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]),
             helper.make_node("MatMul", ["x2", "w"], ["z"]), helper.make_node("MatMul", ["x", "v"], ["u"])]  # fmt: skip
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("x", f, [1, 50, k]),
                                                 helper.make_tensor_value_info("x2", f, [1, 20, k]),
                                                 helper.make_tensor_value_info("v", f, [k, n])],
                              [helper.make_tensor_value_info(o, f, [1, r, n]) for o, r in (("y", 50), ("z", 20), ("u", 50))],
                              inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_constant_matmul_weights_are_packed_in_panels_once(tmp_path):
    """A constant [K, N] matmul weight is read from panels [N/32, K, 32], packed at compile time:
    the module holds the packed weight only, once for the two matmuls that share it; a matmul by
    an input is left as it is. All match onnxruntime."""
    import dataclasses

    import numpy as np
    import tvm

    rng = np.random.RandomState(3)
    model = _weight_model(rng)
    shapes = {"x": (1, 50, 384), "x2": (1, 20, 384), "v": (384, 1152)}
    mod, _, run = _compile(model, shapes, "x86-64-avx512", tmp_path)
    consts = _constants(mod["main"])
    assert (384, 1152) not in consts and consts.count((36, 384, 32)) == 1, consts
    kernels = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    packed = {n for n, f in kernels.items() if cpu._PACKED_ATTR in (f.attrs or {})}
    assert len(packed) == 2, sorted(kernels)  # x @ W + b and x2 @ W; not x @ v
    assert all(tuple(int(d) for d in kernels[n].params[1].shape) == (36, 384, 32) for n in packed)
    feeds = {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in shapes.items()}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)
    # weight_panel=0: no packing, the weight as the model has it
    profile = resolve("x86-64-avx512")
    overrides = [importer.InputOverride(k, v) for k, v in shapes.items()]
    fused = backends.for_profile(profile).fuse(importer.to_relax(importer.prepare(model, overrides)), profile)
    plain = cpu.apply_default(fused, profile, dataclasses.replace(cpu.cpu_config(profile.tvm()), weight_panel=0))
    assert (384, 1152) in _constants(plain["main"]) and (36, 384, 32) not in _constants(plain["main"])


def _int8_weight_matmul(rng, x_shape):
    """y = x @ (float(wq) * ws): a [384, 1152] int8 weight with a scale per column, as the int8
    MiniLM-L6 writes its weights (Cast + Mul; ``rewrites.int8_weights`` keeps them int8)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(rng.randint(-127, 128, (384, 1152)).astype(np.int8), "wq"),
             numpy_helper.from_array((rng.uniform(0.5, 1.5, (1152,)) / 127).astype(np.float32), "ws")]  # fmt: skip
    nodes = [helper.make_node("Cast", ["wq"], ["wf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["wf", "ws"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "int8w", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_int8_matmul_weights_are_packed_in_panels_too(tmp_path):
    """An int8 [K, N] weight that its matmul dequantizes as it reads (under 128 rows) is packed in
    panels like an fp32 one, and stays int8: the module holds the [N/32, K, 32] int8 weight and
    not the [K, N] one. Matches onnxruntime."""
    import numpy as np
    import tvm

    rng = np.random.RandomState(4)
    model = _int8_weight_matmul(rng, (1, 50, 384))
    mod, _, run = _compile(model, {"x": (1, 50, 384)}, "x86-64-avx512", tmp_path)
    [mm] = [f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and cpu._PACKED_ATTR in (f.attrs or {})]
    assert [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in mm.params if str(p.dtype) == "int8"] == [((36, 384, 32), "int8")]
    consts = _constants(mod["main"])
    assert (384, 1152) not in consts and (36, 384, 32) in consts, consts
    feeds = {"x": rng.uniform(-1, 1, (1, 50, 384)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_int8_weights_of_a_matmul_of_many_rows_are_dequantized_once(tmp_path):
    """From 128 rows (``rewrites._DEQUANTIZE_ONCE_ROWS``) a matmul by an int8 weight dequantizes
    it once a call, in a stage of its own, instead of in every tile of rows; the weight stays
    int8 in the module. Matches onnxruntime."""
    import numpy as np

    from tvm_hybrid.compiler.rewrites import DEQUANTIZE_STAGE

    rng = np.random.RandomState(5)
    model = _int8_weight_matmul(rng, (2, 100, 384))
    mod, _, run = _compile(model, {"x": (2, 100, 384)}, "x86-64-avx512", tmp_path)
    [mm] = [f for gv, f in mod.functions.items() if "matmul_int8w" in gv.name_hint]
    assert f'"{DEQUANTIZE_STAGE}"' in mm.script()
    assert (384, 1152) in _constants(mod["main"])  # int8, as the model has it
    feeds = {"x": rng.uniform(-1, 1, (2, 100, 384)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_packed_weights_are_shared_by_a_portable_artifacts_builds(tmp_path):
    """Every CPU level packs a weight the same way, so the x86-64 artifact's weights file holds it
    once for its SSE, AVX2 and AVX-512 builds."""
    import json

    import numpy as np
    import onnx
    from conftest import cli

    from tvm_hybrid.manifest import Manifest

    model = _weight_model(np.random.RandomState(4))
    onnx.save(model, tmp_path / "m.onnx")
    cli("compile", str(tmp_path / "m.onnx"), "--input", "x:1x50x384", "--input", "x2:1x20x384", "--input", "v:384x1152",
        "-t", "x86-64", "--cloud", "none", "-o", str(tmp_path / "out"), check=True)  # fmt: skip
    art = tmp_path / "out" / "x86-64"
    [seg] = Manifest.from_dict(json.loads((art / "manifest.json").read_text())).segments
    assert len(seg.variants) >= 2
    with np.load(art / seg.weights["file"]) as z:
        shapes = sorted(z[k].shape for k in z.files)
    assert shapes.count((36, 384, 32)) == 1 and (384, 1152) not in shapes, shapes


@pytest.mark.parametrize("x_shape, order", [((8, 128, 384), "_i1_0_fused in"), ((1024, 384), "_i0_0_fused in")],
                         ids=["batch", "flattened"])
def test_an_ffn_over_many_rows_keeps_its_rows_innermost(x_shape, order, tmp_path):
    """A transformer's FFN up projection (384->1536) over 1024 rows (``_rows_innermost``):
    - batch: 8 sequences of 128 tokens. One sequence's rows (196 KB) are what cycles through
      L2 while a weight panel stays there, not the batch's 1.5 MB, so the row tiles go innermost
      as they do at batch 1 (batch, column tiles, then the row tiles); rows outermost, each
      4-row tile streamed all of the 2.4 MB weight.
    - flattened: the same rows as 2-D, no batch axis to slice by. Neither operand fits in L2,
      and 16 column tiles streaming the 1.5 MB activation cost far less than 256 row tiles
      streaming the 2.4 MB weight (column tiles, then the row tiles).
    Both match onnxruntime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(8)
    inits = [numpy_helper.from_array(rng.uniform(-0.1, 0.1, (384, 1536)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(-1, 1, (1536,)).astype(np.float32), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod, _, run = _compile(model, {"x": x_shape}, "x86-64-avx512", tmp_path)
    [mm] = [f for gv, f in mod.functions.items() if "matmul" in gv.name_hint]
    fused = next(ln for ln in mm.script().splitlines() if "T.parallel(" in ln)
    assert order in fused, fused
    feeds = {"x": rng.uniform(-1, 1, x_shape).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_int8_weight_conv_drops_the_taps_that_only_read_padding(tmp_path):
    """A 5x5 depthwise conv with int8 weights over a map two rows high (PP-OCR cls's, once its
    height is pooled away) keeps only the 3 kernel rows that read the map, as an fp32 conv does
    (``rewrites.conv_taps_in_bounds``): its kernel reads a 3x5 int8 weight, sliced at compile
    time, and matches onnxruntime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = {"w_q": rng.integers(-127, 128, (64, 1, 5, 5)).astype(np.int8),
             "w_s": (rng.random(64) * 0.02 + 0.005).astype(np.float32), "w_z": np.zeros(64, np.int8)}  # fmt: skip
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 2, 2, 2], group=64)]  # fmt: skip
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 2, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 2, 40])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mod, _, run = _compile(model, {"x": (1, 64, 2, 40)}, "x86-64-avx512", tmp_path)
    [conv] = [f for gv, f in mod.functions.items() if "conv2d_int8w" in gv.name_hint]
    assert [tuple(int(d) for d in p.shape) for p in conv.params if str(p.dtype) == "int8"] == [(64, 1, 3, 5)]
    feeds = {"x": rng.standard_normal((1, 64, 2, 40)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride, hw", [(1, 14), (2, 14)])
def test_convs_with_channel_vectors_in_a_row_keep_their_activations_channels_last(tmp_path, stride, hw):
    """MobileNetV2's inverted residual at 14x14 (1x1 expand 64->384 with ReLU6, depthwise 3x3
    with ReLU6, 1x1 project 384->64, residual add) and its stride-2 form onto 7x7: the convs
    compute over ``[pixel, channel]`` activations (``channels_last``), so the block has no
    transposing kernel but where the graph enters and leaves, and matches onnxruntime. A conv
    whose island would be itself alone keeps its NCHW output (``test_a_conv_with_its_pixel_...``)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from tvm import relax

    rng = np.random.RandomState(15)

    def init(name, *shape):
        return numpy_helper.from_array(rng.uniform(-0.2, 0.2, shape).astype(np.float32), name)

    inits = [init("we", 384, 64, 1, 1), init("be", 384), init("wd", 384, 1, 3, 3), init("bd", 384),
             init("wp", 64, 384, 1, 1), init("bp", 64),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"], kernel_shape=[1, 1]),
        helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
        helper.make_node("Conv", ["e6", "wd", "bd"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=384, strides=[stride] * 2),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
        helper.make_node("Conv", ["d6", "wp", "bp"], ["p"], kernel_shape=[1, 1]),
    ]
    if stride == 1:
        nodes.append(helper.make_node("Add", ["p", "x"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod, _, run = _compile(model, {"x": (1, 64, hw, hw)}, "x86-64-avx512", tmp_path)
    names = sorted(gv.name_hint for gv, f in mod.functions.items() if not isinstance(f, relax.Function))
    assert sum("conv2d_chv_nhwc" in n for n in names) == 2 and sum("dwconv2d_nhwc" in n for n in names) == 1, names
    assert sum("transpose" in n for n in names) == 2, names  # into the island, and out of it
    feeds = {"x": rng.uniform(-1, 1, (1, 64, hw, hw)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)


def test_a_yolo_style_block_stays_channels_last_through_split_concat_and_max_pools(tmp_path):
    """YOLOv8's C2f (1x1 conv, split in halves, a bottleneck of two 3x3 convs with a residual
    add, concat of the pieces, 1x1 conv) and SPPF (two chained 5x5 max pools, concat) at 10x10,
    SiLU after every conv: the island carries the split, the concats and the pools
    (``channels_last``), so only the graph's entry and exit transpose; it matches onnxruntime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    rng = np.random.RandomState(16)
    inits, nodes = [], []

    def conv(x, y, c, o, k):
        inits.extend([numpy_helper.from_array(rng.uniform(-0.2, 0.2, (o, c, k, k)).astype(np.float32), y + "_w"),
                      numpy_helper.from_array(rng.uniform(-0.5, 0.5, (o,)).astype(np.float32), y + "_b")])  # fmt: skip
        nodes.extend([helper.make_node("Conv", [x, y + "_w", y + "_b"], [y + "_c"], kernel_shape=[k, k], pads=[k // 2] * 4),
                      helper.make_node("Sigmoid", [y + "_c"], [y + "_s"]),
                      helper.make_node("Mul", [y + "_c", y + "_s"], [y])])  # fmt: skip

    inits.append(numpy_helper.from_array(np.array([32, 32], np.int64), "halves"))
    conv("x", "a", 64, 64, 1)
    nodes.append(helper.make_node("Split", ["a", "halves"], ["a0", "a1"], axis=1))
    conv("a1", "b", 32, 32, 3)
    conv("b", "c", 32, 32, 3)
    nodes += [helper.make_node("Add", ["a1", "c"], ["r"]), helper.make_node("Concat", ["a0", "a1", "r"], ["cat"], axis=1)]
    conv("cat", "d", 96, 64, 1)
    nodes += [helper.make_node("MaxPool", ["d"], ["m1"], kernel_shape=[5, 5], pads=[2] * 4),
              helper.make_node("MaxPool", ["m1"], ["m2"], kernel_shape=[5, 5], pads=[2] * 4),
              helper.make_node("Concat", ["d", "m1", "m2"], ["pooled"], axis=1)]  # fmt: skip
    conv("pooled", "y", 192, 64, 1)
    graph = helper.make_graph(nodes, "c2f_sppf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod, _, run = _compile(model, {"x": (1, 64, 10, 10)}, "x86-64-avx512", tmp_path)
    names = sorted(gv.name_hint for gv, f in mod.functions.items() if not isinstance(f, relax.Function))
    assert sum("conv2d_chv_nhwc" in n for n in names) == 5 and any("max_pool2d_nhwc" in n for n in names), names
    assert sum("transpose" in n for n in names) == 2, names
    feeds = {"x": rng.uniform(-1, 1, (1, 64, 10, 10)).astype(np.float32)}
    assert_close(run(feeds), reference(model, feeds), rtol=1e-4, atol=1e-5)
