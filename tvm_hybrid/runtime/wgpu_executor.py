"""Run a wgsl-plan segment (WGSL kernels + JSON launch plan) on Vulkan through wgpu; numpy + wgpu only.

The plan is what the compiler recorded from TVM's own build (see tvm_hybrid/compiler/backends/webgpu.py):
buffers with their sizes, weights to upload, and the kernel launches in order with their bound
buffer ranges, scalar arguments and workgroup counts. Pipelines, buffers and bind groups are made
once; a run writes the inputs, records every dispatch into one compute pass, submits, and reads
the outputs back (the read is the synchronisation point).

Choosing the adapter: ``TVM_HYBRID_WGPU_ADAPTER`` (or ``Session(device="wgpu:NAME")``) picks the
first adapter whose name contains NAME; otherwise wgpu's high-performance choice. Only Vulkan
adapters are considered unless ``TVM_HYBRID_WGPU_BACKENDS`` says otherwise (e.g. ``Metal``, ``All``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, RuntimeFailure, one_line
from ..manifest import FORMAT_WGSL_PLAN, Segment

log = logging.getLogger(__name__)

ADAPTER_ENV = "TVM_HYBRID_WGPU_ADAPTER"
BACKENDS_ENV = "TVM_HYBRID_WGPU_BACKENDS"
_LIMIT_KEYS = {
    "max-compute-invocations-per-workgroup": "invocations_per_workgroup",
    "max-compute-workgroup-storage-size": "workgroup_storage_bytes",
    "max-storage-buffers-per-shader-stage": "storage_buffers_per_stage",
    "max-storage-buffer-binding-size": "largest_buffer_bytes",
    "max-buffer-size": "largest_buffer_bytes",
}


def _wgpu():
    try:
        import wgpu
    except ImportError as e:
        raise RuntimeFailure(
            f"this artifact runs on Vulkan through wgpu, which is not installed ({e}); "
            "install it with: pip install wgpu==0.32.0"
        ) from e
    return wgpu


_instance_set = False


def adapters(backends: str | None = None) -> list:
    """The wgpu adapters this process can use (Vulkan ones unless ``TVM_HYBRID_WGPU_BACKENDS`` says)."""
    global _instance_set
    wgpu = _wgpu()
    wanted = [b.strip() for b in (backends or os.environ.get(BACKENDS_ENV, "Vulkan")).split(",") if b.strip()]
    if not _instance_set:
        try:
            from wgpu.backends.wgpu_native.extras import set_instance_extras

            # Also keeps the GL backend from probing EGL (and complaining) on headless machines.
            set_instance_extras(backends=wanted)
        except Exception as e:  # an instance already exists, or an old wgpu: filter below instead
            log.debug("wgpu instance extras not set: %s", e)
        _instance_set = True
    found = wgpu.gpu.enumerate_adapters_sync()
    if "All" not in wanted:
        found = [a for a in found if a.info.get("backend_type") in wanted]
    return found


def pick_adapter(name: str | None = None):
    """The adapter to run on: one whose summary contains ``name`` (or $TVM_HYBRID_WGPU_ADAPTER), else
    the first discrete/integrated GPU, else whatever there is (lavapipe on a CPU-only machine)."""
    name = name or os.environ.get(ADAPTER_ENV) or None
    found = adapters()
    if not found:
        raise RuntimeFailure(
            "no Vulkan adapter found; install a Vulkan driver (Debian/Ubuntu without a GPU: "
            "apt-get install mesa-vulkan-drivers libvulkan1), or set "
            f"{BACKENDS_ENV}=All to try other backends"
        )
    if name:
        match = [a for a in found if name.lower() in a.summary.lower()]
        if not match:
            raise RuntimeFailure(
                f"no wgpu adapter matches {name!r}; found: {'; '.join(a.summary for a in found)}"
            )
        return match[0]
    rank = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
    return sorted(found, key=lambda a: rank.get(a.info.get("adapter_type", ""), 4))[0]


class WGPUExecutor:
    """A segment of WGSL kernels replayed from its launch plan on a wgpu (Vulkan) device."""

    def __init__(self, root: Path, segment: Segment, target: dict[str, Any], device: str | None):
        wgpu = _wgpu()
        self._wgpu = wgpu
        plan_path = Path(root) / segment.library
        try:
            plan = json.loads(plan_path.read_text())
            kernels_src = json.loads((plan_path.parent / plan["wgsl"]).read_text())
            weights = (plan_path.parent / plan["weights"]).read_bytes()
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"cannot read the launch plan {segment.library}: {e}") from e
        if plan.get("format") != FORMAT_WGSL_PLAN or plan.get("version") != 1:
            raise ArtifactError(
                f"{segment.library} is a {plan.get('format')!r} v{plan.get('version')} plan; "
                f"this runtime reads {FORMAT_WGSL_PLAN} v1; recompile the model"
            )
        name = None
        if device and device not in ("wgpu", "vulkan", "webgpu"):
            name = device.split(":", 1)[1] if device.startswith(("wgpu:", "vulkan:")) else device
        adapter = pick_adapter(name)
        self.device_name = f"wgpu:{adapter.summary}"
        self._device = self._open_device(adapter, plan["requires"])
        self._plan = plan
        try:
            self._build(plan, kernels_src, weights)
        except RuntimeFailure:
            raise
        except Exception as e:  # wgpu validation errors: a kernel the driver rejects
            raise RuntimeFailure(f"cannot set up the kernels on {adapter.summary}: {one_line(e)}") from e

    def _open_device(self, adapter, req: dict[str, Any]):
        limits = adapter.limits
        need = {}
        for key, field in _LIMIT_KEYS.items():
            want = int(req.get(field, 0))
            have = int(limits.get(key, 0))
            if want > have:
                raise RuntimeFailure(
                    f"{adapter.summary} allows {key} = {have}, the artifact needs {want}; "
                    "recompile for a target profile that matches this GPU"
                )
            need[key] = have  # ask for what the adapter has: WebGPU's defaults are smaller
        features = list(req.get("features", []))
        missing = [f for f in features if f not in adapter.features]
        if missing:
            raise RuntimeFailure(f"{adapter.summary} lacks {', '.join(missing)}, which the artifact's kernels use")
        try:
            return adapter.request_device_sync(required_features=features, required_limits=need)
        except Exception as e:
            raise RuntimeFailure(f"cannot open {adapter.summary}: {one_line(e)}") from e

    def _build(self, plan: dict[str, Any], sources: dict[str, str], weights: bytes) -> None:
        wgpu, dev = self._wgpu, self._device
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
        self._buffers = []
        for b in plan["buffers"]:
            init = b.get("init")
            if init:
                data = bytearray(weights[init["offset"] : init["offset"] + init["nbytes"]])
                data += b"\0" * (b["nbytes"] - len(data))
                buf = dev.create_buffer_with_data(data=bytes(data), usage=usage)
            else:
                buf = dev.create_buffer(size=b["nbytes"], usage=usage)
            self._buffers.append(buf)
        self._pipelines = {}
        for kname, k in plan["kernels"].items():
            module = dev.create_shader_module(label=kname, code=sources[kname])
            entries = [
                {
                    "binding": b["binding"],
                    "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": "storage" if b["access"] == "read_write" else "read-only-storage"},
                }
                for b in k["bindings"]
            ]
            entries.append(
                {"binding": len(k["bindings"]), "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": "uniform"}}
            )
            bgl = dev.create_bind_group_layout(entries=entries)
            layout = dev.create_pipeline_layout(bind_group_layouts=[bgl])
            pipe = dev.create_compute_pipeline(layout=layout, compute={"module": module, "entry_point": kname})
            self._pipelines[kname] = (pipe, bgl, k)
        self._steps = []
        for ln in plan["launches"]:
            pipe, bgl, k = self._pipelines[ln["kernel"]]
            # Every launch's scalars are static: one small uniform each, written once.
            pod = np.zeros(max(4, len(ln["pod"]) + 1), np.uint32)
            for i, (v, t) in enumerate(zip(ln["pod"], k["pod_types"])):
                pod[i : i + 1].view({"int": np.int32, "uin": np.uint32, "flo": np.float32}[t[:3]])[0] = v
            pod[len(ln["pod"])] = ln["pack_grid_x"]
            ubuf = dev.create_buffer_with_data(data=pod.tobytes(), usage=wgpu.BufferUsage.UNIFORM)
            entries = [
                {"binding": i, "resource": {"buffer": self._buffers[a["buffer"]], "offset": a["offset"], "size": a["nbytes"]}}
                for i, a in enumerate(ln["args"])
            ]
            entries.append({"binding": len(ln["args"]), "resource": {"buffer": ubuf, "offset": 0, "size": pod.nbytes}})
            group = dev.create_bind_group(layout=bgl, entries=entries)
            self._steps.append((pipe, group, tuple(ln["dispatch"]), ubuf))
        self._inputs = plan["inputs"]
        self._outputs = plan["outputs"]

    def run(self, args: list[np.ndarray]) -> list[np.ndarray]:
        dev = self._device
        if len(args) != len(self._inputs):
            raise RuntimeFailure(f"the plan takes {len(self._inputs)} inputs, got {len(args)}")
        for spec, arr in zip(self._inputs, args):
            a = np.asarray(arr, dtype=spec["dtype"], order="C")  # scalars stay 0-d
            if list(a.shape) != spec["shape"]:
                raise RuntimeFailure(f"input {spec['name']} must be {spec['shape']}, got {list(a.shape)}")
            data = a.tobytes()
            if len(data) % 4:
                data += b"\0" * (4 - len(data) % 4)
            dev.queue.write_buffer(self._buffers[spec["buffer"]], spec["offset"], data)
        enc = dev.create_command_encoder()
        cpass = enc.begin_compute_pass()
        for pipe, group, (x, y, z), _ in self._steps:
            cpass.set_pipeline(pipe)
            cpass.set_bind_group(0, group)
            cpass.dispatch_workgroups(x, y, z)
        cpass.end()
        dev.queue.submit([enc.finish()])
        outs = []
        for o in self._outputs:
            nbytes = int(np.prod(o["shape"], dtype=np.int64)) * np.dtype(o["dtype"]).itemsize
            size = (nbytes + 3) // 4 * 4
            raw = dev.queue.read_buffer(self._buffers[o["buffer"]], o["offset"], size)
            outs.append(np.frombuffer(bytes(raw)[:nbytes], dtype=o["dtype"]).reshape(o["shape"]).copy())
        return outs


