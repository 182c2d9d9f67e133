"""int8 x int8 convolutions on CPUs with int8 dot products (x86 AVX-512 VNNI, Arm's dot product):
a QDQ model's quantized convolutions as integer arithmetic, not fake-quantized fp32.

A QDQ model (``tvm-hybrid quantize``, onnxruntime's quantizer, most exporters) writes a quantized
convolution as ``Conv(DequantizeLinear(x_q), DequantizeLinear(w_q))``: the activation ``x_q`` is
uint8 (or int8) with one scale and zero point, the weight int8 per output channel with zero
points 0. Run as written, both are turned back into floats and convolved in fp32. Here the
convolution becomes one kernel (``conv2d_int8``) that reads ``x_q`` itself:

    out[n, o, y, x] = scale_x * scale_w[o] * (Σ x_q * w_q  -  zero_x * Σ w_q[o])

— the same value as the dequantized convolution (both integers are exact; one fp32 rounding of
the product of scales). The sum runs on ``vpdpbusd`` (x86: u8 x s8 -> s32, 64 products an
instruction, no saturation) or ``sdot`` (Arm: s8 x s8 -> s32, 16 products); an activation of the
other sign is shifted by 128 as it is packed, its zero point with it. Padding pads with the zero
point, which is the 0.0 the float convolution pads with, so the correction holds at the borders.

The kernel's stages (``schedule``):

- ``int8_pack``: ``x_q`` in the layout the dot product reads: four input channels interleaved
  (the four bytes ``vpdpbusd`` sums), padded, and for a stride-s convolution split into s x s
  phase planes, each plane flattened. A tap (dy, dx) of the window is then one offset into a
  plane, so 16 consecutive outputs read 64 consecutive bytes — one vector load, no im2col
  (the "wide rows" form: a row computes ``Wq - OW`` outputs past its end, dropped later).
- ``int8_acc``: the int32 sums, a register tile of (rows output channels) x (cols vectors of 16
  pixels, 4 on Arm) accumulators, the weights (prepacked at compile time as [o, tap, 4 channels])
  broadcast 4 bytes at a time.
- ``int8_out``: the int32 sums to floats (the correction and the scales), then whatever FuseOps
  put after it (bias, activation, the next layer's QuantizeLinear) inlined into one pass.

Only where the target has the instruction (``isa_of``: AVX-512 VNNI, AVX-VNNI; aarch64 with
``+dotprod``).
A depthwise convolution is one too (``_rewrite_depthwise``): its dot products sum 4 taps of a
window row, each output channel from its own input channel. Grouped convolutions and anything
not of this form keep the fp32 path (``rewrites.int8_weights``).
"""

from __future__ import annotations

import dataclasses
import functools

#: The block names the CPU schedule recognizes (``backends.cpu.schedule_func``).
PACK, ACC, OUT, WIDEN = "int8_pack", "int8_acc", "int8_out", "int8_widen"
#: Block annotation on ``int8_acc``: [rows, cols, isa, ty, wq, kh, kw, stride]: the register tile (the
#: weights were padded to whole rows), the output rows of an epilogue-driven tile, the planes' row
#: length, the window (the reduction over channel groups x kh x kw runs as three loops, no division
#: a step; a depthwise convolution's: kh x groups of taps), and a depthwise convolution's
#: horizontal stride (0 for others).
TILE_ATTR = "tvm_hybrid.int8_tile"
#: Block annotation on a ``matmul_int8`` kernel's ``int8_acc``: [rows, cols, isa].
DENSE_ATTR = "tvm_hybrid.int8_dense"
#: Block annotation on ``int8_pack``: [left padding, input width, top padding, input height,
#: vertical stride, horizontal stride of the planes' columns]: which plane rows and columns are
#: the input's (``_pack_rows``).
ROW_ATTR = "tvm_hybrid.int8_row"
_MAX_ROWS = 8
_MAX_COLS = 4


@dataclasses.dataclass(frozen=True)
class Isa:
    """An int8 dot-product instruction: ``lanes`` int32 sums of 4 products each."""

    name: str
    lanes: int
    packed: str  # the dtype it takes the activation as ("uint8": vpdpbusd, "int8": sdot, "int16": vpmaddwd)
    intrin: str  # the tensor intrinsics' name (register_intrinsic)
    llvm: str
    accumulators: int  # vector registers a register tile may take (the rest: data, a broadcast)
    group: int = 4  # products an int32 lane sums per instruction (channels packed together)
    weight: str = "int8"  # the dtype the instruction takes the weights as (int8 in the artifact, widened in the kernel)
    accumulates: bool = True  # the instruction adds into its accumulator (else a vpaddd after it)
    own_level: bool = True  # a profile that exists for this instruction (an int8 variant of a dispatch level)


VNNI = Isa("avx512-vnni", 16, "uint8", "tvm_hybrid_vnni_16x4", "llvm.x86.avx512.vpdpbusd.512", 24)  # 32 zmm
#: AVX-VNNI: the same instruction on 256-bit registers, VEX-encoded, on CPUs without AVX-512
#: (Intel Alder Lake and later client cores; AMD Zen 4 has both).
AVX_VNNI = Isa("avx-vnni", 8, "uint8", "tvm_hybrid_avxvnni_8x4", "llvm.x86.avx512.vpdpbusd.256", 12)  # 16 ymm
SDOT = Isa("arm-sdot", 4, "int8", "tvm_hybrid_sdot_4x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", 24)  # 32 NEON
#: Without VNNI: ``vpmaddwd`` (AVX-512 BW, AVX2) multiplies 16-bit pairs and sums each pair into an
#: int32 lane, exactly (``vpmaddubsw``'s u8 x s8 pairs would saturate at int16). Activations and
#: weights are packed as int16, two channels deep; a ``vpaddd`` accumulates. Twice the products of
#: an fp32 FMA an instruction, at half the bytes of fp32 data.
MADD_512 = Isa("avx512-madd", 16, "int16", "tvm_hybrid_madd_16x2", "llvm.x86.avx512.pmaddw.d.512", 24, group=2,
               weight="int16", accumulates=False, own_level=False)  # fmt: skip
MADD_256 = Isa("avx2-madd", 8, "int16", "tvm_hybrid_madd_8x2", "llvm.x86.avx2.pmadd.wd", 8, group=2,
               weight="int16", accumulates=False, own_level=False)  # fmt: skip
_ISAS = {i.name: i for i in (VNNI, AVX_VNNI, SDOT, MADD_512, MADD_256)}


def isa_of(target) -> Isa | None:
    """The int8 dot product an llvm target (a CPU backend's) compiles in: AVX-512 VNNI or AVX-VNNI
    (by its mcpu, or ``+avx512vnni`` / ``+avxvnni``), else ``vpmaddwd`` on AVX-512 BW or AVX2, or
    aarch64 with ``+dotprod``; else None."""
    from .. import hostcpu

    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return SDOT if "+dotprod" in mattr else None
    features = hostcpu.x86_features({"mcpu": str(target.attrs.get("mcpu", "") or ""), "mattr": mattr})
    if "avx512_vnni" in features:
        return VNNI
    if "avx_vnni" in features:
        return AVX_VNNI
    if {"avx512f", "avx512bw"} <= features:
        return MADD_512
    return MADD_256 if "avx2" in features else None


@functools.lru_cache(maxsize=None)
def register_intrinsic(isa: Isa, dense: bool = False, window: int = 0) -> str:
    """A tensor intrinsic of ``isa``: ``lanes`` int32 sums of 4 products each, one instruction.

    Convolutions (``dense=False``): ``lanes`` output pixels x 4 input channels (the activation,
    a vector) times 4 int8 weights (broadcast). Matmuls (``dense=True``): 4 values of one row of
    the activation (broadcast) times ``lanes`` output columns x 4 int8 weights (a vector)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    lanes, packed, llvm, g, wt = isa.lanes, isa.packed, isa.llvm, isa.group, isa.weight
    acc_t, data_t, weight_t = f"int32x{lanes}", f"{packed}x{g * lanes}", f"{wt}x{g * lanes}"
    x4, w4 = f"{packed}x{g}", f"{wt}x{g}"  # one lane's group: 32 bits

    def broadcast(b):
        # The weights' group in every lane. An expression, not a variable: TVMScript makes an
        # assigned vector a local buffer, which LLVM kept in a workspace allocated a tile.
        return T.reinterpret(T.broadcast(T.reinterpret(b.vload([0], w4), dtype="int32"), lanes), dtype=weight_t)

    def dot(c, x, w):
        if isa.accumulates:
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm), c.vload([0], acc_t), x, w, dtype=acc_t)
        return c.vload([0], acc_t) + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm), x, w, dtype=acc_t)

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((lanes, g), packed, offset_factor=1), b: T.Buffer((g,), wt, offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:  # fmt: skip
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:lanes, 0:g], b[0:g])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, g):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vi, vk], "int32") * T.cast(b[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((lanes, g), packed, offset_factor=1), b: T.Buffer((g,), wt, offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:  # fmt: skip
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:lanes, 0:g], b[0:g])
            T.writes(c[0:lanes])
            c[T.ramp(T.int32(0), 1, lanes)] = dot(c, a.vload([0, 0], data_t), broadcast(b))

    @T.prim_func(s_tir=True)
    def dense_desc(a: T.Buffer((g,), packed, offset_factor=1), b: T.Buffer((lanes, g), wt, offset_factor=1),
                   c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:  # fmt: skip
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:g], b[0:lanes, 0:g])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, g):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dense_impl(a: T.Buffer((g,), packed, offset_factor=1), b: T.Buffer((lanes, g), wt, offset_factor=1),
                   c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:  # fmt: skip
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:g], b[0:lanes, 0:g])
            T.writes(c[0:lanes])
            x = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], x4), dtype="int32"), lanes), dtype=data_t)
            c[T.ramp(T.int32(0), 1, lanes)] = dot(c, x, b.vload([0, 0], weight_t))

    # A depthwise convolution's window row (``window``: its stride): lane i sums elements
    # i * stride .. i * stride + g - 1.
    step = max(window, 1)
    span = step * (lanes - 1) + g

    @T.prim_func(s_tir=True)
    def window_desc(a: T.Buffer((span,), packed, offset_factor=1), b: T.Buffer((g,), wt, offset_factor=1),
                    c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:  # fmt: skip
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:span], b[0:g])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, g):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vi * step + vk], "int32") * T.cast(b[vk], "int32")

    @T.prim_func(s_tir=True)
    def window_impl(a: T.Buffer((span,), packed, offset_factor=1), b: T.Buffer((g,), wt, offset_factor=1),
                    c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:  # fmt: skip
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:span], b[0:g])
            T.writes(c[0:lanes])
            # (the load reads lanes * g elements from the window's start: the pack leaves room)
            c[T.ramp(T.int32(0), 1, lanes)] = dot(c, _windows(isa, a.vload([0], data_t), data_t, step), broadcast(b))

    name = f"{isa.intrin}_dense" if dense else f"{isa.intrin}_window{window}" if window else isa.intrin
    try:
        TensorIntrin.get(name)
    except Exception:  # not registered yet in this process
        TensorIntrin.register(name, *((dense_desc, dense_impl) if dense else (window_desc, window_impl) if window
                                      else (desc, impl)))  # fmt: skip
    return name


#: The byte shuffles that make a depthwise window row's lanes (``_windows``), by vector width.
_SHUFFLES = {512: ("llvm.x86.avx512.permvar.si.512", "llvm.x86.avx512.pshuf.b.512"),
             256: ("llvm.x86.avx2.permd", "llvm.x86.avx2.pshuf.b")}  # fmt: skip


def _windows(isa: Isa, x, data_t: str, stride: int):
    """From ``x`` (a vector load of consecutive elements), the vector whose 32-bit lane i holds
    elements i * stride .. i * stride + group - 1: lane i of a depthwise convolution's window row,
    its group of taps. x86: ``vpermd`` gives each 128-bit quarter the 16 bytes from its first
    lane's element on, ``vpshufb`` the (overlapping) 4-byte windows within each quarter. Arm: one
    ``tbl``."""
    from tvm.script import tirx as T

    lanes, e = isa.lanes, 4 // isa.group * stride  # e: bytes from one lane's window to the next
    nbytes = lanes * 4
    bytes_t = f"int8x{nbytes}"
    if e == 4:
        return x  # the windows do not overlap: the load itself
    b = T.ramp(T.int32(0), 1, nbytes)
    # Byte j of lane k of a quarter: byte k * e + j of the quarter's bytes.
    within = T.Cast(bytes_t, (b % 16) // 4 * e + b % 4)
    xb = T.reinterpret(x, dtype=bytes_t)
    if isa.name == SDOT.name:
        out = T.call_llvm_pure_intrin(bytes_t, T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.tbl1.v16i8"), xb, within)
        return T.reinterpret(out, dtype=data_t)
    permd, pshufb = _SHUFFLES[nbytes * 8]
    d = T.ramp(T.int32(0), 1, lanes)
    quarters = T.call_llvm_pure_intrin(f"int32x{lanes}", T.llvm_lookup_intrinsic_id(permd),
                                       T.reinterpret(x, dtype=f"int32x{lanes}"), d // 4 * e + d % 4)  # fmt: skip
    out = T.call_llvm_pure_intrin(bytes_t, T.llvm_lookup_intrinsic_id(pshufb), T.reinterpret(quarters, dtype=bytes_t),
                                  within)  # fmt: skip
    return T.reinterpret(out, dtype=data_t)


def quantized_compute(model) -> bool:
    """Whether a Conv, MatMul or Gemm reads a dequantized activation (a DequantizeLinear of a
    tensor the graph computes, directly or through a Reshape) and a dequantized weight (an ONNX
    model): what the int8 kernels compute."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def dequantized(name: str, activation: bool) -> bool:
        n = producer.get(name)
        if n is not None and activation and n.op_type == "Reshape":
            n = producer.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear" and (n.input[0] not in inits) == activation

    return any(n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1 and dequantized(n.input[0], True)
               and dequantized(n.input[1], False) for n in g.node)  # fmt: skip


# -- the Relax rewrite ------------------------------------------------------------------------


def int8_compute(isa: Isa):
    """A Relax pass (before constant folding, CPU targets with an int8 dot product): each
    ``conv2d`` or ``matmul`` of a dequantized uint8/int8 activation (one scale and zero point)
    and a dequantized int8 weight constant (zero points 0) becomes a ``conv2d_int8`` or
    ``matmul_int8`` kernel; see the module's docstring."""
    from .rewrites import _relax_pass

    def rewrite(bb, call):
        if call.op.name == "relax.nn.conv2d":
            return _rewrite_conv(isa, bb, call)
        if call.op.name == "relax.nn.conv2d_transpose":
            return _rewrite_conv_transpose(isa, bb, call)
        return _rewrite_matmul(isa, bb, call)

    return _relax_pass("Int8Compute", ("relax.nn.conv2d", "relax.nn.conv2d_transpose", "relax.matmul"), rewrite)


class _Skip(Exception):
    pass


def _scalar(m, expr):
    from .rewrites import _const

    v = _const(m, expr)
    if v is None or v.size != 1:
        raise _Skip
    return v.reshape(())


def _activation(m, expr):
    """(x_q, scale, zero point) of a dequantized activation, else _Skip."""
    from .rewrites import _op_name, _resolve

    e = _resolve(m, expr)
    if _op_name(e) != "relax.dequantize" or str(e.attrs.out_dtype) != "float32":
        raise _Skip
    xq = e.args[0]
    if str(xq.ty.dtype) not in ("uint8", "int8"):
        raise _Skip
    return xq, float(_scalar(m, e.args[1])), int(_scalar(m, e.args[2]))


def _rewrite_conv(isa: Isa, bb, call):
    import numpy as np

    from .rewrites import _dequant_of, _NotInt8, _out_dtype, _static_shapes

    a = call.attrs
    shapes = _static_shapes(*call.args)
    if (shapes is None or a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
            or (_out_dtype(a) or "float32") != "float32"):  # fmt: skip
        return None
    depthwise = int(a.groups) != 1
    if depthwise and not (int(a.groups) == shapes[0][1] == shapes[1][0] and shapes[1][1] == 1
                          and all(int(d) == 1 for d in a.dilation)):  # fmt: skip
        return None  # grouped, a channel multiplier, dilated: the fp32 path
    m = bb  # rewrites' helpers look bindings up on it, as on a mutator
    try:
        xq, sx, zx = _activation(m, call.args[0])
        dq = _dequant_of(m, call.args[1], min_elements=1)  # int8 arithmetic pays at any size
    except (_Skip, _NotInt8):
        return None
    w = dq.q
    if w.dtype != np.int8 or dq.zero_point is not None or w.ndim != 4:
        return None
    if dq.scale.ndim == 4 and any(d != 1 for d in dq.scale.shape[1:]):
        return None  # a scale per input channel or tap: not one per output channel
    if w[0].size * 255 * 128 >= 2**31:
        return None  # int32 sums could overflow (over 65793 products an output)
    oc = w.shape[0]
    sw = np.broadcast_to(dq.scale, w.shape)[:, 0, 0, 0].astype(np.float64)
    shift = _shift(xq, isa)
    zx += shift
    if depthwise:
        return _rewrite_depthwise(isa, bb, a, shapes[0], xq, w, sx * sw, zx, shift)
    geo = _Geometry.of(shapes[0], w.shape, a, isa)
    ocp = -(-oc // geo.rows) * geo.rows
    kb, group = geo.cb * geo.kh * geo.kw, isa.group
    wpad = np.zeros((ocp, geo.cb * group, geo.kh, geo.kw), np.int8)
    wpad[:oc, : w.shape[1]] = w
    packed = wpad.reshape(ocp, geo.cb, group, geo.kh, geo.kw).transpose(0, 1, 3, 4, 2).reshape(ocp, kb, group)
    zero_term = _padded(zx * w.astype(np.int64).sum(axis=(1, 2, 3)), ocp, np.int32)
    scale = _padded(sx * sw, ocp, np.float32)
    return _emit(bb, isa, geo, xq, np.ascontiguousarray(packed), zero_term, scale, np.array([zx], isa.packed), shift,
                 oc)  # fmt: skip


def _rewrite_depthwise(isa: Isa, bb, a, xshape, xq, w, scale, zx: int, shift: int):
    """A depthwise convolution (one channel a group, no multiplier, no dilation) as a
    ``conv2d_int8`` whose dot products run over 4 taps of a window row (2 for vpmaddwd) instead of
    4 input channels. The pack is each channel's input, padded, one byte a position (for a
    vertical stride, split into planes of every sy-th row); output pixel p's window row starts at
    p * sx of a plane row, and the 16 windows of 16 outputs, overlapping, are shuffled out of one
    64-byte load (``_windows``). A window row of kw taps is ceil(kw / 4) groups, the taps past
    its end weighted 0; each output channel multiplies its own plane by its own weights."""
    import numpy as np

    from .rewrites import _taps_in_bounds

    _, _, h, wd = xshape
    padding = [int(p) for p in a.padding]
    taps = _taps_in_bounds(a, h, wd, *w.shape[2:])
    if taps is not None:  # only the window rows and columns that read the map (PP-OCR cls's 5x5 over 2 rows)
        (r0, r1), (c0, c1), padding = taps
        w = w[:, :, r0:r1, c0:c1]
    oc, _, kh, kw = w.shape
    geo = _Geometry.of(xshape, w.shape, a, isa, padding=padding, depthwise=True)
    group, dg, ocp = isa.group, geo.depthwise, geo.cb  # (its pack's channels: the output's, padded to whole tiles)
    packed = np.zeros((ocp, kh, dg * group), np.int8)  # [o, window row, tap], the taps padded to whole groups
    packed[:oc, :, :kw] = w[:, 0]
    zero_term = _padded(zx * w.astype(np.int64).sum(axis=(1, 2, 3)), ocp, np.int32)
    return _emit(bb, isa, geo, xq, packed.reshape(ocp, kh * dg, group), zero_term,
                 _padded(scale, ocp, np.float32), np.array([zx], isa.packed), shift, oc)  # fmt: skip


def _rewrite_conv_transpose(isa: Isa, bb, call):
    """A transposed convolution whose stride equals its kernel (an upsampling: each output pixel
    takes one tap), of a quantized activation and an int8 weight with a scale per output channel,
    as an int8 1x1 ``conv2d`` with ``co*kh*kw`` output channels and the pixel shuffle after it:
    ``rewrites.conv_transpose_as_conv``, which runs after this pass, on the int8 weight
    (permuted at compile time, each channel's scale repeated for its kh*kw taps) instead of the
    fp32 one constant folding would have made of it. PP-OCRv4 det's two upsampling layers."""
    import numpy as np
    from tvm import relax

    from .rewrites import _dequant_of, _NotInt8, _out_dtype, pixel_shuffle, upsampling_operands

    ops = upsampling_operands(call)
    if ops is None or (_out_dtype(ops[0]) or "float32") != "float32":
        return None
    _, x, w, (n, ci, h, wd), (_, co, kh, kw) = ops
    try:
        _activation(bb, x)
        dq = _dequant_of(bb, w, min_elements=1)
    except (_Skip, _NotInt8):
        return None
    if dq.q.dtype != np.int8 or dq.zero_point is not None or dq.q.ndim != 4:
        return None
    scale = np.broadcast_to(dq.scale, dq.q.shape)
    if not (scale == scale[:1, :, :1, :1]).all():
        return None  # not one scale per output channel
    q2 = np.ascontiguousarray(dq.q.transpose(1, 2, 3, 0).reshape(co * kh * kw, ci, 1, 1))
    s2 = np.repeat(scale[0, :, 0, 0].astype(np.float32), kh * kw)
    w2 = bb.emit(relax.op.dequantize(relax.const(q2), relax.const(s2), relax.const(np.zeros(co * kh * kw, np.int8)),
                                     axis=0, out_dtype="float32"))  # fmt: skip
    z = _rewrite_conv(isa, bb, bb.normalize(relax.op.nn.conv2d(x, w2, out_dtype="float32")))
    return None if z is None else pixel_shuffle(bb, bb.emit(z), (n, co, kh, kw, h, wd))


def _shift(xq, isa: Isa) -> int:
    """The activation as the instruction takes it is ``x + shift`` (its zero point with it):
    128 for int8 on vpdpbusd (unsigned), -128 for uint8 on sdot (signed), else 0 (int16 holds both)."""
    return {("int8", "uint8"): 128, ("uint8", "int8"): -128}.get((str(xq.ty.dtype), isa.packed), 0)


def _as_packed(v, shift: int, isa: Isa):
    """An activation value as the instruction takes it: shifted into its sign (``_shift``), or
    widened (int16 for vpmaddwd)."""
    if shift:
        return (v.astype("int32") + shift).astype(isa.packed)
    return v if v.dtype == isa.packed else v.astype(isa.packed)


def _padded(values, size: int, dtype):
    """Per-output-channel epilogue constants, zero for the channels a tile pads with."""
    import numpy as np

    out = np.zeros(size, dtype)
    out[: len(values)] = values
    return out


class _Geometry:
    """The shapes of one int8 convolution: input, window, stride, padding, planes, tile."""

    @classmethod
    def of(cls, xshape, wshape, attrs, isa: Isa, padding=None, depthwise: bool = False):
        g = cls()
        g.lanes = lanes = isa.lanes
        g.n, g.c, g.h, g.w = (int(d) for d in xshape)
        g.oc, _, g.kh, g.kw = (int(d) for d in wshape)
        g.sy, g.sx = (int(s) for s in attrs.strides)
        g.dy, g.dx = (int(d) for d in attrs.dilation)
        pt, pl, pb, pr = (int(p) for p in (attrs.padding if padding is None else padding))
        g.pt, g.pl = pt, pl
        g.oh = (g.h + pt + pb - g.dy * (g.kh - 1) - 1) // g.sy + 1
        g.ow = (g.w + pl + pr - g.dx * (g.kw - 1) - 1) // g.sx + 1
        # Phase planes: the padded input split by stride; a plane row is Wq wide.
        g.hq = -(-(g.h + pt + pb) // g.sy)
        g.wq = -(-(g.w + pl + pr) // g.sx)
        g.cb = -(-g.c // isa.group)
        pixels = g.oh * g.wq
        g.cols = max(1, min(_MAX_COLS, -(-pixels // lanes)))
        if depthwise:
            # A depthwise tile's accumulators share no activation load (each channel reads its
            # own plane), so its width mostly decides how many vectors past the pixels it
            # computes: the widest within 1/16 of the fewest (PP-OCR cls's maps two rows high:
            # 13 vectors a channel, in tiles of 1, not 16 in tiles of 4).
            vectors = -(-pixels // lanes)
            widths = range(1, g.cols + 1)

            def computed(c):  # vectors a channel's tiles of c compute
                return -(-vectors // c) * c

            fewest = min(map(computed, widths))
            g.cols = max(c for c in widths if computed(c) * 16 <= fewest * 17)
        g.rows = _rows(g.oc, min(_MAX_ROWS, isa.accumulators // g.cols))
        g.pp = -(-pixels // (lanes * g.cols)) * lanes * g.cols
        # The last tap reads this far past a pixel's own offset.
        reach = ((g.kh - 1) * g.dy // g.sy) * g.wq + (g.kw - 1) * g.dx // g.sx
        # A depthwise convolution: its groups of taps a window row. Its pack has the (padded)
        # output channels, each its own planes, split by stride only by rows (sy planes): a plane
        # row is the padded input row, ``wp`` = wq * sx wide, and output p's taps start at p * sx.
        g.depthwise = -(-g.kw // isa.group) if depthwise else 0
        g.wp = g.wq * g.sx if depthwise else g.wq
        g.step = g.sx if depthwise else 1
        if depthwise:
            g.cb = -(-g.oc // g.rows) * g.rows
            # (and the last window's vector load reads lanes * group elements from its start)
            reach = ((g.kh - 1) // g.sy) * g.wp + (g.depthwise - 1) * isa.group + lanes * isa.group
        # Whole plane rows, so the pack's loop splits into (row, column) without a division.
        g.length = -(-(g.pp * g.step + reach) // g.wp) * g.wp
        # Output rows a tile of the epilogue-driven form covers (0: that form does not apply).
        # Where output rows are whole rows of sums (a 1x1 stride-1 convolution: no wide rows),
        # the epilogue drives: a tile of (rows channels) x (ty output rows) computes its sums
        # into a small buffer, then converts them, without the sums' trip through memory.
        g.ty = 0
        fused_rows = _rows(g.oc, min(_MAX_ROWS, isa.accumulators))
        if g.wq == g.ow and g.oc % fused_rows == 0 and not depthwise:
            g.ty = next((t for t in range(1, g.oh + 1) if g.oh % t == 0 and t * g.ow % lanes == 0 and t * g.ow <= 512), 0)
        if g.ty:
            g.rows = fused_rows
            vectors = g.ty * g.ow // lanes
            g.cols = max(c for c in range(1, _MAX_COLS + 1) if vectors % c == 0 and c * g.rows <= isa.accumulators)
        return g

    def key(self):
        return tuple(sorted(vars(self).items()))


def _rows(oc: int, most: int) -> int:
    """Output channels a tile holds: the most that pad ``oc`` least."""
    return min(range(most, 0, -1), key=lambda r: (-(-oc // r) * r - oc, -r)) if oc > 1 else 1


def _emit(bb, isa: Isa, g: _Geometry, xq, packed, zero_term, scale, zero_point, shift: int, oc):
    return _emit_kernel(bb, "conv2d_int8", functools.partial(_compute, isa, g, shift, oc),
                        (isa.name, g.key(), str(xq.ty.dtype)), [xq, packed, zero_term, scale, zero_point])  # fmt: skip


def _emit_kernel(bb, name: str, compute, key, args):
    """call_te of ``compute`` on the activation and the packed constants, fused like the op it
    replaces (epilogues in, producers not); calls with the same ``key`` share one kernel."""
    from tvm import relax

    from .rewrites import _OUT_ELEMWISE_FUSABLE

    args = [args[0], *(relax.const(a) for a in args[1:])]
    cache = bb.__dict__.setdefault("_int8_compute", {})
    if key in cache:
        gv, out_ty = cache[key]
        return relax.call_tir(gv, args, out_ty)
    out = bb.call_te(compute, *args, primfunc_name_hint=name)
    gv = out.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE))
    cache[key] = (gv, list(out.ty_args))
    return out


def _widened(isa: Isa, wp):
    """The packed int8 weights as the instruction takes them: int16 for vpmaddwd, widened by a
    stage of the kernel (a pass over the weights a call), so the artifact keeps them int8."""
    from tvm import te

    if isa.weight == "int8":
        return wp
    return te.compute(wp.shape, lambda *i: wp(*i).astype(isa.weight), name=WIDEN)


def _compute(isa: Isa, g: _Geometry, shift: int, oc, xq, wp, zero_term, scale, zero_point):
    from tvm import te, tirx

    wp = _widened(isa, wp)

    planes = g.sy if g.depthwise else g.sy * g.sx

    def pack(n, icb, ph, pos, i4):
        r, col = pos // g.wp, pos % g.wp
        if g.depthwise:  # a channel; row phases only
            ih, iw, ic = r * g.sy + ph - g.pt, col - g.pl, icb
        else:
            ih, iw, ic = r * g.sy + ph // g.sx - g.pt, col * g.sx + ph % g.sx - g.pl, icb * isa.group + i4
        ok = tirx.all(ic < g.c, ih >= 0, ih < g.h, iw >= 0, iw < g.w)
        v = xq[n, te.min(ic, g.c - 1), te.max(te.min(ih, g.h - 1), 0), te.max(te.min(iw, g.w - 1), 0)]
        if g.depthwise:
            # A branch for the row and a select for the column: the plane rows that are input
            # rows for every plane and their columns that are the input row's (``_pack_rows``)
            # decide both at compile time, and are one vector copy; the other rows branch, and
            # read no row outside the input (the select's condition frees the load of its clamps).
            in_row = tirx.all(ic < g.c, ih >= 0, ih < g.h)
            return tirx.if_then_else(in_row, tirx.Select(tirx.all(iw >= 0, iw < g.w), _as_packed(v, shift, isa),
                                                         zero_point[0]), zero_point[0])  # fmt: skip
        # A select, not if_then_else: LLVM vectorizes the pack (a branch a byte kept it scalar).
        # The simplifier drops the load's clamps under the select's condition; LLVM has made it a
        # select of the load's address (the zero point's where the condition fails), and the
        # middle of the planes (``_pack_rows``) tests nothing.
        return tirx.Select(ok, _as_packed(v, shift, isa), zero_point[0])

    group = isa.group
    if g.depthwise:  # one element a position: the dot product's windows overlap (_windows)
        xp = te.compute((g.n, g.cb, planes, g.length), lambda n, c, ph, pos: pack(n, c, ph, pos, 0), name=PACK,
                        attrs={ROW_ATTR: [g.pl, g.w, g.pt, g.h, g.sy, 1]})
    else:
        xp = te.compute((g.n, g.cb, planes, g.length, group), pack, name=PACK,
                        attrs={ROW_ATTR: [g.pl, g.w, g.pt, g.h, g.sy, g.sx]})
    kb = te.reduce_axis((0, int(wp.shape[1])), "kb")
    k4 = te.reduce_axis((0, group), "k4")
    taps = g.kh * g.kw

    def acc(n, o, p):
        if g.depthwise:  # kb: (window row, group of taps); the channel's own planes
            ty, tg = kb // g.depthwise, kb % g.depthwise
            src = xp[n, o, ty % g.sy, p * g.sx + (ty // g.sy) * g.wp + tg * group + k4]
        else:
            icb, ty, tx = kb // taps, kb % taps // g.kw, kb % g.kw
            y, x = ty * g.dy, tx * g.dx
            plane = (y % g.sy) * g.sx + x % g.sx
            src = xp[n, icb, plane, p + (y // g.sy) * g.wq + x // g.sx, k4]
        return te.sum(src.astype("int32") * wp[o, kb, k4].astype("int32"), axis=[kb, k4])

    ocp = int(wp.shape[0])
    window = (g.kh, g.depthwise) if g.depthwise else (g.kh, g.kw)
    s = te.compute((g.n, ocp, g.pp), acc, name=ACC,
                   attrs={TILE_ATTR: [g.rows, g.cols, isa.name, g.ty, g.wp, *window, g.step if g.depthwise else 0]})

    def out(n, o, y, x):
        return (s[n, o, y * g.wq + x] - zero_term[o]).astype("float32") * scale[o]

    return te.compute((g.n, oc, g.oh, g.ow), out, name=OUT)


def _rewrite_matmul(isa: Isa, bb, call):
    """``matmul(DQ(x_q) [..., M, K], DQ(w_q) [K, N])`` (or of the transposed weight Gemm imports)
    as one ``matmul_int8`` kernel: the activation's rows broadcast 4 bytes at a time against
    vectors of ``lanes`` output columns (weights prepacked as [N/lanes, K/4, lanes, 4])."""
    import numpy as np

    from .rewrites import _dequant_of, _NotInt8, _op_name, _out_dtype, _resolve, _static_shapes

    x, w = call.args
    shapes = _static_shapes(x)
    if shapes is None or len(shapes[0]) < 2 or (_out_dtype(call.attrs) or "float32") not in ("float32", "void"):
        return None
    m = bb  # rewrites' helpers look bindings up on it, as on a mutator
    transposed = False
    we = _resolve(m, w)
    if _op_name(we) == "relax.permute_dims":
        axes = we.attrs.axes
        if axes is not None and [int(i) for i in axes] != [1, 0]:
            return None
        transposed, w = True, we.args[0]
    try:
        xe = _resolve(m, x)
        if _op_name(xe) == "relax.reshape":  # Gemm's flattened input
            from tvm import relax

            xq, sx, zx = _activation(m, xe.args[0])
            xq = bb.emit(relax.op.reshape(xq, shapes[0]))
        else:
            xq, sx, zx = _activation(m, x)
        dq = _dequant_of(m, w, min_elements=1)
    except (_Skip, _NotInt8):
        return None
    q = dq.q
    if q.dtype != np.int8 or dq.zero_point is not None or q.ndim != 2:
        return None
    scale_w = np.broadcast_to(dq.scale, q.shape).astype(np.float64)
    if transposed:
        q, scale_w = q.T, scale_w.T
    if not np.all(scale_w == scale_w[:1, :]):
        return None  # a scale per row (input feature): not one per output column
    k, n = q.shape
    if k * 255 * 128 >= 2**31:
        return None
    shift = _shift(xq, isa)
    zx += shift
    lead, rows_m = shapes[0][:-1], int(np.prod(shapes[0][:-1]))
    group = isa.group
    kp = -(-k // group) * group
    cols = max(1, min(_MAX_COLS, -(-n // isa.lanes)))
    np_ = -(-n // (isa.lanes * cols)) * isa.lanes * cols
    rows = _rows(rows_m, min(_MAX_ROWS, isa.accumulators // cols))
    mp = -(-rows_m // rows) * rows
    wpad = np.zeros((kp, np_), np.int8)
    wpad[:k, :n] = q
    packed = np.ascontiguousarray(wpad.reshape(kp // group, group, np_ // isa.lanes, isa.lanes).transpose(2, 0, 3, 1))
    zero_term = _padded(zx * q.astype(np.int64).sum(axis=0), np_, np.int32)
    scale = _padded(sx * scale_w[0], np_, np.float32)
    geo = dict(lead=tuple(lead), m=rows_m, mp=mp, k=k, kp=kp, n=n, np=np_, rows=rows, cols=cols)
    return _emit_kernel(bb, "matmul_int8", functools.partial(_dense_compute, isa, geo, shift),
                        (isa.name, "dense", tuple(sorted(geo.items())), str(xq.ty.dtype)),
                        [xq, packed, zero_term, scale, np.array([zx], isa.packed)])  # fmt: skip


def _dense_compute(isa: Isa, g: dict, shift: int, xq, wp, zero_term, scale, zero_point):
    from tvm import te, tirx

    wp = _widened(isa, wp)

    lead, lanes = g["lead"], isa.lanes

    def unflat(r):  # a row of the flattened activation -> its index in xq's leading dims
        idx = []
        for d in reversed(lead):
            idx.append(r % d)
            r = r // d
        return idx[::-1]

    def pack(r, col):
        v = xq[(*unflat(te.min(r, g["m"] - 1)), te.min(col, g["k"] - 1))]
        return tirx.if_then_else(tirx.all(r < g["m"], col < g["k"]), _as_packed(v, shift, isa), zero_point[0])

    group = isa.group
    xp = te.compute((g["mp"], g["kp"]), pack, name=PACK)
    kb = te.reduce_axis((0, g["kp"] // group), "kb")
    k4 = te.reduce_axis((0, group), "k4")

    def acc(r, c):
        return te.sum(xp[r, kb * group + k4].astype("int32") * wp[c // lanes, kb, c % lanes, k4].astype("int32"),
                      axis=[kb, k4])  # fmt: skip

    s = te.compute((g["mp"], g["np"]), acc, name=ACC, attrs={DENSE_ATTR: [g["rows"], g["cols"], isa.name]})

    def out(*i):
        r = 0
        for d, v in zip(lead, i[:-1]):
            r = r * d + v
        return (s[r, i[-1]] - zero_term[i[-1]]).astype("float32") * scale[i[-1]]

    return te.compute((*lead, g["n"]), out, name=OUT)


# -- the schedule -----------------------------------------------------------------------------


def is_int8_kernel(sch) -> bool:
    try:
        sch.get_sblock(ACC)
        return True
    except Exception:
        return False


def schedule(sch, parallel_min_work: int) -> None:
    """Schedule a ``conv2d_int8`` or ``matmul_int8`` kernel (and the epilogue FuseOps put after
    it) in place."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    blocks = list(sch.get_child_blocks(root))
    # Everything FuseOps put around the kernel (the epilogue: bias, activation, the next
    # QuantizeLinear; a residual's dequantized operand) is elementwise: inlined into its reader.
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for b in blocks:
        name = sch.get(b).name_hint
        if name == WIDEN:  # its own pass: rows of weights in parallel, the rest LLVM vectorizes
            if _domain(sch, b) * _SCALAR_WORK >= parallel_min_work:
                sch.parallel(sch.get_loops(b)[0])
        elif name not in (PACK, ACC) and name not in outputs:
            sch.compute_inline(b)

    acc = sch.get_sblock(ACC)
    if DENSE_ATTR in sch.get(acc).annotations:
        _schedule_dense(sch, acc, outputs, parallel_min_work)
        return
    rows, cols, isa, ty, wq, kh, kw, depthwise = sch.get(acc).annotations[TILE_ATTR]  # (depthwise: its stride)
    rows, cols, isa, ty, wq, kh, kw = int(rows), int(cols), _ISAS[str(isa)], int(ty), int(wq), int(kh), int(kw)

    pack = sch.get_sblock(PACK)
    loops = sch.get_loops(pack)
    fused = sch.fuse(*loops[:3])
    if _domain(sch, pack) * _SCALAR_WORK >= parallel_min_work:
        sch.parallel(fused)
    # Positions as (plane row, column): a position's row and column are then the loops' own
    # variables, not a division and a remainder per byte (4x faster packing).
    row, col = sch.split(loops[3], [None, wq])
    if not depthwise:
        sch.unroll(loops[4])
    _pack_rows(sch, pack, row, col, wq, vector=bool(depthwise))
    parallel = _domain(sch, acc) >= parallel_min_work
    if ty and len(outputs) == 1:
        _epilogue_driven(sch, acc, sch.get_sblock(next(iter(outputs))), rows, cols, ty, isa, parallel, (kh, kw))
        return
    n, o, p, kb, k4 = sch.get_loops(acc)
    ot, orow = sch.split(o, [None, rows])
    pt, pc, pl = sch.split(p, [None, cols, isa.lanes])
    taps = _window_loops(sch, kb, kh, kw)
    sch.reorder(n, ot, pt, *taps, orow, pc, pl, k4)
    outer = sch.fuse(n, ot, pt)
    if parallel:
        sch.parallel(outer)
    _tile(sch, acc, taps[0], orow, pc, pl, register_intrinsic(isa, window=int(depthwise)))
    for name in sorted(outputs):
        lp = sch.get_loops(sch.get_sblock(name))
        if len(lp) >= 2 and parallel:
            sch.parallel(sch.fuse(*lp[:2]))
        if len(lp) == 4:  # an output row in vectors (LLVM left a requantizing epilogue's rounding scalar)
            width = int(sch.get(lp[-1]).extent)
            lanes = max(d for d in range(1, _OUT_LANES + 1) if width % d == 0)
            if lanes > 1:
                sch.vectorize(sch.split(lp[-1], [None, lanes])[-1])


def _pack_rows(sch, pack, row, col, wp: int, vector: bool) -> None:
    """A pack's plane rows as those above the input, those that are input rows in every plane and
    the rest; and each of the middle ones as its columns before the input's, those that are the
    input's in every plane, and the rest. The middle rows' middle columns, bounds known, test
    neither row nor column: a plain copy that reads only inside the input, which LLVM vectorizes
    (for a convolution, 4 rows' bytes interleaved; before, a byte a step, each a select), or
    (``vector``: a depthwise convolution's, a row a plain copy) one vector of up to _ROW_VECTOR
    elements."""
    pl, w, pt, h, sy, sx = (int(v) for v in sch.get(pack).annotations[ROW_ATTR])
    rows = int(sch.get(row).extent)

    def inside(before: int, size: int, stride: int, extent: int):  # plane index i is input index i * stride + phase - before
        return -(-before // stride), min(extent, -(-(size + before - stride + 1) // stride))

    (lo, hi), (clo, chi) = inside(pt, h, sy, rows), inside(pl, w, sx, wp)
    if hi <= lo or chi <= clo:
        return
    sizes = [v for v in (lo, hi - lo, rows - hi) if v > 0]
    middle = sch.loop_partition(row, [*sizes[:-1], None])[1 if lo else 0] if len(sizes) > 1 else row
    col = sch.get_loops(sch.get_child_blocks(middle)[0])[-1 if vector else -2]
    sizes = [v for v in (clo, chi - clo, wp - chi) if v > 0]
    parts = sch.loop_partition(col, [*sizes[:-1], None]) if len(sizes) > 1 else [col]
    if vector and chi - clo <= _ROW_VECTOR:
        sch.vectorize(parts[1 if clo else 0])


#: The longest input row a depthwise pack copies as one vector (elements).
_ROW_VECTOR = 256


#: The most lanes of an output row's vectors: a width's largest divisor up to this.
_OUT_LANES = 16


#: A byte the pack or widening stage moves, against an element of vectorized work (what
#: ``parallel_min_work`` counts): the pack tests bounds and stores one byte at a time.
_SCALAR_WORK = 8


def _domain(sch, block) -> int:
    """How many elements a block computes (the product of its axes' extents)."""
    n = 1
    for iv in sch.get(block).iter_vars:
        n *= int(iv.dom.extent)
    return n


def _window_loops(sch, kb, kh: int, kw: int) -> list:
    """The reduction over (channel group, tap) as loops over window rows, columns and channel
    groups, innermost: a step's offsets are then sums of loop variables, not ``kb // taps`` and
    ``kb % kw`` (integer divisions the inner loop paid every step, as many scalar instructions as
    its dot products), and the innermost loop is long (taps innermost, LLVM unrolled their 3 steps
    and spilled the accumulators of vpmaddwd's separate adds)."""
    if kh * kw == 1:
        return [kb]
    kc, ky, kx = sch.split(kb, [None, kh, kw])
    sch.reorder(ky, kx, kc)
    return [lp for lp, extent in ((ky, kh), (kx, kw)) if extent != 1] + [kc]


def _tile(sch, acc, kb, rows, cols, lanes, intrin: str) -> None:
    """The register tile: zeroed, then the dot products (``lanes`` tensorized with ``intrin``),
    the (rows, cols) accumulators unrolled."""
    init = sch.decompose_reduction(acc, kb)
    sch.tensorize(lanes, intrin)
    sch.unroll(rows)
    sch.unroll(cols)
    sch.vectorize(sch.get_loops(init)[-1])


def _epilogue_driven(sch, acc, out, rows: int, cols: int, ty: int, isa: Isa, parallel: bool, window) -> None:
    """Tiles of the output (rows channels x ty rows) in parallel; in each, the sums for that tile
    (a rows x ty*OW buffer TVM allocates in the tile), chunk by chunk of (rows x cols vectors) in
    registers, then the epilogue over the tile while the sums are in cache."""
    n, o, y, x = sch.get_loops(out)
    ot, orow = sch.split(o, [None, rows])
    yt, yi = sch.split(y, [None, ty])
    sch.reorder(n, ot, yt, orow, yi, x)
    outer = sch.fuse(n, ot, yt)
    if parallel:
        sch.parallel(outer)
    sch.compute_at(acc, outer)
    ao, ap, akb, ak4 = sch.get_loops(acc)[-4:]
    chunk, pc, pl = sch.split(ap, [None, cols, isa.lanes])
    taps = _window_loops(sch, akb, *window)
    sch.reorder(chunk, *taps, ao, pc, pl, ak4)
    _tile(sch, acc, taps[0], ao, pc, pl, register_intrinsic(isa))
    # The tile's rows are whole output rows, so its (row, column) positions are consecutive in
    # the sums and in the output alike: one loop, in vectors (ty * OW is a whole number of them).
    # Vectors of a row alone left rows of 20 or 10 (PP-OCRv4 det's 1x1 convs at 20x20, 10x10)
    # scalar, their requantizing epilogues' roundings one at a time.
    sch.vectorize(sch.split(sch.fuse(yi, x), [None, isa.lanes])[-1])


def _schedule_dense(sch, acc, outputs: set[str], parallel_min_work: int) -> None:
    """A ``matmul_int8``: tiles of (rows rows x cols vectors of output columns); where the output
    is one block whose tiles are whole (no padded rows or columns), each tile's sums live in a
    small buffer the epilogue reads in cache, else the sums are one stage and the epilogue another."""
    rows, cols, isa = sch.get(acc).annotations[DENSE_ATTR]
    rows, cols, isa = int(rows), int(cols), _ISAS[str(isa)]
    mp, np_ = (int(iv.dom.extent) for iv in sch.get(acc).iter_vars[:2])
    work = mp * np_ * int(sch.get(acc).iter_vars[2].dom.extent) * isa.group
    pack = sch.get_sblock(PACK)
    r, _ = sch.get_loops(pack)
    if _domain(sch, pack) * _SCALAR_WORK >= parallel_min_work:
        sch.parallel(r)
    intrin = register_intrinsic(isa, dense=True)
    out = sch.get_sblock(next(iter(outputs))) if len(outputs) == 1 else None
    loops = sch.get_loops(out) if out is not None else []
    lead = loops[:-1]
    fits = (out is not None and all(int(sch.get(lp).extent) == 1 for lp in lead[:-1]) and lead
            and int(sch.get(lead[-1]).extent) % rows == 0 and int(sch.get(loops[-1]).extent) % (cols * isa.lanes) == 0)
    if fits:
        mt, mr = sch.split(lead[-1], [None, rows])
        nt, nn = sch.split(loops[-1], [None, cols * isa.lanes])
        sch.reorder(*lead[:-1], mt, nt, mr, nn)
        outer = sch.fuse(*lead[:-1], mt, nt)
        if work >= parallel_min_work:
            sch.parallel(outer)
        sch.compute_at(acc, outer)
        ar, ac, kb, k4 = sch.get_loops(acc)[-4:]
        cc, cl = sch.split(ac, [None, isa.lanes])
        sch.reorder(kb, ar, cc, cl, k4)
        _tile(sch, acc, kb, ar, cc, cl, intrin)
        sch.vectorize(sch.split(nn, [None, isa.lanes])[-1])
        return
    m, n, kb, k4 = sch.get_loops(acc)
    mt, mr = sch.split(m, [None, rows])
    nt, nc, nl = sch.split(n, [None, cols, isa.lanes])
    sch.reorder(mt, nt, kb, mr, nc, nl, k4)
    outer = sch.fuse(mt, nt)
    if work >= parallel_min_work:
        sch.parallel(outer)
    _tile(sch, acc, kb, mr, nc, nl, intrin)
    for name in sorted(outputs):
        lp = sch.get_loops(sch.get_sblock(name))
        if len(lp) >= 2:
            sch.parallel(sch.fuse(*lp[:-1]))

