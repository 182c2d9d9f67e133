"""Vulkan (via WebGPU/WGSL) builds: TVM's webgpu kernels plus a launch plan the wgpu runtime replays.

TVM 0.27 ships no SPIR-V codegen, but its ``webgpu`` target emits WGSL, which wgpu runs on Vulkan
(phones included). ``tvm.compile`` is run unchanged; two pass instruments record what it builds:

- the Relax ``main`` right after ``LowerAllocTensor``: every tensor is an ``alloc_tensor`` view
  (storage, byte offset, shape) of an ``alloc_storage``, and every kernel call names its buffers;
- the TIR module right after ``SplitHostDevice``: each host PrimFunc is a list of
  ``call_ffi_kernel`` launches whose argument order (not the PrimFunc's) and grid sizes the
  runtime must use.

The plan (JSON) replays those launches with numpy + wgpu only: no TVM on the device.
Binding rules follow TVM's web runtime (web/src/webgpu.ts): storage buffers in kernel-argument
order, then one uniform holding the scalar arguments and ``packGridDimX``; only blockIdx extents
feed the dispatch, and a grid.x of 65536 or more is folded into grid.z.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UnsupportedError
from ...manifest import FORMAT_WGSL_PLAN
from ...targets import TargetProfile
from .. import build as relax_build
from ..importer import node_name, supported_op_types, tensor_dtypes
from .base import Backend, CompiledSegment, Rejected

log = logging.getLogger(__name__)

PLAN_VERSION = 1
#: numpy dtypes WGSL storage buffers hold (no f64, no i64, no 8/16-bit integers).
WGSL_DTYPES = {"float32": "f32", "float16": "f16", "int32": "i32", "uint32": "u32"}
_NO_WGSL = {"int64", "uint64", "float64", "complex64", "complex128"}
_MAX_GRID = 65535
# The largest minStorageBufferOffsetAlignment WebGPU allows: a bound range must start at a multiple.
_OFFSET_ALIGN = 256
_BINDING_RE = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*(read_write|read)>\s*(\w+)\s*:\s*array<(\w+)>")
_WORKGROUP_RE = re.compile(r"@workgroup_size\((\d+),\s*(\d+),\s*(\d+)\)")
# TVM's webgpu codegen guards folded grids with `idx > packGridDimX`, which lets block index
# packGridDimX itself run when the fold padded an odd grid; `>=` is the intended bound.
_PACK_GUARD = "> podArgs.packGridDimX)"
# ONNX inputs that TVM's frontend reads at compile time (shapes, axes, sizes), never as kernel data.
_COMPILE_TIME_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "ConstantOfShape": {0}, "Unsqueeze": {1}, "Squeeze": {1},
    "Slice": {1, 2, 3, 4}, "Split": {1}, "Pad": {1, 2, 3}, "Resize": {1, 2, 3}, "Upsample": {1},
    "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "ReduceProd": {1},
    "ReduceL2": {1}, "ReduceL1": {1}, "ReduceLogSumExp": {1}, "ReduceSumSquare": {1}, "TopK": {1},
    "Range": {0, 1, 2}, "OneHot": {1}, "Trilu": {1}, "CumSum": {1},
}  # fmt: skip


def _rejected_nodes(imported, profile: TargetProfile) -> list[Rejected]:
    """Every ONNX node the Vulkan target cannot take: the profile's unsupported ops, and nodes with
    64-bit data tensors (WGSL has no i64/f64) that compile-time folding did not remove.

    Shape-like inputs (Reshape's shape, Slice's starts…) are read at compile time and do not count.
    The planner can send these nodes elsewhere; until then compile refuses them (exit 3)."""
    allowed = set(profile.capacity.get("dtypes", WGSL_DTYPES)) & set(WGSL_DTYPES)
    banned_ops = set(profile.capacity.get("unsupported_ops", []))
    types = tensor_dtypes(imported)
    out = []
    for i, node in enumerate(imported.model.graph.node):
        name = node_name(node, i)
        if node.op_type in banned_ops:
            out.append(Rejected(name, node.op_type, f"no GPU kernel on {profile.name}"))
            continue
        skip = _COMPILE_TIME_INPUTS.get(node.op_type, set())
        data = [x for k, x in enumerate(node.input) if x and k not in skip]
        data += [o for o in node.output if o]
        if node.op_type == "Shape":  # reads only the (static) shape of its input
            data = [o for o in node.output if o]
        bad = set()
        for x in data:
            if x in types:
                dt = types[x]
                # 64-bit types never reach WGSL; narrower ones (bool, int8) are fine inside a fused
                # kernel, and a kernel that stores one is named by the plan's buffer check.
                if dt in _NO_WGSL or (dt in WGSL_DTYPES and dt not in allowed):
                    bad.add(dt)
        if bad:
            out.append(Rejected(name, node.op_type, f"{'/'.join(sorted(bad))} data; WGSL has {', '.join(sorted(allowed))}"))
    return out


def narrow_index_constants(imported):
    """A copy of the model whose int64 index constants (Gather, GatherElements, GatherND) are int32.

    ONNX takes either for indices; WGSL has no i64, and exporters write every index as int64.
    Values that do not fit int32 stay as they are (and are then rejected).
    """
    import copy

    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(imported.model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list[tuple[str, int]]] = {}
    for node in g.node:
        for k, x in enumerate(node.input):
            users.setdefault(x, []).append((node.op_type, k))
    index_ops = {("Gather", 1), ("GatherElements", 1), ("GatherND", 1)}
    for name, t in inits.items():
        if t.data_type != onnx.TensorProto.INT64 or not users.get(name):
            continue
        if not all(u in index_ops for u in users[name]):
            continue
        arr = numpy_helper.to_array(t)
        if arr.size and (arr.min() < -(1 << 31) or arr.max() >= (1 << 31)):
            continue
        t.CopyFrom(numpy_helper.from_array(arr.astype(np.int32), name))
    for vi in g.value_info:
        if vi.name in inits and inits[vi.name].data_type == onnx.TensorProto.INT32:
            vi.type.tensor_type.elem_type = onnx.TensorProto.INT32
    out = copy.copy(imported)
    out.model = model
    return out


def build(mod, profile: TargetProfile, seg_dir: Path, stem: str) -> dict[str, Any]:
    """Compile an optimized Relax module for a webgpu profile into ``<stem>.plan.json``,
    ``<stem>.wgsl.json`` and ``<stem>.weights.bin`` under ``seg_dir``; returns their names and
    kernel counts."""
    import tvm

    target = profile.tvm()
    captured: dict[str, Any] = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, m, info):
            # Constant folding builds TIR too; the last capture is the real build's.
            if info.name == "LowerAllocTensor":
                captured["relax"] = m
            elif info.name == "tirx.SplitHostDevice":
                captured["tir"] = m

    try:
        with tvm.transform.PassContext(instruments=[_Capture()]):
            ex = tvm.compile(mod, target=target, relax_pipeline=_lowering(target))
    except Exception as e:  # TVM raises its own error types; name what failed
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise UnsupportedError(
            f"TVM could not build WGSL kernels for {profile.name}: {(lines[-1] if lines else type(e).__name__)[:300]}"
        ) from e
    sources = _split_sources(_device_source(ex.mod))
    plan, weights = _Planner(captured["relax"], captured["tir"], sources, profile).plan()
    budget = int(profile.capacity.get("memory_bytes", 0))
    if budget and plan["device_bytes"] > budget:
        raise UnsupportedError(
            f"the model needs {plan['device_bytes'] / 2**20:.1f} MiB of GPU buffers, {profile.name}'s budget is "
            f"{budget / 2**20:.0f} MiB; use a smaller input shape or a CPU target"
        )
    _check_limits(plan, profile)
    seg_dir.mkdir(parents=True, exist_ok=True)
    (seg_dir / f"{stem}.weights.bin").write_bytes(weights)
    kernels = {k: _patch_guard(v) for k, v in sources.items() if k in plan["kernels"]}
    (seg_dir / f"{stem}.wgsl.json").write_text(json.dumps(kernels, indent=1, sort_keys=True) + "\n")
    plan["wgsl"] = f"{stem}.wgsl.json"
    plan["weights"] = f"{stem}.weights.bin"
    (seg_dir / f"{stem}.plan.json").write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return {
        "plan": f"{stem}.plan.json",
        "files": [f"{stem}.plan.json", f"{stem}.wgsl.json", f"{stem}.weights.bin"],
        "kernels": len(kernels),
        "launches": len(plan["launches"]),
        "device_bytes": plan["device_bytes"],
    }


def _lowering(target):
    """TVM's generic GPU pipeline without its legalize-and-fuse step: ``mod`` comes fused and
    scheduled (``Backend.optimize``), and fusing its kernels again would join what
    ``rewrites.kernels_within`` kept apart and reschedule the joined kernels with dlight's rules
    alone."""
    import tvm
    from tvm.relax.backend.gpu_generic import pipeline as gpu

    @tvm.transform.module_pass(opt_level=0, name="TvmHybridWebGPULowering")
    def lower(mod, _ctx):
        with target:
            passes = gpu.library_dispatch_passes(target) + gpu.dataflow_lower_passes(target) + gpu.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return lower


#: capacity key -> (what the plan must stay within, in words)
_LIMITS = {
    "max_storage_buffers_per_stage": "storage buffers a kernel",
    "max_storage_buffer_binding_bytes": "bytes a bound buffer range",
    "max_buffer_bytes": "bytes a buffer",
}


def _check_limits(plan: dict[str, Any], profile: TargetProfile) -> None:
    """UnsupportedError (exit 3) when a kernel or buffer exceeds a limit the profile states (the
    webgpu profile: WebGPU's default limits, which every browser grants)."""
    cap = profile.capacity
    bad = []
    if (n := cap.get("max_storage_buffers_per_stage")) is not None:
        bad += [f"{k} binds {len(v['bindings'])} storage buffers" for k, v in plan["kernels"].items()
                if len(v["bindings"]) > int(n)]  # fmt: skip
    for key in ("max_storage_buffer_binding_bytes", "max_buffer_bytes"):
        if (n := cap.get(key)) is not None and plan["requires"]["largest_buffer_bytes"] > int(n):
            bad.append(f"a {plan['requires']['largest_buffer_bytes']}-byte buffer (the limit is {int(n)} {_LIMITS[key]})")
    if bad:
        limit = cap.get("max_storage_buffers_per_stage")
        raise UnsupportedError(
            f"{profile.name}'s limits are exceeded: {'; '.join(bad[:4])}{' …' if len(bad) > 4 else ''}"
            + (f" (at most {limit} storage buffers a kernel)" if limit is not None else "")
            + "; use a vulkan-* profile for GPUs that allow more, or a smaller input shape"
        )


def _device_source(lib) -> str:
    stack = [lib]
    while stack:
        m = stack.pop()
        if m.kind == "webgpu":
            return m.inspect_source()
        stack.extend(m.imports)
    raise UnsupportedError("TVM produced no webgpu module (the model has no kernels?)")


def _split_sources(text: str) -> dict[str, str]:
    """Per-kernel WGSL from the webgpu module's listing ("// Function: NAME" headers)."""
    parts = re.split(r"^// Function: (\S+)\n//-+\n", text, flags=re.MULTILINE)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if body.strip():
            out[name] = body
    for name, body in out.items():
        if f"fn {name}(" not in body:
            raise UnsupportedError(f"cannot find kernel {name} in TVM's WGSL listing; TVM's output format changed")
    return out


def _patch_guard(src: str) -> str:
    return src.replace(_PACK_GUARD, ">= podArgs.packGridDimX)")


def _int(expr, what: str) -> int:
    import tvm

    if isinstance(expr, int):
        return expr
    e = tvm.sym.Analyzer().simplify(expr)
    if isinstance(e, tvm.tirx.IntImm):
        return int(e.value)
    raise UnsupportedError(f"{what} is not static ({e}); only static shapes compile for Vulkan")


class _Planner:
    """Walks the recorded Relax main and host TIR into a launch plan and a weights blob."""

    def __init__(self, relax_mod, tir_mod, sources: dict[str, str], profile: TargetProfile):
        self.relax_mod = relax_mod
        self.tir_mod = tir_mod
        self.sources = sources
        self.profile = profile
        self.buffers: list[dict[str, Any]] = []
        self.weights = bytearray()
        self.kernels: dict[str, dict[str, Any]] = {}
        self.launches: list[dict[str, Any]] = []
        self.env: dict[Any, Any] = {}  # relax Var -> view dict / tuple of views / ("storage", id)
        self._const_ids: dict[Any, dict[str, Any]] = {}

    # -- buffers -------------------------------------------------------------------------------
    def _buffer(self, kind: str, nbytes: int, **extra) -> int:
        bid = len(self.buffers)
        self.buffers.append({"id": bid, "kind": kind, "nbytes": _round4(max(nbytes, 4)), **extra})
        return bid

    def _constant(self, const) -> dict[str, Any]:
        key = const  # TVM objects hash and compare by handle: one upload per constant
        if key in self._const_ids:
            return self._const_ids[key]
        arr = const.value.numpy()
        dtype = _wgsl_dtype(str(arr.dtype), "a constant")
        while len(self.weights) % 256:
            self.weights.append(0)
        off = len(self.weights)
        self.weights += np.ascontiguousarray(arr).tobytes()
        bid = self._buffer("constant", arr.nbytes, init={"offset": off, "nbytes": int(arr.nbytes)})
        view = {"buffer": bid, "offset": 0, "shape": list(arr.shape), "dtype": dtype}
        self._const_ids[key] = view
        return view

    # -- relax walk ----------------------------------------------------------------------------
    def plan(self) -> tuple[dict[str, Any], bytes]:
        from tvm import relax

        main = self.relax_mod["main"]
        inputs = []
        for p in main.params:
            shape, dtype = _tensor_sinfo(p, f"input {p.name}")
            bid = self._buffer("input", _nbytes(shape, dtype))
            view = {"buffer": bid, "offset": 0, "shape": shape, "dtype": dtype}
            self.env[p] = view
            inputs.append({"name": p.name, **view})
        body = main.body
        for block in body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    raise UnsupportedError(f"Relax main has a {type(b).__name__}; only plain bindings are planned")
                self._bind(b.var, b.value)
        outs = self._value(body.body)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        plan = {
            "format": FORMAT_WGSL_PLAN,
            "version": PLAN_VERSION,
            "inputs": inputs,
            "outputs": outs,
            "buffers": self.buffers,
            "kernels": self.kernels,
            "launches": self.launches,
            "requires": self._requires(),
            "device_bytes": sum(b["nbytes"] for b in self.buffers),
        }
        return plan, bytes(self.weights)

    def _value(self, expr):
        import tvm
        from tvm import relax

        if isinstance(expr, relax.Var):
            if expr not in self.env:
                raise UnsupportedError(f"Relax value {expr.name} is used before it is planned")
            return self.env[expr]
        if isinstance(expr, tvm.ir.expr.GenericConst):
            return self._constant(expr)
        if isinstance(expr, relax.Tuple):
            return tuple(self._value(f) for f in expr.fields)
        raise UnsupportedError(f"cannot plan a Relax {type(expr).__name__} as a value")

    def _bind(self, var, value) -> None:
        import tvm
        from tvm import relax

        if isinstance(value, (relax.Var, tvm.ir.expr.GenericConst, relax.Tuple)):
            self.env[var] = self._value(value)
            return
        if isinstance(value, relax.TupleGetItem):
            tup = self._value(value.tuple_value)
            self.env[var] = tup[value.index]
            return
        if not isinstance(value, relax.Call):
            raise UnsupportedError(f"cannot plan Relax {type(value).__name__} bound to {var.name}")
        op = value.op
        if isinstance(op, tvm.ir.GlobalVar):
            self._call_tir(op, [self._value(a) for a in value.args])
            self.env[var] = None
            return
        name = op.name if isinstance(op, tvm.ir.Op) else str(op)
        if name == "relax.memory.alloc_storage":
            size = _int(value.args[0].values[0], "storage size")
            self.env[var] = ("storage", self._buffer("storage", size))
            return
        if name == "relax.memory.alloc_tensor":
            storage = self._value(value.args[0])
            offset = _int(value.args[1].value, "tensor offset")
            shape = [_int(d, "tensor shape") for d in value.args[2].values]
            dtype = _wgsl_dtype(str(value.args[3].value), f"tensor {var.name}")
            end = offset + _nbytes(shape, dtype)
            buf = self.buffers[storage[1]]
            if end > buf["nbytes"]:
                buf["nbytes"] = _round4(end)
            self.env[var] = {"buffer": storage[1], "offset": offset, "shape": shape, "dtype": dtype}
            return
        if name == "relax.reshape":
            src = self._value(value.args[0])
            shape, dtype = _tensor_sinfo(var, f"reshape {var.name}")
            if _nbytes(shape, dtype) != _nbytes(src["shape"], src["dtype"]):
                raise UnsupportedError(f"reshape {var.name} changes the byte size")
            self.env[var] = {**src, "shape": shape}
            return
        raise UnsupportedError(f"Relax op {name} (bound to {var.name}) has no Vulkan plan step")

    # -- TIR host functions --------------------------------------------------------------------
    def _call_tir(self, gvar, args: list) -> None:
        from tvm import tirx

        fname = gvar.name_hint
        funcs = {g.name_hint: f for g, f in self.tir_mod.functions.items()}
        func = funcs.get(fname)
        if func is None:
            raise UnsupportedError(f"kernel function {fname} is missing from TVM's TIR module")
        if len(args) != len(func.params):
            raise UnsupportedError(f"{fname} takes {len(func.params)} arguments, Relax passes {len(args)}")
        views: dict[Any, dict[str, Any]] = {}  # buffer Var -> planned view
        for p, a in zip(func.params, args):
            if not isinstance(a, dict):
                raise UnsupportedError(f"{fname} argument {p.name} is not a tensor; only tensor arguments are planned")
            try:
                dtype = str(p.dtype)
            except AttributeError:
                raise UnsupportedError(f"{fname} takes a scalar parameter {p.name}; not planned for Vulkan") from None
            _wgsl_dtype(dtype, f"{fname} buffer {p.name}")
            views[p] = a
        for stmt in _flatten(func.body):
            if isinstance(stmt, tirx.DeclBuffer):
                src = _buffer_of(stmt.data)
                if src is not None and src in views:
                    views[stmt.buffer] = views[src]
            elif isinstance(stmt, tirx.Evaluate) and _op_name(stmt.value) == "tirx.call_ffi_kernel":
                self._launch(fname, stmt.value, views)
            elif isinstance(stmt, (tirx.AssertStmt, tirx.Bind)):
                continue
            else:
                what = _op_name(stmt.value) if isinstance(stmt, tirx.Evaluate) else type(stmt).__name__
                raise UnsupportedError(f"{fname} has host-side {what} around its kernels; not planned for Vulkan")

    def _launch(self, fname: str, call, data_var) -> None:
        import tvm

        kname = str(call.args[0].value)
        tags = [str(t) for t in call.attrs["launch_params"]] if call.attrs is not None else []
        nargs = len(call.args) - 1 - len(tags)
        kargs, dims = call.args[1 : 1 + nargs], call.args[1 + nargs :]
        if kname not in self.sources:
            raise UnsupportedError(f"{fname} launches {kname}, which has no WGSL in TVM's output")
        binds, pods, pod_types = [], [], []
        for a in kargs:
            buf = _buffer_of(a)
            if buf is not None and buf in data_var:
                binds.append(data_var[buf])
            elif isinstance(a, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
                pods.append(_scalar(a, f"{kname} scalar argument"))
                pod_types.append(str(a.dtype))
            else:
                raise UnsupportedError(f"{kname} argument {a} is neither a planned tensor nor a constant scalar")
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, d in zip(tags, dims):
            axis = "xyz".index(tag[-1])
            (grid if tag.startswith("blockIdx.") else block)[axis] = _int(d, f"{kname} launch extent {tag}")
        kinfo = self._kernel(kname, len(binds), pod_types)
        if kinfo["workgroup_size"] != block:
            raise UnsupportedError(f"{kname}: WGSL workgroup size {kinfo['workgroup_size']} != launch {block}")
        for view, b in zip(binds, kinfo["bindings"]):
            if view["offset"] % _OFFSET_ALIGN:
                raise UnsupportedError(
                    f"{kname}: tensor at byte offset {view['offset']} of its storage; WebGPU binds at "
                    f"multiples of {_OFFSET_ALIGN}"
                )
            if view["dtype"] != b["dtype"]:
                raise UnsupportedError(f"{kname}: binding {b['name']} is {b['dtype']}, tensor is {view['dtype']}")
        self.launches.append(
            {
                "kernel": kname,
                "func": fname,
                "args": [
                    {"buffer": v["buffer"], "offset": v["offset"], "nbytes": _round4(_nbytes(v["shape"], v["dtype"]))}
                    for v in binds
                ],
                "pod": pods,
                "dispatch": _dispatch(grid, kname),
                "pack_grid_x": grid[0],
            }
        )

    def _kernel(self, kname: str, n_buffers: int, pod_types: list[str]) -> dict[str, Any]:
        if kname in self.kernels:
            return self.kernels[kname]
        src = self.sources[kname]
        binds = []
        for m in _BINDING_RE.finditer(src):
            idx, access, vname, elem = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            dtype = {v: k for k, v in WGSL_DTYPES.items()}.get(elem)
            if dtype is None:
                raise UnsupportedError(f"{kname} binds array<{elem}>, a type this plan does not carry")
            binds.append({"binding": idx, "name": vname, "access": access, "dtype": dtype})
        if [b["binding"] for b in binds] != list(range(n_buffers)):
            raise UnsupportedError(f"{kname}: WGSL has bindings {[b['binding'] for b in binds]}, launch passes {n_buffers} buffers")
        m = _WORKGROUP_RE.search(src)
        if m is None:
            raise UnsupportedError(f"{kname} has no @workgroup_size")
        info = {
            "bindings": binds,
            "pod_types": pod_types,
            "workgroup_size": [int(m.group(i)) for i in (1, 2, 3)],
            "workgroup_bytes": _workgroup_bytes(src),
            "f16": "enable f16;" in src,
        }
        self.kernels[kname] = info
        return info

    def _requires(self) -> dict[str, Any]:
        ks = list(self.kernels.values())
        inv = max((int(np.prod(k["workgroup_size"])) for k in ks), default=1)
        return {
            "invocations_per_workgroup": inv,
            "workgroup_size": [max((k["workgroup_size"][i] for k in ks), default=1) for i in range(3)],
            "workgroup_storage_bytes": max((k["workgroup_bytes"] for k in ks), default=0),
            "storage_buffers_per_stage": max((len(k["bindings"]) for k in ks), default=1),
            "largest_buffer_bytes": max((b["nbytes"] for b in self.buffers), default=4),
            "features": ["shader-f16"] if any(k["f16"] for k in ks) else [],
        }


def _op_name(expr) -> str:
    op = getattr(expr, "op", None)
    return str(getattr(op, "name", op))


def _buffer_of(expr):
    """The buffer Var behind ``B.data`` (a ``tirx.buffer_data`` call), else None."""
    if _op_name(expr) == "tirx.buffer_data" and len(expr.args) == 1:
        return expr.args[0]
    return None


def _flatten(stmt):
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            yield from _flatten(s)
    elif isinstance(stmt, tirx.AttrStmt):
        yield from _flatten(stmt.body)
    else:
        yield stmt


def _scalar(expr, what: str):
    import tvm

    e = tvm.sym.Analyzer().simplify(expr)
    if isinstance(e, tvm.tirx.IntImm):
        return int(e.value)
    if isinstance(e, tvm.tirx.FloatImm):
        return float(e.value)
    raise UnsupportedError(f"{what} is not static ({e})")


def _dispatch(grid: list[int], kname: str) -> list[int]:
    """Workgroup counts as webgpu.ts computes them: grid.x >= 65536 halves into grid.z."""
    x, y, z = grid
    if z != 1:
        raise UnsupportedError(f"{kname} uses blockIdx.z, which the WebGPU runtime reserves")
    while x >= (1 << 16):
        x = x // 2 if x % 2 == 0 else (x + 1) // 2
        z *= 2
    if y > _MAX_GRID or z > _MAX_GRID:
        raise UnsupportedError(f"{kname} needs a {grid} grid; WebGPU allows {_MAX_GRID} workgroups a dimension")
    return [x, y, z]


def _workgroup_bytes(src: str) -> int:
    total = 0
    for m in re.finditer(r"var<workgroup>\s*\w+\s*:\s*array<(\w+),\s*(\d+)>", src):
        total += (2 if m.group(1) == "f16" else 4) * int(m.group(2))
    return total


def _tensor_sinfo(var, what: str) -> tuple[list[int], str]:
    from tvm import relax

    si = var.ty
    if not isinstance(si, relax.TensorType) or si.shape is None:
        raise UnsupportedError(f"{what} is not a tensor of known shape")
    shape = [_int(d, f"{what} shape") for d in si.shape.values]
    return shape, _wgsl_dtype(str(si.dtype), what)


def _wgsl_dtype(dtype: str, what: str) -> str:
    if dtype not in WGSL_DTYPES:
        raise UnsupportedError(f"{what} is {dtype}; WGSL kernels take {', '.join(WGSL_DTYPES)}")
    return dtype


def _nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _round4(n: int) -> int:
    return (int(n) + 3) // 4 * 4


# ----------------------------------------------------------------------------- schedules

#: A reduction kernel with at least this many outputs and at most this long a reduction computes
#: one output a thread (``_spatial_rule``) instead of one a workgroup (dlight's Reduction rule).
SPATIAL_MIN_OUTPUTS = 2048
SPATIAL_MAX_REDUCTION = 4096


def _spatial_rule():
    """Convolutions and pools (reductions over many outputs, each short): one output a thread, the
    reduction a loop in the thread, accumulated in a register, the fused epilogue applied there.

    dlight's Reduction rule gives every output a workgroup that reduces with barriers: right for a
    softmax row, not for a depthwise conv's 25 taps at 38400 outputs (PP-OCR cls in Chromium's
    WebGPU: that kernel alone 0.87 s of the model's 5.3 s)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class SpatialReduction(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
            if not infos or not infos[0].is_reduction() or len(infos) > 2 or \
                    (len(infos) == 2 and not infos[1].is_injective()):  # fmt: skip
                return None
            red, epilogue = infos[0], (infos[1] if len(infos) == 2 else None)
            if red.dom_kind() != "S" * red.dom_kind().count("S") + "R" * red.dom_kind().count("R"):
                return None
            try:
                spatial = int(np.prod([int(i.dom) for i in red.iters if i.kind == "S"]))
                reduction = int(np.prod([int(i.dom) for i in red.iters if i.kind == "R"]))
            except TypeError:  # a symbolic extent
                return None
            if spatial < SPATIAL_MIN_OUTPUTS or reduction > SPATIAL_MAX_REDUCTION:
                return None
            threads = min(256, int(target.attrs.get("max_num_threads", 256)))
            try:
                loops = sch.get_loops(red.block_rv)
                n_s = red.dom_kind().count("S")
                bx, tx = sch.split(sch.fuse(*loops[:n_s]), factors=[None, threads])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                if epilogue is not None:
                    sch.reverse_compute_at(epilogue.block_rv, tx, preserve_unit_loops=True)
                    sch.set_scope(red.block_rv, 0, "local")
                sch.decompose_reduction(red.block_rv, loops[n_s])
            except Exception:  # a shape this mapping does not fit: dlight's rules take it
                return None
            return sch

    return SpatialReduction()


def schedule(mod, profile: TargetProfile):
    """dlight's GPU rules, with convolution-shaped reductions one output a thread (``_spatial_rule``)."""
    from tvm.s_tir import dlight as dl

    rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), _spatial_rule(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())  # fmt: skip
    with profile.tvm():
        return rules(mod)


# ----------------------------------------------------------------------------- the backend


class WebGPUBackend(Backend):
    """GPUs through WGSL (Vulkan on phones via wgpu): TVM's webgpu build, recorded as a launch plan."""

    name = "webgpu"
    format = FORMAT_WGSL_PLAN
    device = "webgpu"
    tunable = False

    def prepare(self, imported, profile: TargetProfile):
        return narrow_index_constants(super().prepare(imported, profile))

    def rejected_nodes(self, imported, profile: TargetProfile | None) -> list[Rejected]:
        """What the frontend cannot convert, then WGSL's rules (64-bit data; shape inputs are
        compile-time) on the prepared model."""
        supported = supported_op_types()
        out = [Rejected(node_name(n, i), n.op_type, "TVM's ONNX frontend cannot convert it")
               for i, n in enumerate(imported.model.graph.node) if n.op_type not in supported]  # fmt: skip
        seen = {r.node for r in out}
        return out + [r for r in (_rejected_nodes(imported, profile) if profile else []) if r.node not in seen]

    def check_supported(self, imported, profile: TargetProfile) -> None:
        """Raise UnsupportedError naming every node the target cannot take, and why."""
        bad = _rejected_nodes(imported, profile)
        if bad:
            shown = "; ".join(str(b) for b in bad[:12]) + (f"; and {len(bad) - 12} more" if len(bad) > 12 else "")
            raise UnsupportedError(
                f"{len(bad)} op(s) cannot run on {profile.name}: {shown}; use a CPU target for this model"
            )

    def check_segment(self, imported, profile: TargetProfile) -> None:
        self.check_supported(imported, profile)

    def check_toolchain(self, profile: TargetProfile) -> None:
        return None  # nothing is linked: WGSL source and JSON

    def schedule(self, mod, profile: TargetProfile):
        return schedule(mod, profile)

    def rewrites(self, profile: TargetProfile) -> list:
        """Per-channel constants after a convolution (unfused BatchNorms) folded into its weights
        (``rewrites.conv_affine_folded``): fewer buffers a kernel, within WebGPU's 8."""
        from ..rewrites import conv_affine_folded

        return [conv_affine_folded()]

    def max_kernel_buffers(self, profile: TargetProfile) -> int | None:
        """The profile's ``max_storage_buffers_per_stage`` (webgpu: WebGPU's default 8): long
        concats are split and fused groups over it unfused, so such models build within it."""
        n = profile.capacity.get("max_storage_buffers_per_stage")
        return int(n) if n is not None else None

    def build_segment(self, mod, profile: TargetProfile, root: Path, stem: str) -> CompiledSegment:
        built = build(mod, profile, root / "segments", stem)
        lib = f"segments/{built['plan']}"
        result = relax_build.BuildResult(root / lib, *relax_build.kernel_counts(mod))
        return CompiledSegment(result, self.format, lib, [f"segments/{f}" for f in built["files"]])

