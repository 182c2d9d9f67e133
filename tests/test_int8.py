"""int8 x int8 convolutions (compiler/int8.py): a QDQ model's quantized convolutions compile to
conv2d_int8 kernels on x86 targets (VNNI's vpdpbusd, else vpmaddwd on AVX-512 BW and AVX2) and
give what onnxruntime gives on the same model."""

from __future__ import annotations

import numpy as np
import pytest
import zoo
from conftest import int8_kernels, reference

from tvm_hybrid import hostcpu

VNNI = "x86-64-avx512-vnni"
#: int8 profile: the CPU flag it needs
PROFILES = {VNNI: "avx512_vnni", "x86-64-avx2-vnni": "avx_vnni", "x86-64-avx512": "avx512bw", "x86-64-avx2": "avx2"}
#: A profile of this test's own (``fp32_reference``): SSE4.2, no integer dot product, so a QDQ
#: model's convolutions run as written, dequantized in fp32.
FP32 = "x86-64-v2-fp32"


@pytest.fixture
def fp32_reference(tmp_path_factory, monkeypatch):
    from tvm_hybrid.targets import PATH_ENV

    d = tmp_path_factory.mktemp("profiles")
    (d / f"{FP32}.toml").write_text(f"""name = "{FP32}"
description = "SSE4.2, fake-quantized fp32 (tests/test_int8.py)"
family = "x86"
placement = "device"
backend = "cpu"
[tvm]
target = {{ kind = "llvm", mtriple = "x86_64-linux-gnu", mcpu = "x86-64-v2" }}
[capacity]
memory_bytes = 8589934592
peak_gflops = 100.0
bandwidth_gbps = 20.0
dtypes = ["float32", "int8", "uint8", "int32", "int64", "bool"]
""")
    monkeypatch.setenv(PATH_ENV, str(d))
    return FP32


def _compile(zm, target, tmp_path):
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    path = tmp_path / f"{zm.name}.onnx"
    path.write_bytes(zm.model.SerializeToString())
    inputs = tuple(InputOverride(k, v) for k, v in zm.input_shapes.items())
    [s] = compile_model(CompileOptions(model=path, targets=(target,), output=tmp_path / target, inputs=inputs,
                                       cloud=None, tuning_logs=None))  # fmt: skip
    return path, s.path


def test_vnni_profile_and_host_resolution():
    from tvm_hybrid.compiler import int8
    from tvm_hybrid.targets import host_profile_name, resolve

    assert int8.isa_of(resolve(VNNI).tvm()) is int8.VNNI
    assert int8.isa_of(resolve("arm64-cortex-a76").tvm()) is int8.SDOT  # armv8.2 +dotprod
    assert int8.isa_of(resolve("arm64").tvm()) is None and int8.isa_of(resolve("x86-64").tvm()) is None  # SSE4.2
    # without VNNI, vpmaddwd: int16 pairs, exact (vpmaddubsw's u8 x s8 pairs would saturate)
    assert int8.isa_of(resolve("x86-64-avx512").tvm()) is int8.MADD_512
    assert int8.isa_of(resolve("x86-64-avx2").tvm()) is int8.MADD_256
    v4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}
    assert host_profile_name(frozenset(v4 | {"avx512_vnni", "avx_vnni"})) == VNNI
    assert host_profile_name(frozenset(v4)) == "x86-64-avx512"
    assert int8.isa_of(resolve("x86-64-avx2-vnni").tvm()) is int8.AVX_VNNI
    assert host_profile_name(frozenset({"avx2", "fma", "avx_vnni"})) == "x86-64-avx2-vnni"  # Alder Lake
    assert host_profile_name(frozenset({"avx2", "fma"})) == "x86-64-avx2"
    # an artifact built for it says what it needs: a CPU without VNNI is told, not crashed
    assert "avx512_vnni" in hostcpu.missing_features(resolve(VNNI).tvm_target, frozenset(v4 | {"sse4_2"}))


#: (zoo builder, the op its int8 kernels compute, how many, the output quantized again at scale 0.05)
MODELS = {"convs": (zoo.qdq_convs, "conv2d", 4, "y2"), "matmuls": (zoo.qdq_matmul, "matmul", 2, "y1")}
SIGNS = pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])


@SIGNS
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("target", sorted(PROFILES))
def test_qdq_model_compiles_to_int8_kernels(target, model, signed, tmp_path, fp32_reference):
    """convs: every conv (asymmetric padding, stride 2, dilation, depthwise, per-tensor and per-channel
    weight scales, batch 2); matmuls: a MatMul with per-column weight scales and a Gemm of a
    flattened activation and a transposed weight. int8 kernels for each int8 profile, none for
    SSE4.2."""
    build, op, count, _ = MODELS[model]
    zm = build(signed)
    _, vnni = _compile(zm, target, tmp_path)
    _, plain = _compile(zm, fp32_reference, tmp_path)
    assert int8_kernels(vnni, op) == count
    assert int8_kernels(plain, op) == 0


@SIGNS
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("target", sorted(PROFILES))
def test_int8_kernels_match_the_dequantized_model(target, model, signed, tmp_path, fp32_reference):
    """The int8 build computes what the fp32 build of the same QDQ model computes (integer sums
    are exact; only the float conv's own rounding differs), and onnxruntime agrees up to its
    integer requantization, which rounds a few values to the neighbouring step."""
    from tvm_hybrid.runtime import Session

    if PROFILES[target] not in hostcpu.cpu_flags():
        pytest.skip(f"this CPU has no {PROFILES[target]}")
    build, _, _, requantized = MODELS[model]
    zm = build(signed)
    path, vnni = _compile(zm, target, tmp_path)
    _, plain = _compile(zm, fp32_reference, tmp_path)
    got, fp32 = Session(vnni).run(zm.feeds), Session(plain).run(zm.feeds)
    want = reference(path, zm.feeds)
    for name in ("y1", "y2"):
        np.testing.assert_allclose(got[name], fp32[name], rtol=1e-5, atol=1e-5 * np.abs(fp32[name]).max())
        same = np.isclose(got[name], want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max())
        assert same.mean() > 0.98, (name, same.mean())
    # the output quantized again (scale 0.05): never more than one step from onnxruntime's
    assert np.abs(got[requantized] - want[requantized]).max() <= 0.05 + 1e-6


def test_portable_artifact_carries_int8_builds_for_a_quantized_model(tmp_path, fp32_reference):
    """`-t x86-64` of a QDQ model: the VNNI builds join the AVX-512 and AVX2 ones (best first;
    a model without int8 compute gets only those two, tests/test_dispatch.py), all four with int8
    kernels. The runtime loads the best build this CPU runs, and the outputs are the fp32 build's."""
    import json

    from tvm_hybrid.manifest import Manifest
    from tvm_hybrid.runtime import Session

    zm = zoo.qdq_convs()
    path, art = _compile(zm, "x86-64", tmp_path)
    [seg] = Manifest.from_dict(json.loads((art / "manifest.json").read_text())).segments
    names = [v["profile"] for v in seg.variants]
    assert names == ["x86-64-avx512-vnni", "x86-64-avx512", "x86-64-avx2-vnni", "x86-64-avx2"]
    assert int8_kernels(art, "conv2d", seg.library) == 0  # the SSE4.2 build: fake-quantized fp32
    assert [int8_kernels(art, "conv2d", v["library"]) for v in seg.variants] == [4, 4, 4, 4]
    got = Session(art).run(zm.feeds)
    _, plain = _compile(zm, fp32_reference, tmp_path)
    want = Session(plain).run(zm.feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max())


def test_int8_profiles_use_their_base_tuning_log_until_they_have_one(tmp_path):
    """x86-64-avx512-vnni builds apply x86-64-avx512's log (same kernels, code every VNNI CPU
    runs) while theirs does not exist; a profile that could not run the base's code does not."""
    import dataclasses
    import shutil

    from tvm_hybrid.compiler import tuning_log
    from tvm_hybrid.targets import resolve

    logs = tuning_log.default_logs_dir()
    assert tuning_log.open_database(logs, resolve(VNNI)).path.name == "x86-64-avx512"
    assert tuning_log.open_database(logs, resolve("x86-64-avx2-vnni")).path.name == "x86-64-avx2"
    older = dataclasses.replace(resolve(VNNI), tvm_target={**resolve(VNNI).tvm_target, "mcpu": "haswell"})
    assert tuning_log.open_database(logs, older) is None  # AVX2 code cannot take AVX-512 records
    shutil.copytree(logs / "x86-64-avx512", tmp_path / "x86-64-avx512")
    assert tuning_log.open_database(tmp_path, resolve(VNNI)).path == tmp_path / "x86-64-avx512"


def _scalar(g, name: str, value) -> str:
    """A 0-d initializer, as onnxruntime's quantizer writes a per-tensor scale or zero point
    (``g.init`` makes them [1])."""
    from onnx import numpy_helper

    g.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _qdq(g, v: str, scale: float, zp: int, scope: str) -> str:
    """``v`` quantized to uint8 (one scale and zero point) and dequantized again."""
    s, z = _scalar(g, f"{scope}.scale", np.float32(scale)), _scalar(g, f"{scope}.zp", np.uint8(zp))
    return g.op("DequantizeLinear", [g.op("QuantizeLinear", [v, s, z], f"{scope}/Q"), s, z], f"{scope}/DQ")


def _requantized_conv(g, a: str, i: int, scale: float, zp: int) -> str:
    """A 3x3 16->16 conv ``c{i}`` of ``a`` (an int8 weight, one scale), its output quantized to
    uint8 at ``scale`` and ``zp`` and dequantized again."""
    w = g.rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 12
    ws = np.float32(np.abs(w).max() / 127)
    ins = [g.init(f"c{i}.wq", np.round(w / ws).astype(np.int8)), _scalar(g, f"c{i}.ws", ws), _scalar(g, f"c{i}.wz", np.int8(0))]
    conv = g.op("Conv", [a, g.op("DequantizeLinear", ins, f"/c{i}/w/DQ"), g.bias(f"c{i}.bias", 16)], f"/c{i}/Conv",
                pads=[1, 1, 1, 1])  # fmt: skip
    return _qdq(g, conv, scale, zp, f"/c{i}/out")


def _twin_convs() -> zoo.ZooModel:
    """Three 3x3 16->16 convs in a chain, each requantized, then HardSwish and requantized again, at different scales
    and zero points (as every layer of a quantized model has its own); the last one's output is
    dequantized for the model's output, the first two feed the next conv."""
    g = zoo._Graph("qdq_twin_convs")
    x = g.input("x", zoo.F32, [1, 16, 12, 12])
    a = _qdq(g, x, 0.03, 128, "/in")
    for i, (scale, zp) in enumerate([(0.021, 3), (0.017, 9), (0.019, 5)]):
        a = _requantized_conv(g, a, i, scale, zp)
        a = _qdq(g, g.op("HardSwish", [a], f"/c{i}/HardSwish"), scale * 0.8, zp + 2, f"/c{i}/act")
    g.output(g.op("Identity", [a], "/y/Identity", outputs=["y"]), zoo.F32, [1, 16, 12, 12])
    feeds = {"x": (np.random.RandomState(5).standard_normal((1, 16, 12, 12)) * 1.5).astype(np.float32)}
    return zoo.ZooModel("qdq_twin_convs", g.model(doc="two requantized convs"), feeds, {"x": (1, 16, 12, 12)})


def test_layers_that_differ_only_in_scales_share_one_kernel(tmp_path, fp32_reference):
    """Quantize/dequantize scales and zero points are kernel parameters, not immediates
    (``rewrites.qparams_as_tensors``): two convs of one shape whose requantizing epilogues differ
    only in them are one int8 kernel in the library (the first two convs; the last one's epilogue
    also dequantizes the output), and give what the fp32 build gives."""
    from tvm_hybrid.runtime import Session

    zm = _twin_convs()
    path, vnni = _compile(zm, VNNI, tmp_path)
    assert int8_kernels(vnni, "conv2d") == 2  # (3 while the scales were immediates)
    if "avx512_vnni" not in hostcpu.cpu_flags():
        pytest.skip("this CPU has no avx512_vnni")
    _, plain = _compile(zm, fp32_reference, tmp_path)
    got, fp32 = Session(vnni).run(zm.feeds)["y"], Session(plain).run(zm.feeds)["y"]
    assert np.abs(got - fp32).max() <= 0.019 + 1e-6  # at most one step of the last requantize
    assert np.mean(got == fp32) > 0.98
    want = reference(path, zm.feeds)["y"]
    assert np.abs(got - want).max() <= 0.019 + 1e-6


def test_fake_quantized_activations_skip_the_8bit_round_trip(tmp_path, fp32_reference):
    """``DequantizeLinear(QuantizeLinear(x))`` where nothing reads the 8-bit tensor becomes
    ``clip(round(x / s), qmin - z, qmax - z) * s`` (``rewrites.fake_quant_fused``): no quantize
    kernel is left in the SSE4.2 build of three requantized convs with HardSwish, and its output
    is within one step of the last requantize (scale 0.019) of onnxruntime's."""
    import re

    from tvm_hybrid.runtime import Session

    zm = _twin_convs()
    path, art = _compile(zm, fp32_reference, tmp_path)
    names = set(re.findall(rb"fused_[a-z0-9_]+", next((art / "segments").glob("*.so")).read_bytes()))
    assert any(b"fake_quant" in n for n in names)
    assert not any(re.search(rb"_(de)?quantize", n) for n in names), names
    got, want = Session(art).run(zm.feeds)["y"], reference(path, zm.feeds)["y"]
    assert np.abs(got - want).max() <= 0.019 + 1e-6
    assert np.mean(np.isclose(got, want, rtol=1e-5, atol=1e-6)) > 0.98


def _upsampling() -> zoo.ZooModel:
    """A quantized 16-channel map upsampled by a 2x2 stride-2 ConvTranspose (int8 weight, a scale
    per output channel, as PP-OCRv4 det's neck has two), requantized and dequantized."""
    g = zoo._Graph("qdq_upsampling")
    x = g.input("x", zoo.F32, [1, 16, 10, 12])

    w = g.rng.standard_normal((16, 8, 2, 2)).astype(np.float32) / 4  # IOHW: 8 output channels
    ws = (np.abs(w).max(axis=(0, 2, 3)) / 127).astype(np.float32)
    wq = np.round(w / ws[None, :, None, None]).astype(np.int8)
    dq = g.op("DequantizeLinear", [g.init("up.wq", wq), g.init("up.ws", ws), g.init("up.wz", np.zeros(8, np.int8))],
              "/up/w/DQ", axis=1)  # fmt: skip
    up = g.op("ConvTranspose", [_qdq(g, x, 0.03, 128, "/in"), dq, g.bias("up.bias", 8)], "/up/ConvTranspose",
              kernel_shape=[2, 2], strides=[2, 2])  # fmt: skip
    g.output(g.op("Identity", [_qdq(g, up, 0.02, 120, "/up/out")], "/y/Identity", outputs=["y"]), zoo.F32, [1, 8, 20, 24])
    feeds = {"x": (np.random.RandomState(7).standard_normal((1, 16, 10, 12)) * 1.5).astype(np.float32)}
    return zoo.ZooModel("qdq_upsampling", g.model(doc="int8 ConvTranspose"), feeds, {"x": (1, 16, 10, 12)})


@pytest.mark.parametrize("target", [VNNI, "x86-64-avx2"])
def test_upsampling_conv_transpose_computes_in_int8(target, tmp_path, fp32_reference):
    """A stride == kernel ConvTranspose of a quantized activation and int8 weight is an int8 1x1
    conv (``int8._rewrite_conv_transpose``: the weight permuted at compile time, each channel's
    scale repeated over its taps) and a pixel shuffle; its output is the fp32 build's, and within
    one step of the requantize (scale 0.02) of onnxruntime's."""
    from tvm_hybrid.runtime import Session

    zm = _upsampling()
    path, art = _compile(zm, target, tmp_path)
    assert int8_kernels(art, "conv2d") == 1
    if PROFILES[target] not in hostcpu.cpu_flags():
        pytest.skip(f"this CPU has no {PROFILES[target]}")
    _, plain = _compile(zm, fp32_reference, tmp_path)
    assert int8_kernels(plain, "conv2d") == 0
    got, fp32 = Session(art).run(zm.feeds)["y"], Session(plain).run(zm.feeds)["y"]
    assert np.abs(got - fp32).max() <= 0.02 + 1e-6 and np.mean(got == fp32) > 0.98
    want = reference(path, zm.feeds)["y"]
    assert np.abs(got - want).max() <= 0.02 + 1e-6


def test_depthwise_tiles_compute_the_fewest_vectors_past_the_map():
    """A depthwise tile's accumulators share no activation load, so its width is the one that
    computes the fewest vectors past the map's pixels (within 1/16 of the fewest, the widest)."""
    from types import SimpleNamespace

    from tvm_hybrid.compiler import int8

    def geometry(c, h, w, kh, kw, pads):
        attrs = SimpleNamespace(strides=(1, 1), dilation=(1, 1), padding=pads)
        return int8._Geometry.of((1, c, h, w), (c, 1, kh, kw), attrs, int8.VNNI, depthwise=True)

    # PP-OCR cls's 5x5 over maps two rows high, cut to 3x5: 2 rows of 100 = 13 vectors a channel,
    # which tiles of 4 vectors made 16
    g = geometry(200, 2, 96, 3, 5, (1, 2, 1, 2))
    assert (g.oh * g.wq, g.cols, g.pp) == (200, 1, 208)
    # 203 vectors: tiles of 4 compute one more, and stay
    g = geometry(144, 56, 56, 3, 3, (1, 1, 1, 1))
    assert (g.oh * g.wq, g.cols, g.pp) == (3248, 4, 3264)


def _affine_convs() -> zoo.ZooModel:
    """Two requantized 3x3 16->16 convs as PP-LCNet's blocks (PP-OCRv4 det's backbone) write them:
    conv, QDQ, a learnable affine (Mul, Add by scalars), HardSwish, another affine, QDQ."""
    g = zoo._Graph("qdq_affine_convs")
    x = g.input("x", zoo.F32, [1, 16, 12, 12])
    a = _qdq(g, x, 0.03, 128, "/in")
    for i, (scale, zp) in enumerate([(0.021, 3), (0.017, 9)]):
        a = _requantized_conv(g, a, i, scale, zp)
        for j, (k, d) in enumerate([(0.9, 0.1), (1.1, -0.05)]):
            if j:
                a = g.op("HardSwish", [a], f"/c{i}/HardSwish")
            a = g.op("Mul", [a, _scalar(g, f"c{i}.k{j}", np.float32(k))], f"/c{i}/lab{j}/Mul")
            a = g.op("Add", [a, _scalar(g, f"c{i}.d{j}", np.float32(d))], f"/c{i}/lab{j}/Add")
        a = _qdq(g, a, scale * 0.8, zp + 2, f"/c{i}/act")
    g.output(g.op("Identity", [a], "/y/Identity", outputs=["y"]), zoo.F32, [1, 16, 12, 12])
    feeds = {"x": (np.random.RandomState(6).standard_normal((1, 16, 12, 12)) * 1.5).astype(np.float32)}
    return zoo.ZooModel("qdq_affine_convs", g.model(doc="requantized convs with affines"), feeds, {"x": (1, 16, 12, 12)})


def _relax_ops(zm, tmp_path, target: str, folded: bool) -> dict[str, int]:
    """The Relax ops (and call_tir kernels, by name) of ``zm``'s main function after the CPU
    backend's rewrites, with ``rewrites.scalars_folded`` or without."""
    import collections

    import tvm
    from tvm import relax

    from tvm_hybrid.compiler import backends, importer
    from tvm_hybrid.targets import resolve

    path = tmp_path / f"{zm.name}.onnx"
    path.write_bytes(zm.model.SerializeToString())
    profile = resolve(target)
    mod = importer.to_relax(importer.load(str(path), [importer.InputOverride(k, v) for k, v in zm.input_shapes.items()]))
    backend = backends.for_profile(profile)
    seen = {}

    @tvm.transform.module_pass(opt_level=0)
    def grab(m, _ctx):
        seen["main"] = m["main"]
        return m

    backend.fuse(mod, profile, rewrites=[*backend.rewrites(profile, scalars_folded=folded), grab])
    ops = collections.Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            name = e.op.name
            if name == "relax.call_tir":
                name = e.args[0].name_hint.rstrip("0123456789") + f"/{len(e.args[1].fields)}"
            ops[name] += 1

    relax.analysis.post_order_visit(seen["main"], visit)
    return ops


@pytest.mark.parametrize("target", [VNNI, "fp32"])
def test_scalar_multiplies_and_adds_fold_into_the_requantizes(target, tmp_path, fp32_reference):
    """``rewrites.scalars_folded``: the affines' multiplies and adds, HardSwish's ``/ 6`` and the
    requantizes' divisions fold into the fake quants, the quantizes and (the int8 build) the
    convolutions' scales, and the output stays within one step (scale 0.0136) of onnxruntime's."""
    from tvm_hybrid.runtime import Session

    target = fp32_reference if target == "fp32" else target
    zm = _affine_convs()
    before, after = _relax_ops(zm, tmp_path, target, False), _relax_ops(zm, tmp_path, target, True)
    # each layer: the affine after the fake quant (into it), the scale of the one before the
    # requantize (into HardSwish's / 6, with the requantize's 1 / s) and its add (into the bias)
    assert before["relax.multiply"] - after["relax.multiply"] == 2 * 2, (before, after)
    assert before["relax.add"] - after["relax.add"] == 2 * 1, (before, after)
    if target == VNNI:  # every (fake) quantize reads its input divided by its scale: no 1 / s left
        assert after["fake_quant/5"] == 3 and after["quantize/2"] == 1 and before["fake_quant/4"] == 3, after
    path, art = _compile(zm, target, tmp_path)
    if target == VNNI and "avx512_vnni" not in hostcpu.cpu_flags():
        pytest.skip("this CPU has no avx512_vnni")
    got, want = Session(art).run(zm.feeds)["y"], reference(path, zm.feeds)["y"]
    assert np.abs(got - want).max() <= 0.0136 + 1e-6
    assert np.mean(np.isclose(got, want, rtol=1e-5, atol=1e-6)) > 0.98
