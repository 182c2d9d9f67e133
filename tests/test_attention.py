"""Attention as one CPU kernel (``compiler.fused_attention``), against onnxruntime (rtol 1e-4,
atol 1e-5): the layouts exporters write (per-projection heads as BERT, a fused QKV split as
timm's ViT, Kᵀ given directly, 3-D heads), scales on the scores or on Q, additive masks
(padding, causal, per head), key counts in whole and partial vectors, cross-attention; and the
patterns it leaves alone (the probabilities wanted as an output, a scale over the mask)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TARGET, assert_close, reference
from onnx import TensorProto, helper, numpy_helper
from test_schedules import _compile

from tvm_hybrid.targets import host_profile_name

F = TensorProto.FLOAT


class _G:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.rng = np.random.RandomState(seed)
        self.n = 0

    def input(self, name, shape):
        self.inputs.append(helper.make_tensor_value_info(name, F, list(shape)))
        return name

    def output(self, name):
        self.outputs.append(helper.make_tensor_value_info(name, F, None))

    def const(self, value, dtype=np.float32):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, kind, ins, out=None, **attrs):
        self.n += 1
        out = out or f"t{self.n}"
        self.nodes.append(helper.make_node(kind, ins, [out], **attrs))
        return out

    def linear(self, x, fin, fout):
        w = self.const(self.rng.standard_normal((fin, fout)) / np.sqrt(fin))
        return self.op("Add", [self.op("MatMul", [x, w]), self.const(self.rng.standard_normal(fout) * 0.1)])

    def heads(self, t, b, s, h, d, perm):
        return self.op("Transpose", [self.op("Reshape", [t, self.const([b, s, h, d], np.int64)])], perm=perm)

    def model(self):
        g = helper.make_graph(self.nodes, "attn", self.inputs, self.outputs, self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _bert(b, s, h, d, mask: str, scale_op: str = "Div"):
    """Per-projection heads, MatMul → Div → Add mask → Softmax → MatMul → back to tokens."""
    g = _G(1)
    c = h * d
    x = g.input("x", (b, s, c))
    q = g.heads(g.linear(x, c, c), b, s, h, d, [0, 2, 1, 3])
    kt = g.heads(g.linear(x, c, c), b, s, h, d, [0, 2, 3, 1])
    v = g.heads(g.linear(x, c, c), b, s, h, d, [0, 2, 1, 3])
    sc = g.op("MatMul", [q, kt])
    sc = g.op(scale_op, [sc, g.const(np.sqrt(d) if scale_op == "Div" else 1 / np.sqrt(d))])
    feeds = {"x": g.rng.standard_normal((b, s, c)).astype(np.float32)}
    if mask == "padding":  # BERT's: (1 - m) * finfo.min over (b, 1, 1, s)
        m = g.input("m", (b, 1, 1, s))
        sc = g.op("Add", [sc, g.op("Mul", [g.op("Sub", [g.const(1.0), m]), g.const(np.finfo(np.float32).min)])])
        keep = np.ones((b, 1, 1, s), np.float32)
        keep[0, ..., s // 2:] = 0  # the first sequence padded
        feeds["m"] = keep
    elif mask == "causal":
        sc = g.op("Add", [sc, g.const(np.triu(np.full((s, s), -1e9), 1))])
    elif mask == "per-head":
        sc = g.op("Add", [sc, g.const(g.rng.standard_normal((h, s, s)))])
    ctx = g.op("MatMul", [g.op("Softmax", [sc], axis=-1), v])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([b, s, c], np.int64)])
    g.op("Add", [g.linear(ctx, c, c), x], out="y")
    g.output("y")
    return g.model(), feeds


def _vit(s, h, d):
    """timm's ViT: one QKV projection reshaped to (s, 3, h, d), split, Q scaled, Kᵀ a transpose."""
    g = _G(2)
    c = h * d
    x = g.input("x", (1, s, c))
    qkv = g.op("Reshape", [g.linear(x, c, 3 * c), g.const([1, s, 3, h, d], np.int64)])
    qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    parts = [f"p{i}" for i in range(3)]
    g.nodes.append(helper.make_node("Split", [qkv, g.const([1, 1, 1], np.int64)], parts, axis=0))
    q, k, v = (g.op("Squeeze", [p, g.const([0], np.int64)]) for p in parts)
    q = g.op("Mul", [q, g.const(d ** -0.5)])
    sc = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    ctx = g.op("MatMul", [g.op("Softmax", [sc], axis=-1), v])
    g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([1, s, c], np.int64)], out="y")
    g.output("y")
    return g.model(), {"x": g.rng.standard_normal((1, s, c)).astype(np.float32)}


def _direct(bh, s, sk, d, dv, probs_out: bool = False, scale_over_mask: bool = False, mask=None):
    """Q [bh, s, d], Kᵀ [bh, d, sk], V [bh, sk, dv] as inputs (cross-attention when s != sk)."""
    g = _G(3)
    q, kt, v = g.input("q", (bh, s, d)), g.input("kt", (bh, d, sk)), g.input("v", (bh, sk, dv))
    sc = g.op("MatMul", [q, kt])
    if scale_over_mask:
        sc = g.op("Mul", [g.op("Add", [sc, g.const(g.rng.standard_normal(sk))]), g.const(0.3)])
    else:
        sc = g.op("Mul", [sc, g.const(0.3)])
    if mask is not None:
        sc = g.op("Add", [sc, g.const(mask)])
    p = g.op("Softmax", [sc], out="probs" if probs_out else None, axis=-1)
    g.op("MatMul", [p, v], out="y")
    g.output("y")
    if probs_out:
        g.output("probs")
    r = g.rng
    feeds = {"q": r.standard_normal((bh, s, d)), "kt": r.standard_normal((bh, d, sk)), "v": r.standard_normal((bh, sk, dv))}
    return g.model(), {k: a.astype(np.float32) for k, a in feeds.items()}


def _sdpa(b, s, h, d, fill: float, unnan: bool = True):
    """torch's scaled_dot_product_attention export: √scale on Q and on Kᵀ (a transpose through a
    [b·h, s, d] reshape), a boolean mask as Where(m, 0, ``fill``), and Where(IsNaN(p), 0, p)."""
    g = _G(4)
    c = h * d
    x = g.input("x", (b, s, c))
    m = g.input("m", (b, 1, s, s))
    q = g.heads(g.linear(x, c, c), b, s, h, d, [0, 2, 1, 3])
    k = g.heads(g.linear(x, c, c), b, s, h, d, [0, 2, 1, 3])
    v = g.heads(g.linear(x, c, c), b, s, h, d, [0, 2, 1, 3])
    kt = g.op("Transpose", [g.op("Reshape", [k, g.const([b * h, s, d], np.int64)])], perm=[0, 2, 1])
    kt = g.op("Reshape", [kt, g.const([b, h, d, s], np.int64)])
    root = g.const(d ** -0.25)
    sc = g.op("MatMul", [g.op("Mul", [q, root]), g.op("Mul", [kt, root])])
    keep = g.op("Cast", [m], to=TensorProto.BOOL)
    sc = g.op("Add", [sc, g.op("Where", [keep, g.const(0.0), g.const(fill)])])
    p = g.op("Softmax", [sc], axis=-1)
    if unnan:
        p = g.op("Where", [g.op("IsNaN", [p]), g.const(0.0), p])
    ctx = g.op("MatMul", [p, v])
    g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([b, s, c], np.int64)], out="y")
    g.output("y")
    mask = np.tril(np.ones((s, s), np.float32))[None, None].repeat(b, 0)
    mask[1, 0, 3] = 0  # a query row that sees no key: NaN probabilities with -inf, zeroed
    return g.model(), {"x": g.rng.standard_normal((b, s, c)).astype(np.float32), "m": mask}


def _long_mask(bh, s, sk):
    """-inf over the keys before a row's start (row i starts at key 100·i): the first blocks of
    a late row are all masked, so the online softmax must start its sums at that row's first
    key; the last row sees no key at all (NaN, as onnxruntime's)."""
    mask = np.zeros((bh, s, sk), np.float32)
    for i in range(s):
        mask[:, i, : min(100 * i, sk)] = -np.inf
    return mask


CASES = {
    "sdpa-finfo-min": lambda: _sdpa(2, 19, 2, 16, float(np.finfo(np.float32).min)),
    "sdpa-inf-nan-rows": lambda: _sdpa(2, 19, 2, 16, -np.inf),
    "sdpa-inf-nan-kept": lambda: _sdpa(2, 19, 2, 16, -np.inf, unnan=False),  # NaN rows, as onnxruntime's
    "bert-padding-mask": lambda: _bert(2, 24, 4, 16, "padding"),
    "bert-causal-mul": lambda: _bert(1, 37, 2, 32, "causal", "Mul"),
    "bert-per-head-mask": lambda: _bert(1, 20, 3, 8, "per-head"),
    "vit-fused-qkv": lambda: _vit(37, 3, 64),
    "cross-kt-direct": lambda: _direct(3, 20, 48, 24, 40),
    "cross-partial-keys": lambda: _direct(2, 9, 21, 5, 7),
    "long-keys-blocks": lambda: _direct(2, 9, 1100, 16, 24),  # online softmax over 3 key blocks
    "long-keys-late-rows": lambda: _direct(1, 12, 1100, 8, 16, mask=_long_mask(1, 12, 1100)),
}


def _attention_kernels(mod) -> int:
    return sum(gv.name_hint.startswith("attention") for gv in mod.functions)


@pytest.mark.parametrize("target", [TARGET, "host"])  # vectors of 8 lanes, and the host's (16 with AVX-512)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_matches_onnxruntime(case, target, tmp_path):
    model, feeds = CASES[case]()
    shapes = {k: v.shape for k, v in feeds.items()}
    mod, _, run = _compile(model, shapes, host_profile_name() if target == "host" else target, tmp_path)
    assert _attention_kernels(mod) == 1
    # no transposes into or out of heads are left: Q, K, V and the output are read in place
    assert not any("transpose" in gv.name_hint for gv in mod.functions if case.startswith("bert")), list(mod.functions)
    assert_close(run(feeds), reference(model, feeds), 1e-4, 1e-5)


@pytest.mark.parametrize("kw", [{"probs_out": True}, {"scale_over_mask": True}], ids=["probs-wanted", "scale-over-mask"])
def test_attention_left_unfused_where_it_must_be(kw, tmp_path):
    model, feeds = _direct(2, 16, 32, 16, 16, **kw)
    mod, _, run = _compile(model, {k: v.shape for k, v in feeds.items()}, TARGET, tmp_path)
    assert _attention_kernels(mod) == 0
    assert_close(run(feeds), reference(model, feeds), 1e-4, 1e-5)


def test_fully_masked_rows_average_v_as_onnxruntime(tmp_path):
    """A padded sequence whose mask hides every key: onnxruntime's softmax of equal scores is
    uniform, and so is the kernel's (finfo.min plus a score stays finfo.min)."""
    model, feeds = _bert(2, 24, 4, 16, "padding")
    feeds["m"][1] = 0
    mod, _, run = _compile(model, {k: v.shape for k, v in feeds.items()}, TARGET, tmp_path)
    assert_close(run(feeds), reference(model, feeds), 1e-4, 1e-5)
