"""Export cloud artifacts for engines that scale out: a Triton model repository (the ONNX segments
with a config.pbtxt each) and a KServe InferenceService that serves it with Triton.

Triton versions are integers; a segment's version (a hexadecimal content hash) becomes its decimal
value (``runtime.cloud.wire_version``), which is what the runtime's client sends and what
``tvm-hybrid serve`` also accepts, so a device talks to either server unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, UsageError
from ..manifest import TensorSpec
from ..protocol import v2_datatype
from ..runtime.artifact import open_artifact
from ..runtime.cloud import wire_version


@dataclasses.dataclass
class TritonModel:
    """One model directory of the repository: an endpoint and its versions."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    versions: dict[str, Path] = dataclasses.field(default_factory=dict)  # Triton version -> ONNX file

    def config(self, instances: int) -> str:
        versions = ", ".join(sorted(self.versions, key=int))
        lines = [
            f"name: {_q(self.name)}",
            'platform: "onnxruntime_onnx"',
            "max_batch_size: 0  # shapes are fixed at compile time; dims are the full shapes",
            f"version_policy: {{ specific: {{ versions: [ {versions} ] }} }}",
            *_tensors("input", self.inputs),
            *_tensors("output", self.outputs),
            f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]",
        ]
        return "\n".join(lines) + "\n"


def collect(artifacts: list[str | Path], opened: list) -> dict[str, TritonModel]:
    """Every servable segment of the cloud artifacts, by endpoint model name; the artifacts are
    appended to ``opened`` (a .tar stays unpacked until the caller closes it)."""
    models: dict[str, TritonModel] = {}
    for path in artifacts:
        art = open_artifact(path)
        opened.append(art)
        for seg in art.manifest.segments:
            ep = seg.endpoint
            if ep is None or seg.onnx is None:  # a device artifact names endpoints but holds no ONNX
                continue
            ins, outs = list(seg.inputs), list(seg.outputs)
            m = models.setdefault(ep.model, TritonModel(ep.model, ins, outs))
            if (m.inputs, m.outputs) != (ins, outs):
                raise UsageError(
                    f"two versions of {ep.model} take or give different tensors; Triton keeps one config per "
                    "model, so export those artifacts to separate repositories"
                )
            m.versions[wire_version(ep.version)] = art.root / seg.onnx
    if not models:
        raise ArtifactError(
            "no cloud segments in " + ", ".join(map(str, artifacts))
            + "; export the cloud artifact (OUT/cloud-x86), not the device one"
        )
    return models


def export_triton(artifacts: list[str | Path], out: str | Path, *, storage_uri: str | None = None,
                  name: str | None = None, instances: int = 1, force: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write ``out/<model>/config.pbtxt``, ``out/<model>/<version>/model.onnx`` and
    ``out/inferenceservice.yaml``; returns a summary."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty; pass --force to overwrite, or choose another -o")
    opened: list = []
    try:
        models = collect(artifacts, opened)
        out.mkdir(parents=True, exist_ok=True)
        for m in models.values():
            mdir = out / m.name
            if mdir.exists():
                shutil.rmtree(mdir)
            for v, onnx_file in m.versions.items():
                (mdir / v).mkdir(parents=True)
                shutil.copyfile(onnx_file, mdir / v / "model.onnx")
            (mdir / "config.pbtxt").write_text(m.config(instances))
    finally:
        for art in opened:
            art.close()
    isvc = _dns_name(name or f"tvm-hybrid-{next(iter(models))}")
    uri = storage_uri or f"pvc://tvm-hybrid-models/{out.resolve().name}"
    (out / "inferenceservice.yaml").write_text(_inference_service(isvc, uri))
    return {
        "repository": str(out),
        "inference_service": str(out / "inferenceservice.yaml"),
        "name": isvc,
        "storage_uri": uri,
        "models": {m.name: sorted(m.versions, key=int) for m in models.values()},
    }


def _inference_service(name: str, storage_uri: str) -> str:
    q = json.dumps  # a JSON string is a YAML string
    return f"""# KServe InferenceService: Triton serving the model repository next to this file over the
# Open Inference Protocol v2. Copy the repository to {storage_uri} first (or change storageUri),
# then: kubectl apply -f inferenceservice.yaml
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {q(name)}
spec:
  predictor:
    minReplicas: 1
    maxReplicas: 8
    scaleMetric: concurrency
    scaleTarget: 4
    model:
      modelFormat:
        name: triton
      protocolVersion: v2
      storageUri: {q(storage_uri)}
      args: ["--strict-model-config=true"]
      resources:
        requests: {{cpu: "2", memory: 2Gi}}
        limits: {{cpu: "4", memory: 4Gi}}
"""


_TRITON_TYPES = {"FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BOOL": "TYPE_BOOL",
                 "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
                 "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64"}  # fmt: skip


def _tensors(kind: str, specs: list[TensorSpec]) -> list[str]:
    items = []
    for s in specs:
        dims = ", ".join(str(d) for d in s.shape)
        items.append(f"  {{ name: {_q(s.name)}, data_type: {_TRITON_TYPES[v2_datatype(s.dtype)]}, dims: [ {dims} ] }}")
    return [f"{kind} [", ",\n".join(items), "]"]


def _q(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dns_name(text: str) -> str:
    """A Kubernetes object name: lowercase letters, digits and '-', at most 63 characters."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return s or "tvm-hybrid"
