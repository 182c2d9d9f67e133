"""A small, deterministic ONNX model zoo for tests.

Every model is built with :mod:`onnx.helper` only (no torch), with weights drawn
from a ``numpy.random.RandomState`` seeded from the model's name, so the same
name always gives byte-identical models and example inputs.  The graphs mimic
what real exporters (mostly the PyTorch TorchScript exporter) emit: node names
such as ``/model.0/conv/Conv``, outputs named ``<node>_output_<i>``, weights as
initializers named ``model.0.conv.weight``, and shape/scalar constants as
``Constant`` nodes.

Usage::

    from tests.zoo import NAMES, build
    zm = build("resnet_block")
    zm.model, zm.feeds, zm.input_shapes, zm.rtol, zm.atol

Run ``python tests/zoo.py`` to check every model with the ONNX checker and
onnxruntime.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BENCH", "CONTROL_FLOW", "NAMES", "ZooModel", "build", "narrow_casts", "qdq_convs", "qdq_matmul", "vad",
           "vit"]

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    model: onnx.ModelProto  # checker-valid, opset 17 unless a model needs another
    feeds: dict[str, np.ndarray]  # deterministic example inputs (seeded), matching the fixed shapes
    input_shapes: dict[str, tuple[int, ...]]  # the static shapes to compile with (== feeds shapes)
    rtol: float = 1e-4  # tolerance vs onnxruntime for this model (f32)
    atol: float = 1e-5
    note: str = ""


# --------------------------------------------------------------------------
# graph-building helpers
# --------------------------------------------------------------------------


def _seed(name: str, salt: str = "") -> int:
    return zlib.crc32(f"{name}{salt}".encode()) & 0x7FFFFFFF


class _Graph:
    """Accumulates nodes/initializers with exporter-style names."""

    def __init__(self, name: str):
        self.name = name
        self.rng = np.random.RandomState(_seed(name, ":weights"))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set()

    # -- names -------------------------------------------------------------
    def _unique_node(self, name: str) -> str:
        """``/a/Constant`` -> ``/a/Constant_1`` -> ... like the torch exporter."""
        if name not in self._node_names:
            self._node_names.add(name)
            return name
        i = 1
        while f"{name}_{i}" in self._node_names:
            i += 1
        self._node_names.add(f"{name}_{i}")
        return f"{name}_{i}"

    def _claim(self, tensor: str) -> str:
        if tensor in self._tensor_names:
            raise ValueError(f"duplicate tensor name {tensor!r}")
        self._tensor_names.add(tensor)
        return tensor

    # -- graph io ------------------------------------------------------------
    def input(self, name: str, elem: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem, list(shape)))
        return name

    def output(self, tensor: str, elem: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(tensor, elem, list(shape)))

    # -- constants -----------------------------------------------------------
    def init(self, name: str, arr: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), self._claim(name)))
        return name

    def param(self, name: str, shape: Sequence[int], fan_in: int | None = None, gain: float = 1.0) -> str:
        """Random float32 weight, N(0, gain/fan_in) so activations stay O(1)."""
        if fan_in is None:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        w = self.rng.standard_normal(size=tuple(shape)) * (gain / np.sqrt(max(fan_in, 1)))
        return self.init(name, w.astype(np.float32))

    def bias(self, name: str, n: int, scale: float = 0.1) -> str:
        return self.init(name, (self.rng.standard_normal(size=(n,)) * scale).astype(np.float32))

    def const(self, value, dtype=None, scope: str = "") -> str:
        """A ``Constant`` node (how exporters emit shapes and scalars)."""
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        node = self._unique_node(f"{scope}/Constant")
        out = self._claim(f"{node}_output_0")
        self.nodes.append(
            helper.make_node("Constant", [], [out], name=node, value=numpy_helper.from_array(arr, ""))
        )
        return out

    # -- ops -------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        n_out: int = 1,
        outputs: Sequence[str] | None = None,
        **attrs,
    ):
        node = self._unique_node(name)
        if outputs is None:
            outputs = [f"{node}_output_{i}" for i in range(n_out)]
        outputs = [self._claim(o) for o in outputs]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=node, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    # -- composite layers --------------------------------------------------------
    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        scope: str,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = True,
        node: str = "Conv",
        gain: float = 1.0,
        output: str | None = None,
    ) -> str:
        """``{scope}/Conv`` with ``{scope}.weight``/``.bias`` initializers (scope ``/a/b`` -> ``a.b``)."""
        pad = k // 2 if pad is None else pad
        pname = scope.strip("/").replace("/", ".")
        fan_in = (cin // group) * k * k
        ins = [x, self.param(f"{pname}.weight", (cout, cin // group, k, k), fan_in=fan_in, gain=gain)]
        if bias:
            ins.append(self.bias(f"{pname}.bias", cout))
        return self.op(
            "Conv",
            ins,
            f"{scope}/{node}",
            outputs=None if output is None else [output],
            dilations=[1, 1],
            group=group,
            kernel_shape=[k, k],
            pads=[pad, pad, pad, pad],
            strides=[stride, stride],
        )

    def batchnorm(self, x: str, c: int, scope: str) -> str:
        p = scope.strip("/").replace("/", ".")
        r = self.rng
        ins = [
            x,
            self.init(f"{p}.weight", r.uniform(0.5, 1.5, size=(c,)).astype(np.float32)),
            self.init(f"{p}.bias", (r.standard_normal(size=(c,)) * 0.1).astype(np.float32)),
            self.init(f"{p}.running_mean", (r.standard_normal(size=(c,)) * 0.1).astype(np.float32)),
            self.init(f"{p}.running_var", r.uniform(0.5, 1.5, size=(c,)).astype(np.float32)),
        ]
        return self.op("BatchNormalization", ins, f"{scope}/BatchNormalization", epsilon=1e-5, momentum=0.9)

    def silu(self, x: str, scope: str) -> str:
        s = self.op("Sigmoid", [x], f"{scope}/Sigmoid")
        return self.op("Mul", [x, s], f"{scope}/Mul")

    def linear(self, x: str, fin: int, fout: int, scope: str, output: str | None = None) -> str:
        """torch.nn.Linear on a 2-D input: ``Gemm(transB=1)``."""
        p = scope.strip("/").replace("/", ".")
        w = self.param(f"{p}.weight", (fout, fin), fan_in=fin)
        b = self.bias(f"{p}.bias", fout)
        return self.op(
            "Gemm", [x, w, b], f"{scope}/Gemm", outputs=None if output is None else [output],
            alpha=1.0, beta=1.0, transB=1,
        )

    def matmul_linear(self, x: str, fin: int, fout: int, scope: str, output: str | None = None) -> str:
        """torch.nn.Linear on an N-D input: ``MatMul`` with a pre-transposed weight + ``Add``."""
        wt = self.param(f"onnx::MatMul_{scope.strip('/').replace('/', '.')}", (fin, fout), fan_in=fin)
        b = self.bias(f"{scope.strip('/').replace('/', '.')}.bias", fout)
        y = self.op("MatMul", [x, wt], f"{scope}/MatMul")
        return self.op("Add", [b, y], f"{scope}/Add", outputs=None if output is None else [output])

    # -- finish ---------------------------------------------------------------------
    def model(self, opset: int = OPSET, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "main_graph", self.inputs, self.outputs, initializer=self.initializers, doc_string=doc
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=IR_VERSION,
            producer_name="tvm-hybrid-zoo",
            producer_version="1",
        )
        m.model_version = 1
        return m


def _feeds(name: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(_seed(name, ":feeds"))
    out = {}
    for k, (shape, dtype) in specs.items():
        out[k] = rng.standard_normal(size=shape).astype(dtype)
    return out


def _zoo(
    name: str,
    g: _Graph,
    shapes: dict[str, tuple[int, ...]],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    note: str = "",
) -> ZooModel:
    model = g.model(doc=note)
    feeds = _feeds(name, {k: (v, np.float32) for k, v in shapes.items()})
    return ZooModel(
        name=name, model=model, feeds=feeds, input_shapes=dict(shapes), rtol=rtol, atol=atol, note=note
    )


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def _mlp() -> ZooModel:
    g = _Graph("mlp")
    x = g.input("x", F32, [4, 64])
    h = g.linear(x, 64, 128, "/fc1")
    h = g.op("Relu", [h], "/act1/Relu")
    h = g.matmul_linear(h, 128, 64, "/fc2")  # the MatMul + Add flavour of Linear
    h = g.op("Relu", [h], "/act2/Relu")
    g.linear(h, 64, 10, "/head", output="logits")
    g.output("logits", F32, [4, 10])
    return _zoo("mlp", g, {"x": (4, 64)}, note="Gemm / MatMul+Add / Relu MLP")


def _resnet_block() -> ZooModel:
    g = _Graph("resnet_block")
    x = g.input("input", F32, [1, 3, 32, 32])

    def conv_bn(x, cin, cout, k, scope_conv, scope_bn, stride=1):
        y = g.conv(x, cin, cout, k, scope_conv, stride=stride, bias=False, gain=np.sqrt(2.0))
        return g.batchnorm(y, cout, scope_bn)

    h = conv_bn(x, 3, 16, 3, "/conv1", "/bn1")
    h = g.op("Relu", [h], "/relu/Relu")

    def block(x, cin, cout, scope):
        y = conv_bn(x, cin, cout, 3, f"{scope}/conv1", f"{scope}/bn1")
        y = g.op("Relu", [y], f"{scope}/relu/Relu")
        y = conv_bn(y, cout, cout, 3, f"{scope}/conv2", f"{scope}/bn2")
        if cin != cout:
            sc = conv_bn(x, cin, cout, 1, f"{scope}/downsample/downsample.0", f"{scope}/downsample/downsample.1")
        else:
            sc = x
        y = g.op("Add", [y, sc], f"{scope}/Add")
        return g.op("Relu", [y], f"{scope}/relu_1/Relu")

    h = block(h, 16, 16, "/layer1/layer1.0")
    h = g.op("MaxPool", [h], "/maxpool/MaxPool", ceil_mode=0, kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2])
    h = block(h, 16, 32, "/layer2/layer2.0")
    h = g.op("GlobalAveragePool", [h], "/avgpool/GlobalAveragePool")
    h = g.op("Flatten", [h], "/Flatten", axis=1)
    g.linear(h, 32, 10, "/fc", output="logits")
    g.output("logits", F32, [1, 10])
    return _zoo(
        "resnet_block", g, {"input": (1, 3, 32, 32)}, atol=1e-4,
        note="Conv+BatchNormalization+Relu, residual Add (one with 1x1 downsample), MaxPool, GAP, Flatten, Gemm",
    )


def _dw_se() -> ZooModel:
    g = _Graph("dw_se")
    x = g.input("input", F32, [1, 16, 24, 24])
    s = "/features/features.1/block"
    h = g.conv(x, 16, 32, 1, f"{s}/block.0/block.0.0", gain=np.sqrt(2.0))
    h = g.op("HardSwish", [h], f"{s}/block.0/block.0.2/HardSwish")
    h = g.conv(h, 32, 32, 3, f"{s}/block.1/block.1.0", group=32, gain=np.sqrt(2.0))  # depthwise
    h = g.op("HardSwish", [h], f"{s}/block.1/block.1.2/HardSwish")
    # squeeze-excite
    se = f"{s}/block.2"
    p = g.op("GlobalAveragePool", [h], f"{se}/avgpool/GlobalAveragePool")
    p = g.conv(p, 32, 8, 1, f"{se}/fc1")
    p = g.op("Relu", [p], f"{se}/activation/Relu")
    p = g.conv(p, 8, 32, 1, f"{se}/fc2")
    p = g.op("HardSigmoid", [p], f"{se}/scale_activation/HardSigmoid", alpha=1.0 / 6.0, beta=0.5)
    h = g.op("Mul", [p, h], f"{se}/Mul")
    h = g.conv(h, 32, 16, 1, f"{s}/block.3/block.3.0")
    h = g.op("Add", [h, x], "/features/features.1/Add")
    g.op("HardSwish", [h], "/features/features.2/HardSwish", outputs=["output"])
    g.output("output", F32, [1, 16, 24, 24])
    return _zoo(
        "dw_se", g, {"input": (1, 16, 24, 24)}, atol=1e-4,
        note="MobileNetV3-style: depthwise Conv (group=C), squeeze-excite with HardSigmoid, HardSwish",
    )


def _attention() -> ZooModel:
    g = _Graph("attention")
    S, D, H = 16, 64, 4
    Dh = D // H
    x = g.input("x", F32, [1, S, D])
    L = "/encoder/layer.0"

    def layernorm(x, scope):
        p = scope.strip("/").replace("/", ".")
        w = g.init(f"{p}.weight", g.rng.uniform(0.8, 1.2, size=(D,)).astype(np.float32))
        b = g.init(f"{p}.bias", (g.rng.standard_normal(size=(D,)) * 0.05).astype(np.float32))
        return g.op("LayerNormalization", [x, w, b], f"{scope}/LayerNormalization", axis=-1, epsilon=1e-5)

    a = f"{L}/attention"
    h = layernorm(x, f"{a}/layernorm")
    q = g.matmul_linear(h, D, D, f"{a}/query")
    k = g.matmul_linear(h, D, D, f"{a}/key")
    v = g.matmul_linear(h, D, D, f"{a}/value")
    heads = g.const([1, S, H, Dh], np.int64, scope=a)
    q = g.op("Reshape", [q, heads], f"{a}/Reshape")
    k = g.op("Reshape", [k, heads], f"{a}/Reshape")
    v = g.op("Reshape", [v, heads], f"{a}/Reshape")
    q = g.op("Transpose", [q], f"{a}/Transpose", perm=[0, 2, 1, 3])
    kt = g.op("Transpose", [k], f"{a}/Transpose", perm=[0, 2, 3, 1])
    v = g.op("Transpose", [v], f"{a}/Transpose", perm=[0, 2, 1, 3])
    sc = g.op("MatMul", [q, kt], f"{a}/MatMul")
    sc = g.op("Div", [sc, g.const(np.float32(np.sqrt(Dh)), scope=a)], f"{a}/Div")
    pr = g.op("Softmax", [sc], f"{a}/Softmax", axis=-1)
    ctx = g.op("MatMul", [pr, v], f"{a}/MatMul")
    ctx = g.op("Transpose", [ctx], f"{a}/Transpose", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.const([1, S, D], np.int64, scope=a)], f"{a}/Reshape")
    o = g.matmul_linear(ctx, D, D, f"{a}/output/dense")
    x1 = g.op("Add", [o, x], f"{a}/Add")

    m = f"{L}/mlp"
    h = layernorm(x1, f"{m}/layernorm")
    h = g.matmul_linear(h, D, 4 * D, f"{m}/fc1")
    # GELU, erf formulation as exported by torch: 0.5 * x * (1 + erf(x / sqrt(2)))
    act = f"{m}/act"
    e = g.op("Div", [h, g.const(np.float32(1.4142135381698608), scope=act)], f"{act}/Div")
    e = g.op("Erf", [e], f"{act}/Erf")
    e = g.op("Add", [e, g.const(np.float32(1.0), scope=act)], f"{act}/Add")
    e = g.op("Mul", [h, e], f"{act}/Mul")
    e = g.op("Mul", [e, g.const(np.float32(0.5), scope=act)], f"{act}/Mul")
    h = g.matmul_linear(e, 4 * D, D, f"{m}/fc2")
    g.op("Add", [h, x1], f"{m}/Add", outputs=["last_hidden_state"])
    g.output("last_hidden_state", F32, [1, S, D])
    return _zoo(
        "attention", g, {"x": (1, S, D)}, atol=1e-4,
        note="pre-LN transformer layer: LayerNormalization, 4-head self-attention, erf-GELU MLP, residuals",
    )


def _resize_convtranspose() -> ZooModel:
    g = _Graph("resize_convtranspose")
    x = g.input("input", F32, [1, 8, 16, 16])
    d = g.conv(x, 8, 16, 3, "/down", stride=2, gain=np.sqrt(2.0))  # 1x16x8x8
    d = g.op("Relu", [d], "/down_act/Relu")
    # ConvTranspose stride 2: weight is (Cin, Cout/group, kh, kw)
    wt = g.param("up.weight", (16, 8, 2, 2), fan_in=16 * 4 // 4)
    bt = g.bias("up.bias", 8)
    up = g.op(
        "ConvTranspose", [d, wt, bt], "/up/ConvTranspose",
        dilations=[1, 1], group=1, kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2],
    )  # 1x8x16x16
    scales = g.const([1.0, 1.0, 2.0, 2.0], np.float32)
    nn = g.op(
        "Resize", [d, "", scales], "/upsample_nearest/Resize",
        coordinate_transformation_mode="asymmetric", cubic_coeff_a=-0.75, mode="nearest", nearest_mode="floor",
    )  # 1x16x16x16
    roi = g.const(np.zeros((0,), np.float32))  # older torch exports pass an empty roi tensor
    scales2 = g.const([1.0, 1.0, 2.0, 2.0], np.float32)
    lin = g.op(
        "Resize", [d, roi, scales2], "/upsample_linear/Resize",
        coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75, mode="linear", nearest_mode="floor",
    )  # 1x16x16x16
    cat = g.op("Concat", [x, up, nn, lin], "/Concat", axis=1)  # 1x48x16x16
    g.conv(cat, 48, 8, 1, "/fuse", output="output")
    g.output("output", F32, [1, 8, 16, 16])
    return _zoo(
        "resize_convtranspose", g, {"input": (1, 8, 16, 16)}, atol=1e-4,
        note="Conv stride 2, ConvTranspose stride 2, Resize nearest(asymmetric/floor) and linear(half_pixel), Concat",
    )


def _split_concat() -> ZooModel:
    g = _Graph("split_concat")
    x = g.input("input", F32, [1, 12, 8, 8])
    split = g.const([3, 4, 5], np.int64)
    a, b, c = g.op("Split", [x, split], "/Split", n_out=3, axis=1)
    a = g.op("Sigmoid", [a], "/branch0/Sigmoid")
    b = g.op("Tanh", [b], "/branch1/Tanh")
    c = g.conv(c, 5, 5, 3, "/branch2/conv")
    c = g.op("Relu", [c], "/branch2/relu/Relu")
    y = g.op("Concat", [a, b, c], "/Concat", axis=1)
    g.op("Add", [y, x], "/Add", outputs=["output"])
    g.output("output", F32, [1, 12, 8, 8])
    return _zoo(
        "split_concat", g, {"input": (1, 12, 8, 8)},
        note="uneven Split (opset-13 split input) into Sigmoid / Tanh / Conv branches, Concat, residual",
    )


def _multi_io() -> ZooModel:
    g = _Graph("multi_io")
    img = g.input("image", F32, [1, 3, 16, 16])
    meta = g.input("meta", F32, [1, 8])
    f = g.conv(img, 3, 8, 3, "/backbone/conv", stride=2, gain=np.sqrt(2.0))
    g.op("Relu", [f], "/backbone/relu/Relu", outputs=["feat"])  # 1x8x8x8, also a graph output
    p = g.op("GlobalAveragePool", ["feat"], "/pool/GlobalAveragePool")
    p = g.op("Flatten", [p], "/pool/Flatten", axis=1)  # 1x8
    m = g.linear(meta, 8, 8, "/meta_proj")
    m = g.op("Relu", [m], "/meta_act/Relu")
    cat = g.op("Concat", [p, m], "/head/Concat", axis=1)  # 1x16
    s = g.linear(cat, 16, 1, "/head/fc")
    g.op("Sigmoid", [s], "/head/Sigmoid", outputs=["head/score:0"])
    a = g.op("Add", [p, m], "/aux/Add")
    g.op("Tanh", [a], "/aux/Tanh", outputs=["aux"])
    g.output("feat", F32, [1, 8, 8, 8])
    g.output("head/score:0", F32, [1, 1])
    g.output("aux", F32, [1, 8])
    return _zoo(
        "multi_io", g, {"image": (1, 3, 16, 16), "meta": (1, 8)},
        note="two inputs, three outputs; an output name with '/' and ':' (head/score:0); "
        "an intermediate tensor (feat) that is also a graph output",
    )


def _int64_shape() -> ZooModel:
    g = _Graph("int64_shape")
    x = g.input("x", F32, ["batch", 3, 8, 8])
    y = g.conv(x, 3, 4, 3, "/conv", gain=np.sqrt(2.0))
    y = g.op("Relu", [y], "/relu/Relu")  # (B,4,8,8)
    shp = g.op("Shape", [y], "/Shape")

    def dim(i):
        return g.op("Gather", [shp, g.const(np.int64(i))], "/Gather", axis=0)  # 0-d int64

    def unsq(t):
        return g.op("Unsqueeze", [t, g.const([0], np.int64)], "/Unsqueeze")

    b, c, h, w = dim(0), dim(1), dim(2), dim(3)
    # int(h * 0.5) -> Cast / Mul / Floor / Cast
    hf = g.op("Cast", [h], "/Cast", to=F32)
    hf = g.op("Mul", [hf, g.const(np.float32(0.5))], "/Mul")
    hf = g.op("Floor", [hf], "/Floor")
    h2 = g.op("Cast", [hf], "/Cast", to=I64)
    # w // 2 * 2 and c * 2 -> int64 Div / Mul by int64 constants
    w2 = g.op("Div", [w, g.const(np.int64(2))], "/Div")
    w2 = g.op("Mul", [w2, g.const(np.int64(2))], "/Mul")
    c2 = g.op("Mul", [c, g.const(np.int64(2))], "/Mul")
    s1 = g.op("Concat", [unsq(b), unsq(c2), unsq(h2), unsq(w2)], "/Concat", axis=0)
    r = g.op("Reshape", [y, s1], "/Reshape")  # (B,8,4,8)
    cscale = g.init("channel_scale", g.rng.uniform(0.5, 1.5, size=(1, 8, 1, 1)).astype(np.float32))
    r = g.op("Mul", [r, cscale], "/Mul")
    # flatten: x.view(x.size(0), c * h * w)
    chw = g.op("Mul", [c, g.op("Mul", [h, w], "/Mul")], "/Mul")
    s2 = g.op("Concat", [unsq(b), unsq(chw)], "/Concat", axis=0)
    flat = g.op("Reshape", [r, s2], "/Reshape")  # (B,256)
    g.linear(flat, 256, 10, "/fc", output="output")
    g.output("output", F32, ["batch", 10])
    return _zoo(
        "int64_shape", g, {"x": (2, 3, 8, 8)},
        note="dynamic batch (dim_param 'batch'); Shape/Gather/Unsqueeze/Concat/Reshape shape arithmetic, "
        "Cast/Floor and int64 Mul/Div",
    )


def _silu_chain() -> ZooModel:
    g = _Graph("silu_chain")
    x = g.input("input", F32, [1, 8, 16, 16])
    h = x
    for i, (cin, cout, k) in enumerate([(8, 16, 3), (16, 16, 3), (16, 16, 1), (16, 8, 3)]):
        h = g.conv(h, cin, cout, k, f"/layers/layers.{i}/conv", gain=np.sqrt(2.0))
        h = g.silu(h, f"/layers/layers.{i}/act")
    r = g.rng
    h = g.op("Mul", [h, g.init("mul_const", r.uniform(0.5, 1.5, size=(1, 8, 1, 1)).astype(np.float32))], "/Mul")
    h = g.op("Add", [h, g.init("add_const", (r.standard_normal(size=(8, 1, 1)) * 0.1).astype(np.float32))], "/Add")
    h = g.op("Sub", [h, g.const(np.float32(0.25))], "/Sub")
    h = g.op("Div", [h, g.init("div_const", r.uniform(0.5, 2.0, size=(1, 1, 1, 16)).astype(np.float32))], "/Div")
    h = g.op("Sub", [g.const(np.float32(1.0)), h], "/Sub")  # scalar on the left
    g.op("Add", [h, x], "/Add", outputs=["output"])
    g.output("output", F32, [1, 8, 16, 16])
    return _zoo(
        "silu_chain", g, {"input": (1, 8, 16, 16)}, atol=1e-4,
        note="Conv + SiLU (x*Sigmoid(x)) x4, then Mul/Add/Sub/Div with broadcast constants",
    )


def _softmax_argmax() -> ZooModel:
    g = _Graph("softmax_argmax")
    x = g.input("input", F32, [2, 32])
    logits = g.linear(x, 32, 10, "/fc")
    g.op("Softmax", [logits], "/Softmax", outputs=["probs"], axis=-1)
    g.op("ArgMax", [logits], "/ArgMax", outputs=["label"], axis=-1, keepdims=0, select_last_index=0)
    g.output("probs", F32, [2, 10])
    g.output("label", I64, [2])
    return _zoo(
        "softmax_argmax", g, {"input": (2, 32)},
        note="Gemm -> Softmax (probs, f32) and ArgMax keepdims=0 (label, int64)",
    )


def _make_anchors(sizes: Sequence[tuple[int, int]], strides: Sequence[int], offset: float = 0.5):
    pts, strs = [], []
    for (h, w), s in zip(sizes, strides):
        sx = np.arange(w, dtype=np.float32) + offset
        sy = np.arange(h, dtype=np.float32) + offset
        yy, xx = np.meshgrid(sy, sx, indexing="ij")
        pts.append(np.stack([xx, yy], -1).reshape(-1, 2))
        strs.append(np.full((h * w, 1), s, dtype=np.float32))
    anchors = np.concatenate(pts).T[None]  # (1, 2, A)
    stride = np.concatenate(strs).T  # (1, A)
    return anchors.astype(np.float32), stride.astype(np.float32)


def _yolo_head() -> ZooModel:
    g = _Graph("yolo_head")
    nc, reg_max = 8, 16
    x = g.input("images", F32, [1, 3, 64, 64])

    def cbs(x, cin, cout, k, scope, stride=1):  # ultralytics Conv: conv + BN(folded) + SiLU
        y = g.conv(x, cin, cout, k, f"{scope}/conv", stride=stride, gain=np.sqrt(2.0))
        return g.silu(y, f"{scope}/act")

    h = cbs(x, 3, 16, 3, "/model.0", stride=2)  # 32x32
    h = cbs(h, 16, 32, 3, "/model.1", stride=2)  # 16x16
    # C2f(32, 32, n=1, shortcut=True)
    s = "/model.2"
    h = cbs(h, 32, 32, 1, f"{s}/cv1")
    y0, y1 = g.op("Split", [h, g.const([16, 16], np.int64, scope=s)], f"{s}/Split", n_out=2, axis=1)
    m = cbs(y1, 16, 16, 3, f"{s}/m.0/cv1")
    m = cbs(m, 16, 16, 3, f"{s}/m.0/cv2")
    m = g.op("Add", [y1, m], f"{s}/m.0/Add")
    h = g.op("Concat", [y0, y1, m], f"{s}/Concat", axis=1)
    h = cbs(h, 48, 32, 1, f"{s}/cv2")
    p3 = cbs(h, 32, 32, 3, "/model.3", stride=2)  # 8x8, stride 8
    p4 = cbs(p3, 32, 64, 3, "/model.4", stride=2)  # 4x4, stride 16

    # Detect head
    d = "/model.5"
    no = 4 * reg_max + nc
    flat = []
    for i, (feat, ch) in enumerate([(p3, 32), (p4, 64)]):
        b = cbs(feat, ch, 32, 3, f"{d}/cv2.{i}/cv2.{i}.0")
        b = cbs(b, 32, 32, 3, f"{d}/cv2.{i}/cv2.{i}.1")
        b = g.conv(b, 32, 4 * reg_max, 1, f"{d}/cv2.{i}/cv2.{i}.2")
        c = cbs(feat, ch, 32, 3, f"{d}/cv3.{i}/cv3.{i}.0")
        c = cbs(c, 32, 32, 3, f"{d}/cv3.{i}/cv3.{i}.1")
        c = g.conv(c, 32, nc, 1, f"{d}/cv3.{i}/cv3.{i}.2")
        bc = g.op("Concat", [b, c], f"{d}/Concat", axis=1)
        flat.append(g.op("Reshape", [bc, g.const([1, no, -1], np.int64, scope=d)], f"{d}/Reshape"))
    xcat = g.op("Concat", flat, f"{d}/Concat", axis=2)  # (1, no, A)
    anchors, strides = _make_anchors([(8, 8), (4, 4)], [8, 16])
    A = anchors.shape[-1]
    box, cls = g.op("Split", [xcat, g.const([4 * reg_max, nc], np.int64, scope=d)], f"{d}/Split", n_out=2, axis=1)

    # DFL: (1,64,A) -> (1,4,16,A) -> transpose -> softmax over 16 -> 1x1 conv with arange weights
    dfl = f"{d}/dfl"
    t = g.op("Reshape", [box, g.const([1, 4, reg_max, A], np.int64, scope=dfl)], f"{dfl}/Reshape")
    t = g.op("Transpose", [t], f"{dfl}/Transpose", perm=[0, 2, 1, 3])
    t = g.op("Softmax", [t], f"{dfl}/Softmax", axis=1)
    wd = g.init("model.5.dfl.conv.weight", np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1))
    t = g.op(
        "Conv", [t, wd], f"{dfl}/conv/Conv",
        dilations=[1, 1], group=1, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1],
    )  # (1,1,4,A)
    dist = g.op("Reshape", [t, g.const([1, 4, A], np.int64, scope=dfl)], f"{dfl}/Reshape")

    # dist2bbox(xywh=True) then * strides
    def sl(start, end):
        return g.op(
            "Slice",
            [
                dist,
                g.const([start], np.int64, scope=d),
                g.const([end], np.int64, scope=d),
                g.const([1], np.int64, scope=d),
                g.const([1], np.int64, scope=d),
            ],
            f"{d}/Slice",
        )

    lt, rb = sl(0, 2), sl(2, 4)
    anc = g.const(anchors, scope=d)
    x1y1 = g.op("Sub", [anc, lt], f"{d}/Sub")
    x2y2 = g.op("Add", [anc, rb], f"{d}/Add")
    cxy = g.op("Add", [x1y1, x2y2], f"{d}/Add")
    cxy = g.op("Div", [cxy, g.const(np.float32(2.0), scope=d)], f"{d}/Div")
    wh = g.op("Sub", [x2y2, x1y1], f"{d}/Sub")
    dbox = g.op("Concat", [cxy, wh], f"{d}/Concat", axis=1)
    dbox = g.op("Mul", [dbox, g.const(strides, scope=d)], f"{d}/Mul")
    cls = g.op("Sigmoid", [cls], f"{d}/Sigmoid")
    g.op("Concat", [dbox, cls], f"{d}/Concat", outputs=["output0"], axis=1)
    g.output("output0", F32, [1, 4 + nc, A])
    return _zoo(
        "yolo_head", g, {"images": (1, 3, 64, 64)}, rtol=1e-4, atol=1e-4,
        note="YOLOv8-style: Conv+SiLU backbone with C2f Split, two-scale Detect head, DFL "
        "(Reshape/Transpose/Softmax/arange Conv), Slice-based dist2bbox with anchors, Div, stride Mul",
    )


def yolov8(name: str, img: int, widths=(16, 32, 64, 128, 256), depths=(1, 2, 2, 1), nc: int = 80,
           reg_max: int = 16) -> ZooModel:
    """A YOLOv8 detector as ultralytics exports it (YOLOv8n's widths and depths by default, random
    weights): Conv+SiLU stem, C2f stages (Split, bottlenecks with residual Adds, Concat), SPPF
    (three chained 5x5 MaxPools), the PAN neck (nearest Resize x2, Concat, stride-2 Convs), and
    the three-scale Detect head with DFL and dist2bbox decoding."""
    g = _Graph(name)
    x = g.input("images", F32, [1, 3, img, img])

    def cbs(x, cin, cout, k, scope, stride=1):
        return g.silu(g.conv(x, cin, cout, k, f"{scope}/conv", stride=stride, gain=np.sqrt(2.0)), f"{scope}/act")

    def c2f(x, cin, cout, n, scope, shortcut=True):
        c = cout // 2
        h = cbs(x, cin, 2 * c, 1, f"{scope}/cv1")
        ys = list(g.op("Split", [h, g.const([c, c], np.int64, scope=scope)], f"{scope}/Split", n_out=2, axis=1))
        for i in range(n):
            m = cbs(ys[-1], c, c, 3, f"{scope}/m.{i}/cv1")
            m = cbs(m, c, c, 3, f"{scope}/m.{i}/cv2")
            ys.append(g.op("Add", [ys[-1], m], f"{scope}/m.{i}/Add") if shortcut else m)
        return cbs(g.op("Concat", ys, f"{scope}/Concat", axis=1), (2 + n) * c, cout, 1, f"{scope}/cv2")

    def sppf(x, cin, cout, scope):
        c = cin // 2
        h = cbs(x, cin, c, 1, f"{scope}/cv1")
        ys = [h]
        for i in range(3):
            ys.append(g.op("MaxPool", [ys[-1]], f"{scope}/m/MaxPool", kernel_shape=[5, 5], pads=[2, 2, 2, 2],
                           strides=[1, 1]))  # fmt: skip
        return cbs(g.op("Concat", ys, f"{scope}/Concat", axis=1), 4 * c, cout, 1, f"{scope}/cv2")

    def up(x, scope):
        return g.op("Resize", [x, g.const(np.zeros(0, np.float32), scope=scope),
                               g.const(np.array([1, 1, 2, 2], np.float32), scope=scope)],
                    f"{scope}/Resize", mode="nearest", coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor")  # fmt: skip

    w0, w1, w2, w3, w4 = widths
    h = cbs(x, 3, w0, 3, "/model.0", stride=2)
    h = cbs(h, w0, w1, 3, "/model.1", stride=2)
    h = c2f(h, w1, w1, depths[0], "/model.2")
    h = cbs(h, w1, w2, 3, "/model.3", stride=2)
    p3 = c2f(h, w2, w2, depths[1], "/model.4")
    h = cbs(p3, w2, w3, 3, "/model.5", stride=2)
    p4 = c2f(h, w3, w3, depths[2], "/model.6")
    h = cbs(p4, w3, w4, 3, "/model.7", stride=2)
    h = c2f(h, w4, w4, depths[3], "/model.8")
    p5 = sppf(h, w4, w4, "/model.9")
    h = g.op("Concat", [up(p5, "/model.10"), p4], "/model.11/Concat", axis=1)
    n4 = c2f(h, w4 + w3, w3, 1, "/model.12", shortcut=False)
    h = g.op("Concat", [up(n4, "/model.13"), p3], "/model.14/Concat", axis=1)
    o3 = c2f(h, w3 + w2, w2, 1, "/model.15", shortcut=False)
    h = g.op("Concat", [cbs(o3, w2, w2, 3, "/model.16", stride=2), n4], "/model.17/Concat", axis=1)
    o4 = c2f(h, w2 + w3, w3, 1, "/model.18", shortcut=False)
    h = g.op("Concat", [cbs(o4, w3, w3, 3, "/model.19", stride=2), p5], "/model.20/Concat", axis=1)
    o5 = c2f(h, w3 + w4, w4, 1, "/model.21", shortcut=False)

    d = "/model.22"
    no = 4 * reg_max + nc
    cb, cc = max(16, w2 // 4, 4 * reg_max), max(w2, min(nc, 100))
    flat, sizes = [], []
    for i, (feat, ch, stride) in enumerate([(o3, w2, 8), (o4, w3, 16), (o5, w4, 32)]):
        b = cbs(feat, ch, cb, 3, f"{d}/cv2.{i}/cv2.{i}.0")
        b = cbs(b, cb, cb, 3, f"{d}/cv2.{i}/cv2.{i}.1")
        b = g.conv(b, cb, 4 * reg_max, 1, f"{d}/cv2.{i}/cv2.{i}.2")
        c = cbs(feat, ch, cc, 3, f"{d}/cv3.{i}/cv3.{i}.0")
        c = cbs(c, cc, cc, 3, f"{d}/cv3.{i}/cv3.{i}.1")
        c = g.conv(c, cc, nc, 1, f"{d}/cv3.{i}/cv3.{i}.2")
        flat.append(g.op("Reshape", [g.op("Concat", [b, c], f"{d}/Concat", axis=1),
                                     g.const([1, no, -1], np.int64, scope=d)], f"{d}/Reshape"))  # fmt: skip
        sizes.append((img // stride, img // stride))
    xcat = g.op("Concat", flat, f"{d}/Concat", axis=2)
    anchors, strides = _make_anchors(sizes, [8, 16, 32])
    A = anchors.shape[-1]
    box, cls = g.op("Split", [xcat, g.const([4 * reg_max, nc], np.int64, scope=d)], f"{d}/Split", n_out=2, axis=1)
    dfl = f"{d}/dfl"
    t = g.op("Reshape", [box, g.const([1, 4, reg_max, A], np.int64, scope=dfl)], f"{dfl}/Reshape")
    t = g.op("Softmax", [g.op("Transpose", [t], f"{dfl}/Transpose", perm=[0, 2, 1, 3])], f"{dfl}/Softmax", axis=1)
    wd = g.init("model.22.dfl.conv.weight", np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1))
    t = g.op("Conv", [t, wd], f"{dfl}/conv/Conv", kernel_shape=[1, 1])
    dist = g.op("Reshape", [t, g.const([1, 4, A], np.int64, scope=dfl)], f"{dfl}/Reshape")
    lt, rb = g.op("Split", [dist, g.const([2, 2], np.int64, scope=d)], f"{d}/Split", n_out=2, axis=1)
    anc = g.const(anchors, scope=d)
    x1y1, x2y2 = g.op("Sub", [anc, lt], f"{d}/Sub"), g.op("Add", [anc, rb], f"{d}/Add")
    cxy = g.op("Div", [g.op("Add", [x1y1, x2y2], f"{d}/Add"), g.const(np.float32(2.0), scope=d)], f"{d}/Div")
    dbox = g.op("Concat", [cxy, g.op("Sub", [x2y2, x1y1], f"{d}/Sub")], f"{d}/Concat", axis=1)
    dbox = g.op("Mul", [dbox, g.const(strides, scope=d)], f"{d}/Mul")
    g.op("Concat", [dbox, g.op("Sigmoid", [cls], f"{d}/Sigmoid")], f"{d}/Concat", outputs=["output0"], axis=1)
    g.output("output0", F32, [1, 4 + nc, A])
    return _zoo(name, g, {"images": (1, 3, img, img)}, rtol=1e-4, atol=1e-3,
                note="YOLOv8 (ultralytics export layout): C2f, SPPF, PAN neck, 3-scale Detect with DFL")  # fmt: skip


def resnet(name: str, img: int, layers=(3, 4, 6, 3), classes: int = 1000) -> ZooModel:
    """A ResNet (ResNet-50's bottleneck stages by default) as torchvision exports it in eval
    mode: BatchNorm folded into each Conv's bias, Relu, a 3x3 stride-2 MaxPool after the 7x7
    stride-2 stem, stride on the bottlenecks' 3x3 conv (v1.5), 1x1 downsample convs, residual
    Adds, GlobalAveragePool, Flatten, Gemm."""
    g = _Graph(name)
    x = g.input("input", F32, [1, 3, img, img])
    gain = np.sqrt(2.0)
    h = g.op("Relu", [g.conv(x, 3, 64, 7, "/conv1", stride=2, pad=3, gain=gain)], "/relu/Relu")
    h = g.op("MaxPool", [h], "/maxpool/MaxPool", ceil_mode=0, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    cin = 64
    for li, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
        for bi in range(n):
            s = f"/layer{li + 1}/layer{li + 1}.{bi}"
            stride = 2 if bi == 0 and li > 0 else 1
            y = g.op("Relu", [g.conv(h, cin, width, 1, f"{s}/conv1", gain=gain)], f"{s}/relu/Relu")
            y = g.op("Relu", [g.conv(y, width, width, 3, f"{s}/conv2", stride=stride, gain=gain)], f"{s}/relu_1/Relu")
            y = g.conv(y, width, 4 * width, 1, f"{s}/conv3", gain=0.5)
            sc = g.conv(h, cin, 4 * width, 1, f"{s}/downsample/downsample.0", stride=stride) if bi == 0 else h
            h = g.op("Relu", [g.op("Add", [y, sc], f"{s}/Add")], f"{s}/relu_2/Relu")
            cin = 4 * width
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h], "/avgpool/GlobalAveragePool")], "/Flatten", axis=1)
    g.linear(h, cin, classes, "/fc", output="logits")
    g.output("logits", F32, [1, classes])
    return _zoo(name, g, {"input": (1, 3, img, img)}, atol=1e-4,
                note="ResNet-50 (torchvision eval export): folded BN, bottlenecks, residual Adds, GAP, Gemm")


def mobilenet_v2(name: str, img: int, classes: int = 1000) -> ZooModel:
    """MobileNetV2 as torchvision exports it in eval mode: BatchNorm folded into the convs,
    ReLU6 as ``Clip(0, 6)``, inverted residual blocks (1x1 expand, 3x3 depthwise, some of stride
    2, 1x1 project, residual Add where shapes allow), a 1280-channel 1x1 conv, GAP, Gemm."""
    g = _Graph(name)
    x = g.input("input", F32, [1, 3, img, img])
    lo, hi = g.const(np.float32(0.0), scope="/relu6"), g.const(np.float32(6.0), scope="/relu6")
    gain = np.sqrt(2.0)

    def cbr(x, cin, cout, k, scope, stride=1, group=1):
        return g.op("Clip", [g.conv(x, cin, cout, k, f"{scope}/Conv", stride=stride, group=group, gain=gain,
                                    node="Conv"), lo, hi], f"{scope}/Clip")  # fmt: skip

    h = cbr(x, 3, 32, 3, "/features/features.0/features.0.0", stride=2)
    cin, i = 32, 1
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for j in range(n):
            scope, stride, hidden = f"/features/features.{i}/conv", s if j == 0 else 1, cin * t
            y = h
            if t != 1:
                y = cbr(y, cin, hidden, 1, f"{scope}/conv.0/conv.0.0")
            y = cbr(y, hidden, hidden, 3, f"{scope}/conv.{1 if t != 1 else 0}/conv.{1 if t != 1 else 0}.0",
                    stride=stride, group=hidden)  # fmt: skip
            y = g.conv(y, hidden, c, 1, f"{scope}/conv.{2 if t != 1 else 1}", gain=0.5)
            h = g.op("Add", [h, y], f"/features/features.{i}/Add") if stride == 1 and cin == c else y
            cin, i = c, i + 1
    h = cbr(h, cin, 1280, 1, f"/features/features.{i}/features.{i}.0")
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h], "/GlobalAveragePool")], "/Flatten", axis=1)
    g.linear(h, 1280, classes, "/classifier/classifier.1", output="logits")
    g.output("logits", F32, [1, classes])
    return _zoo(name, g, {"input": (1, 3, img, img)}, atol=1e-4,
                note="MobileNetV2 (torchvision eval export): ReLU6 as Clip, inverted residuals, depthwise convs")


def vit(name: str, img: int, patch: int, dim: int, depth: int, heads: int, classes: int, atol: float = 1e-4) -> ZooModel:
    """A ViT image classifier as torch exports timm's ViT (pre-LN, erf-GELU, class token):
    patch-embedding Conv (stride = kernel = ``patch``), Flatten/Transpose to tokens, Concat of
    the class token, positional Add, ``depth`` blocks of LayerNorm → fused-QKV MatMul → per-head
    Reshape/Transpose → MatMul·scale → Softmax → MatMul → projection, residuals, LayerNorm → MLP
    (GELU) → residual, then a final LayerNorm and a Gemm head on the class token.
    ``vit("vit_s16", 224, 16, 384, 12, 6, 1000)`` is ViT-S/16 (22M parameters)."""
    g = _Graph(name)
    n = (img // patch) ** 2
    S, Dh = n + 1, dim // heads
    x = g.input("pixel_values", F32, [1, 3, img, img])

    def layernorm(t, scope):
        p = scope.strip("/").replace("/", ".")
        w = g.init(f"{p}.weight", g.rng.uniform(0.8, 1.2, size=(dim,)).astype(np.float32))
        b = g.init(f"{p}.bias", (g.rng.standard_normal(size=(dim,)) * 0.05).astype(np.float32))
        return g.op("LayerNormalization", [t, w, b], f"{scope}/LayerNormalization", axis=-1, epsilon=1e-6)

    t = g.conv(x, 3, dim, patch, "/patch_embed/proj", stride=patch, pad=0)
    t = g.op("Reshape", [t, g.const([1, dim, n], np.int64, scope="/patch_embed")], "/patch_embed/Reshape")
    t = g.op("Transpose", [t], "/patch_embed/Transpose", perm=[0, 2, 1])
    cls = g.init("cls_token", (g.rng.standard_normal(size=(1, 1, dim)) * 0.02).astype(np.float32))
    t = g.op("Concat", [cls, t], "/Concat", axis=1)
    pos = g.init("pos_embed", (g.rng.standard_normal(size=(1, S, dim)) * 0.02).astype(np.float32))
    t = g.op("Add", [t, pos], "/Add")
    for i in range(depth):
        b = f"/blocks.{i}"
        a = f"{b}/attn"
        h = layernorm(t, f"{b}/norm1")
        qkv = g.matmul_linear(h, dim, 3 * dim, f"{a}/qkv")
        qkv = g.op("Reshape", [qkv, g.const([1, S, 3, heads, Dh], np.int64, scope=a)], f"{a}/Reshape")
        qkv = g.op("Transpose", [qkv], f"{a}/Transpose", perm=[2, 0, 3, 1, 4])
        q, k, v = g.op("Split", [qkv, g.const([1, 1, 1], np.int64, scope=a)], f"{a}/Split", n_out=3, axis=0)
        q, k, v = (g.op("Squeeze", [z, g.const([0], np.int64, scope=a)], f"{a}/Squeeze") for z in (q, k, v))
        q = g.op("Mul", [q, g.const(np.float32(Dh ** -0.5), scope=a)], f"{a}/Mul")
        kt = g.op("Transpose", [k], f"{a}/Transpose", perm=[0, 1, 3, 2])
        sc = g.op("MatMul", [q, kt], f"{a}/MatMul")
        pr = g.op("Softmax", [sc], f"{a}/Softmax", axis=-1)
        ctx = g.op("MatMul", [pr, v], f"{a}/MatMul")
        ctx = g.op("Transpose", [ctx], f"{a}/Transpose", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([1, S, dim], np.int64, scope=a)], f"{a}/Reshape")
        t = g.op("Add", [t, g.matmul_linear(ctx, dim, dim, f"{a}/proj")], f"{b}/Add")
        m = f"{b}/mlp"
        h = g.matmul_linear(layernorm(t, f"{b}/norm2"), dim, 4 * dim, f"{m}/fc1")
        e = g.op("Div", [h, g.const(np.float32(1.4142135381698608), scope=f"{m}/act")], f"{m}/act/Div")
        e = g.op("Erf", [e], f"{m}/act/Erf")
        e = g.op("Add", [e, g.const(np.float32(1.0), scope=f"{m}/act")], f"{m}/act/Add")
        e = g.op("Mul", [h, e], f"{m}/act/Mul")
        e = g.op("Mul", [e, g.const(np.float32(0.5), scope=f"{m}/act")], f"{m}/act/Mul")
        t = g.op("Add", [t, g.matmul_linear(e, 4 * dim, dim, f"{m}/fc2")], f"{b}/Add")
    t = layernorm(t, "/norm")
    c = g.op("Gather", [t, g.const(0, np.int64, scope="/head")], "/head/Gather", axis=1)
    g.linear(c, dim, classes, "/head", output="logits")
    g.output("logits", F32, [1, classes])
    return _zoo(name, g, {"pixel_values": (1, 3, img, img)}, atol=atol,
                note=f"ViT: {img}px, patch {patch}, dim {dim}, depth {depth}, {heads} heads, {classes} classes")


def _vit_tiny() -> ZooModel:
    return vit("vit_tiny", 32, 8, 64, 2, 4, 10)


# -- control flow and state ---------------------------------------------------------------


def _branch(name: str, nodes: list, outputs: list) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], outputs)


def _if_runtime() -> ZooModel:
    """An If on a condition computed from the input at run time (mean > 0): both branches
    are compiled, the VM picks one per call."""
    g = _Graph("if_runtime")
    x = g.input("x", F32, [2, 16])
    h = g.linear(x, 16, 16, "/fc")
    m = g.op("ReduceMean", [h], "/gate/ReduceMean", keepdims=0)
    cond = g.op("Greater", [m, g.const(np.float32(0.0), scope="/gate")], "/gate/Greater")
    then = _branch("then", [helper.make_node("Relu", [h], ["t_out"])],
                   [helper.make_tensor_value_info("t_out", F32, [2, 16])])  # fmt: skip
    other = _branch("else", [helper.make_node("Tanh", [h], ["e_out"])],
                    [helper.make_tensor_value_info("e_out", F32, [2, 16])])  # fmt: skip
    y = g.op("If", [cond], "/If", then_branch=then, else_branch=other)
    g.output(y, F32, [2, 16])
    return _zoo("if_runtime", g, {"x": (2, 16)})


def _loop_scan() -> ZooModel:
    """A Loop with a constant trip count (an exponential moving average, with a scan output)
    and a Scan over the sequence axis: both unrolled at import."""
    g = _Graph("loop_scan")
    g.input("x", F32, [6, 8])
    g.param("w", (8, 8))  # x and w are read inside the loop body (outer scope)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Gather", ["x", "i"], ["row"], axis=0),
         helper.make_node("MatMul", ["row", "w"], ["proj"]),
         helper.make_node("Mul", ["acc_in", "decay"], ["kept"]),
         helper.make_node("Add", ["kept", "proj"], ["acc_out"]),
         helper.make_node("Identity", ["acc_out"], ["trace"])],
        "ema", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_in", F32, [8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", F32, [8]),
         helper.make_tensor_value_info("trace", F32, [8])],
        initializer=[numpy_helper.from_array(np.float32(0.75), "decay")])  # fmt: skip
    trip = g.init("trip", np.array(6, np.int64))
    acc0 = g.init("acc0", np.zeros(8, np.float32))
    final, trace = g.op("Loop", [trip, "", acc0], "/Loop", n_out=2, body=body)
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "elem"], ["s_out"]), helper.make_node("Relu", ["s_out"], ["s_seq"])],
        "cumsum", [helper.make_tensor_value_info("s_in", F32, [8]), helper.make_tensor_value_info("elem", F32, [8])],
        [helper.make_tensor_value_info("s_out", F32, [8]), helper.make_tensor_value_info("s_seq", F32, [8])])  # fmt: skip
    total, seq = g.op("Scan", [acc0, trace], "/Scan", n_out=2, body=scan_body, num_scan_inputs=1,
                      scan_input_directions=[1])  # fmt: skip
    g.output(final, F32, [8])
    g.output(total, F32, [8])
    g.output(seq, F32, [6, 8])
    return _zoo("loop_scan", g, {"x": (6, 8)})


def _crnn_lstm() -> ZooModel:
    """A CRNN text recognizer's shape: convs down to a width-wise sequence, a bidirectional LSTM
    and a GRU over it, per-step class scores (the LSTM and GRU are unrolled at import)."""
    g = _Graph("crnn_lstm")
    x = g.input("x", F32, [1, 3, 16, 48])
    h = g.op("Relu", [g.conv(x, 3, 16, 3, "/backbone/conv1", stride=2)], "/backbone/relu1")
    h = g.op("Relu", [g.conv(h, 16, 32, 3, "/backbone/conv2", stride=2)], "/backbone/relu2")  # [1, 32, 4, 12]
    h = g.op("ReduceMean", [h], "/neck/ReduceMean", axes=[2], keepdims=0)  # [1, 32, 12]
    seq = g.op("Transpose", [h], "/neck/Transpose", perm=[2, 0, 1])  # [12, 1, 32]
    hid = 24
    w = g.param("rnn.lstm.W", (2, 4 * hid, 32), fan_in=32)
    r = g.param("rnn.lstm.R", (2, 4 * hid, hid), fan_in=hid)
    b = g.bias("rnn.lstm.B.flat", 2 * 8 * hid)
    bb = g.op("Reshape", [b, g.const(np.array([2, 8 * hid], np.int64), scope="/rnn")], "/rnn/Reshape")
    y = g.op("LSTM", [seq, w, r, bb], "/rnn/LSTM", n_out=1, hidden_size=hid, direction="bidirectional")  # [12, 2, 1, 24]
    y = g.op("Transpose", [y], "/rnn/Transpose", perm=[0, 2, 1, 3])
    y = g.op("Reshape", [y, g.const(np.array([12, 1, 2 * hid], np.int64), scope="/rnn2")], "/rnn2/Reshape")
    gw = g.param("rnn.gru.W", (1, 3 * hid, 2 * hid), fan_in=2 * hid)
    gr = g.param("rnn.gru.R", (1, 3 * hid, hid), fan_in=hid)
    gb = g.bias("rnn.gru.B", 6 * hid)
    gbb = g.op("Reshape", [gb, g.const(np.array([1, 6 * hid], np.int64), scope="/rnn3")], "/rnn3/Reshape")
    gy, _ = g.op("GRU", [y, gw, gr, gbb], "/rnn/GRU", n_out=2, hidden_size=hid, linear_before_reset=1)
    gy = g.op("Reshape", [gy, g.const(np.array([12, hid], np.int64), scope="/head")], "/head/Reshape")
    logits = g.matmul_linear(gy, hid, 10, "/head/fc")
    out = g.op("Softmax", [logits], "/head/Softmax", axis=-1)
    g.output(out, F32, [12, 10])
    return _zoo("crnn_lstm", g, {"x": (1, 3, 16, 48)})


def crnn(name: str, height: int, width: int, hidden: int, classes: int) -> ZooModel:
    """A CRNN text recognizer as the classic paper and its many exports build it: a VGG-style
    conv/BatchNorm/ReLU backbone with 2x2 then 2x1 max pools down to a width-wise sequence (the
    rest of the height averaged), two bidirectional LSTM layers, and a per-step linear
    classifier with Softmax. ``crnn("crnn_60x160", 60, 160, 128, 97)``: 1x3x60x160 in, 40 steps
    of 97 classes out."""
    g = _Graph(name)
    x = g.input("x", F32, [1, 3, height, width])

    def cbr(t, cin, cout, scope):
        return g.op("Relu", [g.batchnorm(g.conv(t, cin, cout, 3, f"{scope}/conv", bias=False), cout, f"{scope}/bn")],
                    f"{scope}/Relu")  # fmt: skip

    def pool(t, kw, scope):
        return g.op("MaxPool", [t], f"{scope}/MaxPool", kernel_shape=[2, kw], strides=[2, kw])

    h = pool(cbr(x, 3, 64, "/cnn/0"), 2, "/cnn/p0")  # H/2, W/2
    h = pool(cbr(h, 64, 128, "/cnn/1"), 2, "/cnn/p1")  # H/4, W/4
    h = pool(cbr(cbr(h, 128, 256, "/cnn/2"), 256, 256, "/cnn/3"), 1, "/cnn/p2")  # H/8, W/4
    h = cbr(cbr(h, 256, 256, "/cnn/4"), 256, 256, "/cnn/5")
    steps = width // 4
    h = g.op("ReduceMean", [h], "/neck/ReduceMean", axes=[2], keepdims=0)  # [1, 256, steps]
    seq = g.op("Transpose", [h], "/neck/Transpose", perm=[2, 0, 1])  # [steps, 1, 256]
    fin = 256
    for i in range(2):
        s = f"/rnn.{i}"
        w = g.param(f"rnn.{i}.W", (2, 4 * hidden, fin), fan_in=fin)
        r = g.param(f"rnn.{i}.R", (2, 4 * hidden, hidden), fan_in=hidden)
        b = g.bias(f"rnn.{i}.B", 2 * 8 * hidden)
        b = g.op("Reshape", [b, g.const(np.array([2, 8 * hidden], np.int64), scope=s)], f"{s}/Reshape")
        y = g.op("LSTM", [seq, w, r, b], f"{s}/LSTM", n_out=1, hidden_size=hidden, direction="bidirectional")
        y = g.op("Transpose", [y], f"{s}/Transpose", perm=[0, 2, 1, 3])  # [steps, 1, 2, hidden]
        seq = g.op("Reshape", [y, g.const(np.array([steps, 1, 2 * hidden], np.int64), scope=f"{s}/out")],
                   f"{s}/out/Reshape")  # fmt: skip
        fin = 2 * hidden
    flat = g.op("Reshape", [seq, g.const(np.array([steps, fin], np.int64), scope="/head")], "/head/Reshape")
    logits = g.linear(flat, fin, classes, "/head/fc")
    g.op("Softmax", [logits], "/head/Softmax", outputs=["probs"], axis=-1)
    g.output("probs", F32, [steps, classes])
    return _zoo(name, g, {"x": (1, 3, height, width)}, atol=1e-5,
                note=f"CRNN: {height}x{width}, VGG backbone, 2 BiLSTM({hidden}), {classes} classes")


def svtr_rec(name: str, height: int, width: int, classes: int) -> ZooModel:
    """A PP-OCRv4-recognizer-shaped model (SVTR-LCNet, as PaddleOCR exports it): a PP-LCNet
    backbone of depthwise-separable blocks with HardSwish (stride 2 in height only in its later
    stages, so the width keeps 1/8 of the pixels), an SVTR neck (a 3x3 and a 1x1 conv down to 120
    channels, two pre-LN transformer blocks over the width-wise tokens: fused QKV, 8 heads,
    Softmax, MLP with Swish, then back to channels, concatenated with the shortcut and mixed by
    a 3x3 and a 1x1 conv) and a CTC head (Gemm to ``classes`` and Softmax). Random weights: the
    shape of the real model, not its accuracy. ``svtr_rec("ppocrv4_rec_shaped", 48, 320,
    6625)``."""
    g = _Graph(name)
    x = g.input("x", F32, [1, 3, height, width])

    def hswish(t, scope):
        return g.op("HardSwish", [t], f"{scope}/HardSwish")

    def cbh(t, cin, cout, k, scope, stride=(1, 1), group=1):
        y = g.conv(t, cin, cout, k, f"{scope}/conv", group=group, bias=False)
        if stride != (1, 1):  # the conv helper strides both axes alike: pool the rest
            y = g.op("MaxPool", [y], f"{scope}/MaxPool", kernel_shape=list(stride), strides=list(stride))
        return hswish(g.batchnorm(y, cout, f"{scope}/bn"), scope)

    h = cbh(x, 3, 16, 3, "/backbone/stem", stride=(2, 2))  # 24 x 160
    blocks = [(16, 32, (1, 1)), (32, 64, (2, 2)), (64, 64, (1, 1)), (64, 128, (2, 1)), (128, 128, (1, 1)),
              (128, 256, (2, 1)), (256, 256, (1, 1)), (256, 256, (1, 1)), (256, 480, (2, 1))]  # fmt: skip
    for i, (cin, cout, st) in enumerate(blocks):
        s = f"/backbone/blocks.{i}"
        h = cbh(h, cin, cin, 3, f"{s}/dw", stride=st, group=cin)
        h = cbh(h, cin, cout, 1, f"{s}/pw")
    hh, ww = height // 2 // 16, width // 2 // 2  # 1 x 80 at 48x320
    h = g.op("AveragePool", [h], "/backbone/pool", kernel_shape=[hh, 2], strides=[hh, 2])  # 1 x ww/2
    steps = ww // 2
    dim, heads = 120, 8
    shortcut = h
    n = "/neck"
    z = cbh(h, 480, 60, 3, f"{n}/conv1")
    z = cbh(z, 60, dim, 1, f"{n}/conv2")
    t = g.op("Reshape", [z, g.const([1, dim, steps], np.int64, scope=n)], f"{n}/Reshape")
    t = g.op("Transpose", [t], f"{n}/Transpose", perm=[0, 2, 1])  # [1, steps, dim]
    Dh = dim // heads

    def layernorm(t, scope):
        p = scope.strip("/").replace("/", ".")
        w = g.init(f"{p}.weight", g.rng.uniform(0.8, 1.2, size=(dim,)).astype(np.float32))
        b = g.init(f"{p}.bias", (g.rng.standard_normal(size=(dim,)) * 0.05).astype(np.float32))
        return g.op("LayerNormalization", [t, w, b], f"{scope}/LayerNormalization", axis=-1, epsilon=1e-6)

    for i in range(2):
        b = f"{n}/svtr_block.{i}"
        a = f"{b}/mixer"
        qkv = g.matmul_linear(layernorm(t, f"{b}/norm1"), dim, 3 * dim, f"{a}/qkv")
        qkv = g.op("Reshape", [qkv, g.const([1, steps, 3, heads, Dh], np.int64, scope=a)], f"{a}/Reshape")
        qkv = g.op("Transpose", [qkv], f"{a}/Transpose", perm=[2, 0, 3, 1, 4])
        q, k, v = g.op("Split", [qkv, g.const([1, 1, 1], np.int64, scope=a)], f"{a}/Split", n_out=3, axis=0)
        q, k, v = (g.op("Squeeze", [z, g.const([0], np.int64, scope=a)], f"{a}/Squeeze") for z in (q, k, v))
        q = g.op("Mul", [q, g.const(np.float32(Dh ** -0.5), scope=a)], f"{a}/Mul")
        sc = g.op("MatMul", [q, g.op("Transpose", [k], f"{a}/Transpose", perm=[0, 1, 3, 2])], f"{a}/MatMul")
        ctx = g.op("MatMul", [g.op("Softmax", [sc], f"{a}/Softmax", axis=-1), v], f"{a}/MatMul")
        ctx = g.op("Transpose", [ctx], f"{a}/Transpose", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([1, steps, dim], np.int64, scope=a)], f"{a}/Reshape")
        t = g.op("Add", [t, g.matmul_linear(ctx, dim, dim, f"{a}/proj")], f"{b}/Add")
        m = f"{b}/mlp"
        e = g.matmul_linear(layernorm(t, f"{b}/norm2"), dim, 2 * dim, f"{m}/fc1")
        e = g.silu(e, f"{m}/act")
        t = g.op("Add", [t, g.matmul_linear(e, 2 * dim, dim, f"{m}/fc2")], f"{b}/Add")
    t = layernorm(t, f"{n}/norm")
    t = g.op("Transpose", [t], f"{n}/Transpose", perm=[0, 2, 1])
    t = g.op("Reshape", [t, g.const([1, dim, 1, steps], np.int64, scope=f"{n}/back")], f"{n}/back/Reshape")
    z = cbh(t, dim, 480, 1, f"{n}/conv3")
    z = g.op("Concat", [shortcut, z], f"{n}/Concat", axis=1)
    z = cbh(z, 960, 60, 3, f"{n}/conv4")
    z = cbh(z, 60, dim, 1, f"{n}/conv1x1")
    z = g.op("Reshape", [z, g.const([1, dim, steps], np.int64, scope="/head")], "/head/Reshape")
    z = g.op("Transpose", [z], "/head/Transpose", perm=[0, 2, 1])  # [1, steps, dim]
    logits = g.matmul_linear(z, dim, classes, "/head/fc")
    g.op("Softmax", [logits], "/head/Softmax", outputs=["probs"], axis=-1)
    g.output("probs", F32, [1, steps, classes])
    return _zoo(name, g, {"x": (1, 3, height, width)}, atol=1e-5,
                note=f"PP-OCRv4-rec-shaped (SVTR-LCNet): {height}x{width}, {steps} steps, {classes} classes")


def vad() -> ZooModel:
    """A voice-activity detector's shape (the widely used one is opset 15 with If on ``sr``, a
    state in and out, a scalar ``sr``): a frame of audio and the LSTM state in, the speech
    probability and the next state out; ``If`` on the sample rate picks the front end at run time.
    Run step after step with the state fed back (tests/test_controlflow.py)."""
    g = _Graph("vad")
    x = g.input("input", F32, [1, 256])
    state = g.input("state", F32, [2, 1, 32])
    sr = g.input("sr", I64, [])
    w16 = g.param("frontend16.weight", (256, 64), fan_in=256)
    w8 = g.param("frontend8.weight", (256, 64), fan_in=128)
    is16 = g.op("Equal", [sr, g.const(np.int64(16000), scope="/sr")], "/sr/Equal")
    then = _branch("sr16000", [helper.make_node("MatMul", [x, w16], ["f16"])],
                   [helper.make_tensor_value_info("f16", F32, [1, 64])])  # fmt: skip
    other = _branch("sr8000", [helper.make_node("MatMul", [x, w8], ["f8"]), helper.make_node("Abs", ["f8"], ["f8a"])],
                    [helper.make_tensor_value_info("f8a", F32, [1, 64])])  # fmt: skip
    feats = g.op("If", [is16], "/frontend/If", then_branch=then, else_branch=other)
    feats = g.op("Relu", [g.op("Add", [feats, g.bias("frontend.bias", 64)], "/frontend/Add")], "/frontend/Relu")
    seq = g.op("Unsqueeze", [feats, g.const(np.array([0], np.int64), scope="/lstm")], "/lstm/Unsqueeze")  # [1, 1, 64]
    h0 = g.op("Gather", [state, g.const(np.array([0], np.int64), scope="/lstm/h")], "/lstm/h/Gather", axis=0)
    c0 = g.op("Gather", [state, g.const(np.array([1], np.int64), scope="/lstm/c")], "/lstm/c/Gather", axis=0)
    w = g.param("lstm.W", (1, 128, 64), fan_in=64, gain=2.0)
    r = g.param("lstm.R", (1, 128, 32), fan_in=32, gain=2.0)
    b = g.init("lstm.B", (g.rng.standard_normal((1, 256)) * 0.1).astype(np.float32))
    _, hn, cn = g.op("LSTM", [seq, w, r, b, "", h0, c0], "/lstm/LSTM", n_out=3, hidden_size=32)
    new_state = g.op("Concat", [hn, cn], "/state/Concat", outputs=["stateN"], axis=0)
    flat = g.op("Reshape", [hn, g.const(np.array([1, 32], np.int64), scope="/head")], "/head/Reshape")
    prob = g.op("Sigmoid", [g.matmul_linear(flat, 32, 1, "/head/fc")], "/head/Sigmoid", outputs=["output"])
    g.output(prob, F32, [1, 1])
    g.output(new_state, F32, [2, 1, 32])
    model = g.model(opset=15, doc="VAD-shaped: If on sr, LSTM state in and out")
    rng = np.random.RandomState(_seed("vad", ":feeds"))
    feeds = {"input": (rng.standard_normal((1, 256)) * 0.5).astype(np.float32),
             "state": np.zeros((2, 1, 32), np.float32), "sr": np.array(16000, np.int64)}  # fmt: skip
    return ZooModel("vad", model, feeds, {"input": (1, 256), "state": (2, 1, 32), "sr": ()})


def qdq_convs(signed: bool = False) -> ZooModel:
    """Quantized convolutions as QDQ exporters write them (``DequantizeLinear`` of a quantized
    activation and of int8 weights): a 3x3 stride-2 conv with asymmetric padding and per-channel
    weight scales, its ReLU and QuantizeLinear, then two paths from that one activation (a 1x1
    conv with a per-tensor weight scale, output in float; a 5x5 depthwise conv with a vertical
    stride of 2 and asymmetric padding, quantized again, then a dilated 3x3 quantized again),
    batch 2.
    ``signed``: int8 activations (nonzero zero points) instead of uint8."""
    name = "qdq_convs_s8" if signed else "qdq_convs"
    g = _Graph(name)
    adt = np.int8 if signed else np.uint8
    x = g.input("x", F32, [2, 12, 21, 24])

    def qdq(v, scale, zp, scope):
        s, z = g.init(f"{scope}.scale", np.float32(scale)), g.init(f"{scope}.zp", adt(zp))
        q = g.op("QuantizeLinear", [v, s, z], f"{scope}/QuantizeLinear")
        return g.op("DequantizeLinear", [q, s, z], f"{scope}/DequantizeLinear")

    def weight(scope, shape, per_channel=True):
        w = g.rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))
        scale = np.abs(w).reshape(shape[0], -1).max(axis=1) / 127 if per_channel else np.float32(np.abs(w).max() / 127)
        q = np.clip(np.round(w / (scale.reshape(-1, 1, 1, 1) if per_channel else scale)), -127, 127).astype(np.int8)
        ins = [g.init(f"{scope}.weight_q", q), g.init(f"{scope}.weight_scale", np.asarray(scale, np.float32)),
               g.init(f"{scope}.weight_zp", np.zeros(shape[0] if per_channel else (), np.int8))]  # fmt: skip
        return g.op("DequantizeLinear", ins, f"{scope}/weight/DequantizeLinear", axis=0)

    a = qdq(x, 0.03, -3 if signed else 125, "/in")
    a = g.op("Conv", [a, weight("/c1", (20, 12, 3, 3)), g.bias("c1.bias", 20)], "/c1/Conv",
             strides=[2, 2], pads=[1, 0, 2, 1])  # fmt: skip
    a = qdq(g.op("Relu", [a], "/c1/Relu"), 0.02, -128 if signed else 0, "/c1/out")
    y1 = g.op("Conv", [a, weight("/c2", (24, 20, 1, 1), per_channel=False)], "/c2/Conv", outputs=["y1"])
    d = g.op("Conv", [a, weight("/dw", (20, 1, 5, 5)), g.bias("dw.bias", 20)], "/dw/Conv", group=20, strides=[2, 1],
             pads=[2, 1, 2, 3])  # fmt: skip
    d = qdq(d, 0.03, 5 if signed else 130, "/dw/out")
    y2 = g.op("Conv", [d, weight("/c3", (10, 20, 3, 3)), g.bias("c3.bias", 10)], "/c3/Conv", dilations=[2, 2],
              pads=[2, 2, 2, 2])  # fmt: skip
    y2 = g.op("Identity", [qdq(y2, 0.05, 7 if signed else 100, "/c3/out")], "/y2/Identity", outputs=["y2"])
    g.output(y1, F32, [2, 24, 11, 12])
    g.output(y2, F32, [2, 10, 6, 12])
    rng = np.random.RandomState(_seed(name, ":feeds"))
    feeds = {"x": (rng.standard_normal((2, 12, 21, 24)) * 1.5).astype(np.float32)}
    return ZooModel(name, g.model(doc="QDQ convolutions"), feeds, {"x": (2, 12, 21, 24)})


def qdq_matmul(signed: bool = False) -> ZooModel:
    """Quantized matmuls as QDQ exporters write them: ``MatMul(DequantizeLinear(x_q), DequantizeLinear(w_q))``
    of a batch of sequences with one weight scale per output column, quantized again; and a
    Gemm of the flattened activation with a transposed (transB) int8 weight, per-tensor scale.
    ``signed``: int8 activations (nonzero zero points) instead of uint8."""
    name = "qdq_matmul_s8" if signed else "qdq_matmul"
    g = _Graph(name)
    adt = np.int8 if signed else np.uint8
    x = g.input("x", F32, [2, 5, 24])

    def qdq(v, scale, zp, scope):
        s, z = g.init(f"{scope}.scale", np.float32(scale)), g.init(f"{scope}.zp", adt(zp))
        q = g.op("QuantizeLinear", [v, s, z], f"{scope}/QuantizeLinear")
        return g.op("DequantizeLinear", [q, s, z], f"{scope}/DequantizeLinear")

    def weight(scope, shape, axis):
        w = g.rng.standard_normal(shape).astype(np.float32) / np.sqrt(24)
        scale = (np.abs(w).max(axis=1 - axis) / 127).astype(np.float32) if axis is not None else np.float32(np.abs(w).max() / 127)
        q = np.clip(np.round(w / (np.expand_dims(scale, 1 - axis) if axis is not None else scale)), -127, 127).astype(np.int8)
        zp = np.zeros(scale.shape, np.int8)
        ins = [g.init(f"{scope}.weight_q", q), g.init(f"{scope}.weight_scale", scale), g.init(f"{scope}.weight_zp", zp)]
        return g.op("DequantizeLinear", ins, f"{scope}/weight/DequantizeLinear", **({"axis": axis} if axis is not None else {}))

    a = qdq(x, 0.03, -3 if signed else 125, "/in")
    y1 = g.op("MatMul", [a, weight("/fc1", (24, 40), axis=1)], "/fc1/MatMul")
    y1 = g.op("Add", [y1, g.bias("fc1.bias", 40)], "/fc1/Add")
    y1 = g.op("Identity", [qdq(y1, 0.05, 7 if signed else 128, "/fc1/out")], "/y1/Identity", outputs=["y1"])
    flat = g.op("Reshape", [a, g.const(np.array([10, 24], np.int64), scope="/flat")], "/flat/Reshape")
    y2 = g.op("Gemm", [flat, weight("/fc2", (36, 24), axis=None), g.bias("fc2.bias", 36)], "/fc2/Gemm",
              outputs=["y2"], transB=1)  # fmt: skip
    g.output(y1, F32, [2, 5, 40])
    g.output(y2, F32, [10, 36])
    rng = np.random.RandomState(_seed(name, ":feeds"))
    feeds = {"x": (rng.standard_normal((2, 5, 24)) * 1.5).astype(np.float32)}
    return ZooModel(name, g.model(doc="QDQ matmuls"), feeds, {"x": (2, 5, 24)})


#: Models with control flow and state (tests/test_controlflow.py): If on a run-time condition,
#: Loop and Scan, LSTM and GRU, and a stateful VAD.
CONTROL_FLOW: dict[str, Callable[[], ZooModel]] = {
    "if_runtime": _if_runtime,
    "loop_scan": _loop_scan,
    "crnn_lstm": _crnn_lstm,
    "vad": vad,
}


#: Real-sized models for benchmarks (scripts/bench.py --model zoo:NAME); too big for the test matrix.
BENCH: dict[str, Callable[[], ZooModel]] = {
    "vit-s16": lambda: vit("vit_s16", 224, 16, 384, 12, 6, 1000),
    "yolov8n-320": lambda: yolov8("yolov8n_320", 320),
    "crnn-60x160": lambda: crnn("crnn_60x160", 60, 160, 128, 97),
    "rec-48x320": lambda: svtr_rec("ppocrv4_rec_shaped", 48, 320, 6625),
    "resnet50-224": lambda: resnet("resnet50_224", 224),
    "mobilenetv2-224": lambda: mobilenet_v2("mobilenetv2_224", 224),
}


_BUILDERS: dict[str, Callable[[], ZooModel]] = {
    "mlp": _mlp,
    "resnet_block": _resnet_block,
    "dw_se": _dw_se,
    "attention": _attention,
    "resize_convtranspose": _resize_convtranspose,
    "split_concat": _split_concat,
    "multi_io": _multi_io,
    "int64_shape": _int64_shape,
    "silu_chain": _silu_chain,
    "softmax_argmax": _softmax_argmax,
    "yolo_head": _yolo_head,
    "vit_tiny": _vit_tiny,
}

NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build(name: str) -> ZooModel:
    """Build a fresh copy of zoo model ``name`` (see :data:`NAMES`, and :data:`BENCH`)."""
    try:
        fn = _BUILDERS.get(name) or CONTROL_FLOW.get(name) or BENCH[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}") from None
    return fn()


if __name__ == "__main__":
    import time

    import onnxruntime as ort

    failed = []
    for name in NAMES:
        try:
            zm = build(name)
            onnx.checker.check_model(zm.model, full_check=True)
            assert {k: v.shape for k, v in zm.feeds.items()} == zm.input_shapes, "feeds/input_shapes mismatch"
            nbytes = sum(numpy_helper.to_array(t).nbytes for t in zm.model.graph.initializer)
            sess = ort.InferenceSession(zm.model.SerializeToString(), providers=["CPUExecutionProvider"])
            t0 = time.perf_counter()
            outs = sess.run(None, zm.feeds)
            ms = (time.perf_counter() - t0) * 1e3
            names = [o.name for o in sess.get_outputs()]
            desc = ", ".join(
                f"{n}{tuple(o.shape)}:{o.dtype}" + (f" |max|={np.abs(o).max():.3g}" if o.dtype.kind == "f" else "")
                for n, o in zip(names, outs)
            )
            for n, o in zip(names, outs):
                assert np.all(np.isfinite(o)), f"{n} has non-finite values"
            print(f"ok   {name:22s} nodes={len(zm.model.graph.node):3d} weights={nbytes / 1024:6.1f}KiB "
                  f"{ms:6.2f}ms  {desc}")
        except Exception as e:  # noqa: BLE001
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    if failed:
        raise SystemExit(f"{len(failed)} model(s) failed: {failed}")
    print(f"all {len(NAMES)} models ok")


def tiny_decoder(folder, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
                 max_context: int = 48, seed: int = 0, tokenizer: bool = True):  # fmt: skip
    """A small llama decoder as scripts/gguf_decoder.py writes SmolLM2's (same graph, static KV
    cache, start/last inputs), random weights on the q4/q8 grids (`compile --weights q4` then
    computes what onnxruntime does, up to rounding), 256 byte tokens + <|endoftext|> (id 256,
    the stop token), and a byte-level tokenizer.json. Writes decoder.onnx, llm.json (and
    tokenizer.json) into ``folder``; returns the model's path."""
    import json
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "scripts"))
    import gguf_decoder

    from tvm_hybrid.compiler import weightquant as wq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    vocab = 257
    hd = hidden // heads

    def grid(shape, bits, std):
        w = (rng.randn(*shape) * std).astype(np.float32)
        return wq.dequantize(wq.quantize(w, bits))

    w = {"token_embd.weight": grid((vocab, hidden), 8, 0.15), "output_norm.weight": 1 + 0.1 * rng.randn(hidden).astype(np.float32)}
    for i in range(layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = (1 + 0.1 * rng.randn(hidden)).astype(np.float32)
        w[p + "ffn_norm.weight"] = (1 + 0.1 * rng.randn(hidden)).astype(np.float32)
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * hd, hidden)),
                            ("attn_v", (kv_heads * hd, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):  # fmt: skip
            w[p + name + ".weight"] = grid(shape, 4, 1.0 / np.sqrt(shape[1]))
    cfg = {"layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": kv_heads, "rope_base": 10000.0,
           "eps": 1e-5, "vocab": vocab, "context_length": max_context, "name": "tiny-decoder"}  # fmt: skip
    model = gguf_decoder.build_onnx(cfg, w, max_context)
    onnx.save(model, str(folder / "decoder.onnx"))
    llm = {"name": "tiny-decoder", "max_context": max_context, "layers": layers, "kv_heads": kv_heads, "head_dim": hd,
           "vocab": vocab, "bos": None, "stop": [256], "chat_template": None}  # fmt: skip
    (folder / "llm.json").write_text(json.dumps(llm))
    if tokenizer:
        from tokenizers.pre_tokenizers import ByteLevel

        tokens = sorted(ByteLevel.alphabet()) + ["<|endoftext|>"]
        tok = {"tokens": tokens, "merges": [], "types": [1] * 256 + [3], "bos": None, "eos": 256, "model": "gpt2",
               "chat_template": None}  # fmt: skip
        (folder / "tokenizer.json").write_text(json.dumps(gguf_decoder.tokenizer_json(tok), ensure_ascii=False))
    return folder / "decoder.onnx"


#: The narrow types ``narrow_casts`` converts to and from (ONNX element type, numpy name).
NARROW_FLOATS = {"float8_e4m3fn": TensorProto.FLOAT8E4M3FN, "float8_e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
                 "float8_e5m2": TensorProto.FLOAT8E5M2, "float8_e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ,
                 "float4_e2m1fn": TensorProto.FLOAT4E2M1}  # fmt: skip
NARROW_INTS = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4, "int2": TensorProto.INT2, "uint2": TensorProto.UINT2}


def narrow_sweep(n_random: int = 4096) -> np.ndarray:
    """float32 values that exercise every rounding case of the narrow formats: every float16
    value (all their grids' midpoints and ties), random bit patterns, and the specials."""
    rng = np.random.RandomState(_seed("narrow_sweep"))
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    bits = rng.randint(0, 1 << 32, n_random, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 2.0**-126, 2.0**-127, 3e38, -3e38],
                       np.float32)  # fmt: skip
    return np.concatenate([halves, bits, special])


def narrow_casts() -> ZooModel:
    """Casts into every narrow type from float32 ``x`` [n] (both ``saturate`` values for the float8
    formats; E8M0 in its three rounding modes) and out of every narrow float from inputs holding
    each of its codes: what ``compiler.narrow`` rewrites, checked against ONNX's reference."""
    x = narrow_sweep()
    n = len(x)
    nodes, outputs = [], []
    for name, t in NARROW_FLOATS.items():
        for sat in (1, 0) if name.startswith("float8") else (1,):
            out = f"{name}_sat{sat}"
            nodes.append(helper.make_node("Cast", ["x"], [out], to=t, saturate=sat))
            outputs.append(helper.make_tensor_value_info(out, t, [n]))
    for mode in ("up", "down", "nearest"):
        out = f"e8m0_{mode}"
        nodes.append(helper.make_node("Cast", ["x"], [out], to=TensorProto.FLOAT8E8M0, round_mode=mode))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT8E8M0, [n]))
    nodes.append(helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT32))  # integers in range of int32
    for name, t in NARROW_INTS.items():
        nodes.append(helper.make_node("Cast", ["xi"], [name], to=t))
        outputs.append(helper.make_tensor_value_info(name, t, [n]))
    import ml_dtypes  # noqa: F401  (numpy's names for the narrow types)

    inputs = [helper.make_tensor_value_info("x", F32, [n])]
    feeds: dict[str, np.ndarray] = {}
    for name, t in [*NARROW_FLOATS.items(), ("float8_e8m0fnu", TensorProto.FLOAT8E8M0)]:
        k = 16 if name == "float4_e2m1fn" else 256
        inputs.append(helper.make_tensor_value_info(f"codes_{name}", t, [k]))
        feeds[f"codes_{name}"] = np.arange(k, dtype=np.uint8).view(np.dtype(name))
        for to, suffix in ((F32, "f32"), (TensorProto.FLOAT16, "f16")):
            out = f"from_{name}_{suffix}"
            nodes.append(helper.make_node("Cast", [f"codes_{name}"], [out], to=to))
            outputs.append(helper.make_tensor_value_info(out, to, [k]))
    graph = helper.make_graph(nodes, "narrow_casts", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=11)
    feeds = {"x": x, **feeds}
    return ZooModel("narrow_casts", model, feeds, {k: v.shape for k, v in feeds.items()}, 0.0, 0.0)


def narrow_qdq() -> ZooModel:
    """Narrow types at a model's boundary and in quantization: an int4 input moved (Transpose) and
    dequantized per axis with an int4 zero point; float32 quantized to uint4 in blocks of 4 along
    the last axis (a blocked QuantizeLinear, which TVM's frontend refuses) and to float8 E4M3 per
    tensor, then dequantized back; a float8 E5M2 input passed through and doubled."""
    rng = np.random.RandomState(_seed("narrow_qdq"))
    import ml_dtypes  # noqa: F401

    q = rng.randint(-8, 8, (4, 6)).astype(np.dtype("int4"))
    x = rng.standard_normal((6, 10)).astype(np.float32) * 3
    f8 = rng.standard_normal((3, 5)).astype(np.dtype("float8_e5m2"))
    inits = [
        helper.make_tensor("s4", F32, [6], rng.uniform(0.05, 0.2, 6).astype(np.float32)),
        helper.make_tensor("z4", TensorProto.INT4, [6], rng.randint(-3, 4, 6).tolist()),
        helper.make_tensor("sb", F32, [6, 3], rng.uniform(0.1, 0.5, (6, 3)).astype(np.float32).ravel()),
        helper.make_tensor("zb", TensorProto.UINT4, [6, 3], rng.randint(4, 12, 18).tolist()),
        helper.make_tensor("s8", F32, [], [0.05]),
        helper.make_tensor("two", F32, [], [2.0]),
    ]
    nodes = [
        helper.make_node("Transpose", ["q"], ["qt"], perm=[1, 0]),
        helper.make_node("DequantizeLinear", ["qt", "s4", "z4"], ["deq4"], axis=0),
        helper.make_node("QuantizeLinear", ["x", "sb", "zb"], ["qb"], axis=1, block_size=4),
        helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["deqb"], axis=1, block_size=4),
        helper.make_node("QuantizeLinear", ["x", "s8"], ["q8"], output_dtype=TensorProto.FLOAT8E4M3FN),
        helper.make_node("DequantizeLinear", ["q8", "s8"], ["deq8"]),
        helper.make_node("Identity", ["f8"], ["f8_out"]),
        helper.make_node("Cast", ["f8"], ["f8_f32"], to=F32),
        helper.make_node("Mul", ["f8_f32", "two"], ["f8_twice"]),
    ]
    graph = helper.make_graph(
        nodes, "narrow_qdq",
        [helper.make_tensor_value_info("q", TensorProto.INT4, [4, 6]), helper.make_tensor_value_info("x", F32, [6, 10]),
         helper.make_tensor_value_info("f8", TensorProto.FLOAT8E5M2, [3, 5])],
        [helper.make_tensor_value_info("deq4", F32, [6, 4]), helper.make_tensor_value_info("qb", TensorProto.UINT4, [6, 10]),
         helper.make_tensor_value_info("deqb", F32, [6, 10]), helper.make_tensor_value_info("deq8", F32, [6, 10]),
         helper.make_tensor_value_info("f8_out", TensorProto.FLOAT8E5M2, [3, 5]),
         helper.make_tensor_value_info("f8_twice", F32, [3, 5])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=11)
    feeds = {"q": q, "x": x, "f8": f8}
    return ZooModel("narrow_qdq", model, feeds, {k: v.shape for k, v in feeds.items()}, 1e-6, 1e-6)
