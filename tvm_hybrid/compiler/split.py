"""Cut an imported model into ONNX sub-models, one per segment of a plan."""

from __future__ import annotations

import dataclasses
import hashlib
import re

from onnx import helper

from .importer import ImportedModel, prepare, subgraph_reads
from .plan import Plan, PlanGraph, segments_in_order


@dataclasses.dataclass
class SegmentModel:
    """One segment: its nodes as a standalone, shape-static ONNX model."""

    id: int
    placement: str
    node_names: list[str]
    reasons: list[str]  # why its nodes are in the cloud (empty on the device)
    imported: ImportedModel
    onnx_bytes: bytes

    @property
    def reason(self) -> str | None:
        for r in ("unsupported-op", "memory", "latency"):
            if r in self.reasons:
                return r
        return None

    @property
    def version(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()[:12]


def split(imported: ImportedModel, graph: PlanGraph, plan: Plan) -> list[SegmentModel]:
    """Sub-models in execution order; each reads model inputs or earlier segments' outputs."""
    return segment_models(imported, graph, segments_in_order(graph, plan.on_device), plan.reasons)


def segment_models(imported: ImportedModel, graph: PlanGraph, groups: list[tuple[str, list[int]]],
                   reasons: list[str | None] | None = None) -> list[SegmentModel]:  # fmt: skip
    """One sub-model per group of node indices (placement, indices), ids in order. A group's
    inputs are what its nodes read from outside it; its outputs, what it writes that a node
    outside it reads or the model returns. Groups may overlap (an adaptive artifact's device
    pieces and cloud suffixes cover the same nodes)."""
    model = imported.model
    g = model.graph
    vinfo = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            readers.setdefault(t, set()).add(i)
    model_outputs = set(graph.model_outputs)
    segs = []
    for sid, (placement, idx) in enumerate(groups):
        members = set(idx)
        nodes = [g.node[i] for i in idx]
        mine = {t for i in idx for t in graph.nodes[i].outputs}
        ins = list(dict.fromkeys(t for i in idx for t in graph.nodes[i].inputs if t not in mine))
        outs = [t for t in dict.fromkeys(o for i in idx for o in graph.nodes[i].outputs)
                if t in model_outputs or readers.get(t, set()) - members]  # fmt: skip
        used_inits = [inits[n] for n in dict.fromkeys(x for nd in nodes for x in [*nd.input, *subgraph_reads(nd)]
                                                      if x in inits)]  # fmt: skip
        sub = helper.make_graph(
            nodes,
            f"{imported.name}-s{sid}",
            [vinfo[t] for t in ins],
            [vinfo[t] for t in outs],
            initializer=used_inits,
        )
        m = helper.make_model(sub, opset_imports=list(model.opset_import), producer_name="tvm-hybrid")
        m.ir_version = model.ir_version
        data = m.SerializeToString()
        sub_imported = prepare(m)
        sub_imported.name = f"{imported.name}-s{sid}"
        sub_imported.sha256 = hashlib.sha256(data).hexdigest()
        segs.append(
            SegmentModel(
                id=sid,
                placement=placement,
                node_names=[graph.nodes[i].name for i in idx],
                reasons=[reasons[i] for i in idx if reasons and reasons[i]],
                imported=sub_imported,
                onnx_bytes=data,
            )
        )
    return segs


def endpoint_name(model_name: str, seg_id: int) -> str:
    """The name the cloud server knows a segment by: [A-Za-z0-9_.-] only."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model_name}-s{seg_id}")

