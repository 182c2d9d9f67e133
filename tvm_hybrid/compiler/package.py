"""compile: import once, plan and build per target, write each artifact atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from .. import __version__
from .. import manifest as mf
from ..errors import UnsupportedError, UsageError
from ..targets import TargetProfile, all_profiles, precisions, resolve
from . import backends, importer, tuning_log
from .build import lift_weights
from . import plan as planner
from .split import SegmentModel, endpoint_name, segment_models, split

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """The plan flags: link to the cloud, device memory budget, constraints (None = the profile's)."""

    bandwidth: str | None = None
    rtt: str | None = None
    memory: str | None = None
    keep_input_local: bool = True
    max_crossings: int = 1
    # Calibration: measured ms / roofline ms on each side (scripts/bench_split.py measures them).
    device_scale: float = 1.0
    cloud_scale: float = 1.0

    def options(self, device: TargetProfile) -> planner.PlanOptions:
        link = device.link
        bw = self.bandwidth or link.get("bandwidth") or "20Mbps"
        rtt = self.rtt or link.get("rtt") or "40ms"
        mem = planner.parse_size(self.memory) if self.memory else float(device.capacity.get("memory_bytes", planner.INF))
        return planner.PlanOptions(
            link=planner.Link(planner.parse_bandwidth(bw), planner.parse_duration_ms(rtt)),
            memory_bytes=mem,
            keep_input_local=self.keep_input_local,
            max_crossings=self.max_crossings,
        )


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Everything `tvm-hybrid compile` needs, resolved before the long work starts."""

    model: Path
    targets: tuple[str, ...]
    output: Path
    inputs: tuple[importer.InputOverride, ...] = ()
    cloud: str | None = "cloud-x86"  # None: never split (unsupported ops are an error)
    plan: PlanSettings = PlanSettings()
    #: Tuning-log root whose <target>/ database is applied; None builds with default schedules only.
    tuning_logs: Path | None = dataclasses.field(default_factory=tuning_log.default_logs_dir)
    #: Arithmetic of the device segments: "fp32", or "fp16" (mixed precision, fp32 accumulation)
    #: on targets with fast fp16; cloud segments stay fp32.
    precision: str = "fp32"
    #: Build several candidate cuts (the plan's over a grid of links and cloud speeds) for the
    #: runtime to choose from per call; only with a cloud.
    adaptive: bool = False
    max_cuts: int = 6


@dataclasses.dataclass
class ArtifactSummary:
    target: str
    path: Path
    files: int
    bytes: int
    segments: int
    seconds: float
    placement: list[str] = dataclasses.field(default_factory=list)
    kernels: dict[str, int] = dataclasses.field(default_factory=lambda: {"tuned": 0, "default": 0})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def prepare(imported: importer.ImportedModel, device: TargetProfile) -> importer.ImportedModel:
    """The model as the device's backend compiles it (what plans and builds for it start from)."""
    return backends.for_profile(device).prepare(imported, device)


def plan_graph(imported: importer.ImportedModel, device: TargetProfile, cloud: TargetProfile | None,
               settings: PlanSettings) -> planner.PlanGraph:  # fmt: skip
    """The planner's graph for one device target, ``imported`` prepared for it: built once, then
    solved for each link (``solve_plan``). With no cloud, nodes the device cannot run are an error."""
    graph = planner.graph_from_model(imported, device, cloud)
    for n in graph.nodes:
        n.device_ms *= settings.device_scale
        n.cloud_ms *= settings.cloud_scale
    if cloud is None and any(n.device_ms == planner.INF for n in graph.nodes):
        backends.for_profile(device).check_supported(imported, device)  # names them, and why
        bad = sorted({n.op for n in graph.nodes if n.device_ms == planner.INF})
        raise UnsupportedError(f"unsupported ops for target {device.name}: {', '.join(bad)}")
    return graph


def solve_plan(graph: planner.PlanGraph, device: TargetProfile, cloud: TargetProfile | None,
               settings: PlanSettings) -> planner.Plan:  # fmt: skip
    """The placement of every node under the settings' link and budget (all-device with no cloud)."""
    opts = settings.options(device)
    if cloud is None:
        opts = dataclasses.replace(opts, memory_bytes=planner.INF)
    return planner.solve(graph, opts)


def plan_for(imported: importer.ImportedModel, device: TargetProfile, cloud: TargetProfile | None,
             settings: PlanSettings) -> tuple[planner.PlanGraph, planner.Plan]:  # fmt: skip
    """``plan_graph`` and ``solve_plan`` in one: the placement of every node for one device target."""
    graph = plan_graph(imported, device, cloud, settings)
    return graph, solve_plan(graph, device, cloud, settings)


def compile_model(opts: CompileOptions) -> list[ArtifactSummary]:
    """Build one artifact per target (and one for the cloud when a plan uses it) under ``opts.output``;
    nothing is left behind on failure."""
    if not opts.targets:
        raise UsageError("no --target given; run `tvm-hybrid targets` to list them, or use --target host")
    profiles = [resolve(t) for t in opts.targets]
    names = [p.name for p in profiles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"target {', '.join(dup)} given twice (host resolves to {resolve('host').name})")
    for prof in profiles:  # a missing cross compiler fails now, not after minutes of compiling
        backends.for_profile(prof).check_toolchain(prof)
        check_precision(opts.precision, prof)
    cloud = resolve(opts.cloud) if opts.cloud else None
    if cloud is not None and cloud.placement != "cloud":
        clouds = sorted(name for name, p in all_profiles().items() if p.placement == "cloud")
        raise UsageError(f"--cloud {cloud.name} is a device profile; cloud profiles: {', '.join(clouds)}")
    if opts.adaptive and cloud is None:
        raise UsageError("--adaptive chooses between device and cloud per call; it needs a cloud (not --cloud none)")
    imported = importer.load(opts.model, list(opts.inputs))
    out = Path(opts.output)
    summaries = []
    variants = {p.name: [v for v in dispatch_profiles(p) if backends.for_profile(v).builds_differently(v, imported.model)]
                for p in profiles}  # fmt: skip
    every = {p.name: p for p in [*profiles, *([cloud] if cloud else []), *(v for vs in variants.values() for v in vs)]}
    logs = {name: tuning_log.open_database(opts.tuning_logs, p) for name, p in every.items()}
    cloud_segments: dict[str, tuple[SegmentModel, TargetProfile]] = {}
    with staging(out) as staged:
        for prof in profiles:
            t0 = time.perf_counter()
            stage = _stage(out, prof.name, staged)
            prepared = prepare(imported, prof)  # once a target
            graph, plan = plan_for(prepared, prof, cloud, opts.plan)
            vlogs = [(v, logs[v.name]) for v in variants[prof.name]]
            if opts.adaptive:
                m, segs = build_adaptive_artifact(prepared, prof, cloud, graph, plan, stage, opts.plan,
                                                  logs[prof.name], opts.precision, vlogs, opts.max_cuts)  # fmt: skip
            else:
                segs = split(prepared, graph, plan)
                m = build_artifact(prepared, prof, cloud, segs, graph, plan, stage, opts.plan, logs[prof.name],
                                   opts.precision, vlogs)  # fmt: skip
            for seg in segs:  # an adaptive artifact's device pieces need no cloud copy: its cuts are the fallback
                if seg.placement == "cloud" or (_cloud_copy(seg, opts.plan) and not opts.adaptive):
                    cloud_segments[endpoint_name(imported.name, seg.id) + seg.version] = (seg, graph)
            summaries.append(_summary(prof.name, out, m, t0))
        if cloud_segments:
            t0 = time.perf_counter()
            stage = _stage(out, cloud.name, staged)
            m = build_cloud_artifact(imported, cloud, list(cloud_segments.values()), stage, logs[cloud.name])
            summaries.append(_summary(cloud.name, out, m, t0))
    return summaries


@contextlib.contextmanager
def staging(out: Path):
    """Artifacts built in staging directories under ``out`` (``_stage`` appends to the list this
    yields), swapped in when the block ends, all removed when it raises: a failed compile leaves
    no trace, not even an empty output directory."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        yield staged
        for stage, final in staged:
            _replace_dir(stage, final)
    except BaseException:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


class WeightStore:
    """The weights of a segment's builds, once each (by content): ``segments/<id>.weights.npz``."""

    def __init__(self):
        self.arrays: dict[str, Any] = {}

    def add(self, array) -> str:
        import hashlib

        key = "w" + hashlib.sha256(str(array.dtype).encode() + str(array.shape).encode() + array.tobytes()).hexdigest()[:24]
        self.arrays.setdefault(key, array)
        return key

    def save(self, path: Path) -> None:
        import numpy as np

        with open(path, "wb") as f:  # uncompressed: the runtime reads it without inflating
            np.savez(f, **self.arrays)


def dispatch_profiles(profile: TargetProfile) -> list[TargetProfile]:
    """The profiles a profile's ``dispatch`` names: same backend and architecture, or a UsageError."""
    from ..hostcpu import target_arch

    out = []
    for name in profile.dispatch:
        v = resolve(name)
        if backends.for_profile(v) is not backends.for_profile(profile) or \
                target_arch(v.to_dict()) != target_arch(profile.to_dict()):  # fmt: skip
            raise UsageError(f"target profile {profile.name}: dispatch names {name}, which is not the same "
                             "kind of CPU (backend and architecture)")  # fmt: skip
        out.append(v)
    return out


PRECISIONS = ("fp32", "fp16")


def check_precision(precision: str, profile: TargetProfile) -> None:
    """fp16 only where the target computes it natively: elsewhere it would be emulated in fp32,
    slower than fp32 itself (UnsupportedError, exit 3)."""
    if precision not in PRECISIONS:
        raise UsageError(f"bad --precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision not in precisions(profile):
        fp16 = sorted(n for n, p in all_profiles().items() if "fp16" in precisions(p) and p.placement == "device")
        raise UnsupportedError(
            f"--precision fp16: {profile.name} has no fast fp16 arithmetic"
            f"{' (x86 without AVX512-FP16 converts every fp16 value to fp32)' if profile.family.startswith('x86') else ''}"
            f"; targets with it: {', '.join(fp16)}. To shrink a CPU model, quantize it to int8 (tvm-hybrid quantize)"
        )


def _stage(out: Path, name: str, staged: list) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
    stage.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    staged.append((stage, out / name))
    return stage


def _summary(name: str, out: Path, m: mf.Manifest, t0: float) -> ArtifactSummary:
    return ArtifactSummary(
        target=name,
        path=out / name,
        files=len(m.files) + 1,
        bytes=sum(f.size for f in m.files),
        segments=len(m.segments),
        seconds=round(time.perf_counter() - t0, 2),
        placement=[s.placement for s in m.segments],
        kernels={k: sum((s.kernels or {}).get(k, 0) for s in m.segments) for k in ("tuned", "default")},
    )


def _cloud_copy(seg: SegmentModel, settings: PlanSettings) -> bool:
    """A device segment is also served by the cloud (a fallback) when its input may leave the device."""
    return seg.placement == "device" and not settings.keep_input_local


def _replace_dir(stage: Path, final: Path) -> None:
    """Swap the staged directory in; an older artifact is removed only after the rename."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compile_segment(imported: importer.ImportedModel, profile: TargetProfile, root: Path, stem: str,
                    tuning: tuning_log.TuningLog | None = None, precision: str = "fp32",
                    weights: WeightStore | None = None, weight_mode: str | None = None,
                    tied: frozenset = frozenset()) -> backends.CompiledSegment:  # fmt: skip
    """ONNX (sub-)model, prepared for the profile's backend → Relax → optimized (with the target's
    tuning log) → ``root/segments/<stem>.*`` in the backend's segment format. With ``weights``,
    the large constants go there instead of into the library (``c.weight_keys``, in order).
    ``weight_mode`` ("q4", "q8"; needs ``weights``): matmul and embedding weights quantized per
    group and kept packed (``weightquant``; ``tied``: its ``embedding_digests``)."""
    log.info("building %s for %s", imported.name, profile.name)
    backend = backends.for_profile(profile)
    backend.check_segment(imported, profile)
    mod = importer.to_relax(imported)
    packed: list = []
    if weight_mode is not None:
        from . import weightquant
        from .backends.cpu import cpu_config

        weightquant.check_mode(weight_mode, profile)

        mod, packed, report = weightquant.apply(mod, weight_mode, tied, cpu_config(profile.tvm()).lanes)
        log.info("%s: %d matmuls and %d embeddings quantized (%s): %.1f MB of float32 weights in %.1f MB",
                 imported.name, report.matmuls, report.embeddings, weight_mode, report.float_bytes / 1e6,
                 report.packed_bytes / 1e6)  # fmt: skip
    mod = backend.optimize(mod, profile, database=tuning, precision=precision)
    keys = None
    if weights is not None:
        mod, arrays = lift_weights(mod)
        keys = [weights.add(a) for a in [*packed, *arrays]]
    c = backend.build_segment(mod, profile, root, stem)
    c.weight_keys = keys
    log.info("%s: %d kernels tuned, %d default%s", imported.name, c.result.tuned_kernels, c.result.default_kernels,
             f" (tuning log {tuning.path})" if tuning else " (no tuning log)")  # fmt: skip
    return c


def _segment_entry(seg: SegmentModel, graph: planner.PlanGraph) -> mf.Segment:
    """A manifest segment; its predicted ms is the planner's: per-op rooflines on its side, summed."""
    nodes = {n.name: n for n in graph.nodes}
    side = "device_ms" if seg.placement == "device" else "cloud_ms"
    ms = sum(getattr(nodes[n], side) for n in seg.node_names)
    return mf.Segment(
        id=seg.id,
        placement=seg.placement,
        nodes=tuple(seg.node_names),
        inputs=tuple(seg.imported.inputs),
        outputs=tuple(seg.imported.outputs),
        predicted={"flops": sum(nodes[n].flops for n in seg.node_names), "ms": round(ms, 4)},
    )


def _endpoint(imported, seg: SegmentModel) -> mf.Endpoint:
    return mf.Endpoint(endpoint_name(imported.name, seg.id), seg.version)


def _built(c: backends.CompiledSegment) -> dict[str, Any]:
    """A built segment's manifest fields: format, library, kernel counts, device code."""
    r = c.result
    return {"format": c.format, "library": c.library, "device_code": r.device_code,
            "kernels": {"tuned": r.tuned_kernels, "default": r.default_kernels}}  # fmt: skip


def build_artifact(imported, profile: TargetProfile, cloud: TargetProfile | None, segs: list[SegmentModel],
                   graph: planner.PlanGraph, plan: planner.Plan, root: Path, settings: PlanSettings,
                   tuning: tuning_log.TuningLog | None = None, precision: str = "fp32",
                   variants: list[tuple[TargetProfile, tuning_log.TuningLog | None]] = ()) -> mf.Manifest:  # fmt: skip
    """The device artifact: device segments compiled for the target (and for each of its
    ``dispatch`` profiles, ``variants``, which the runtime picks from by this CPU's features),
    cloud segments as endpoints (with a local fallback build where the device can run them)."""
    files, entries = [], []
    for seg in segs:
        e = _segment_entry(seg, graph)
        if seg.placement == "device":
            e = _build_device_segment(seg, e, profile, root, tuning, precision, variants, files)
            if _cloud_copy(seg, settings):
                e = dataclasses.replace(e, endpoint=_endpoint(imported, seg))
        else:
            e = dataclasses.replace(e, reason=seg.reason, endpoint=_endpoint(imported, seg))
            if seg.reason != "unsupported-op":
                c = compile_segment(seg.imported, profile, root, str(seg.id), tuning, precision)
                e = dataclasses.replace(e, format=c.format, fallback_library=c.library)
                files += c.files
        entries.append(e)
    plan_doc = _plan_doc(plan, cloud, any(s.placement == "cloud" for s in segs))
    m = _manifest(imported, profile, entries, root, files, plan=plan_doc, precision=precision)
    (root / mf.MANIFEST).write_text(m.dumps())
    return m


def _build_device_segment(seg: SegmentModel, e: mf.Segment, profile: TargetProfile, root: Path,
                          tuning: tuning_log.TuningLog | None, precision: str,
                          variants: list[tuple[TargetProfile, tuning_log.TuningLog | None]],
                          files: list[str]) -> mf.Segment:  # fmt: skip
    """Compile a device segment for the profile and its dispatch variants (one copy of the weights
    for every build); its files are appended to ``files``, its manifest entry returned."""
    store = WeightStore() if variants else None
    c, built = compile_builds(seg.imported, profile, root, str(seg.id), tuning, precision, variants, files, store)
    e = dataclasses.replace(e, **_built(c))
    if store is not None:
        rel = f"segments/{seg.id}.weights.npz"
        store.save(root / rel)
        files.append(rel)
        e = dataclasses.replace(e, variants=tuple(built), weights={"file": rel, "keys": c.weight_keys})
    return e


def compile_builds(imported: importer.ImportedModel, profile: TargetProfile, root: Path, stem: str,
                   tuning: tuning_log.TuningLog | None, precision: str,
                   variants: list[tuple[TargetProfile, tuning_log.TuningLog | None]], files: list[str],
                   store: WeightStore | None, weight_mode: str | None = None,
                   tied: frozenset = frozenset()) -> tuple[backends.CompiledSegment, list[dict[str, Any]]]:  # fmt: skip
    """A segment compiled for the profile (``stem``) and each dispatch variant (``stem.<name>``),
    weights into ``store``: (the profile's build, the variants' manifest entries); every file
    they wrote is appended to ``files``."""
    c = compile_segment(imported, profile, root, stem, tuning, precision, store, weight_mode, tied)
    files += c.files
    built = []
    for vprof, vlog in variants:
        cv = compile_segment(imported, vprof, root, f"{stem}.{vprof.name}", vlog, precision, store, weight_mode, tied)
        built.append({"profile": vprof.name, "library": cv.library, "tvm_target": dict(vprof.tvm_target),
                      "weights": cv.weight_keys})  # fmt: skip
        files += cv.files
    return c, built


def _plan_doc(plan: planner.Plan, cloud: TargetProfile | None, uses_cloud: bool) -> dict[str, Any]:
    link = plan.options.link
    return {
        "link": {"bandwidth_bps": link.bandwidth_bps, "rtt_ms": link.rtt_ms},
        "predicted": plan.cost.to_dict(),
        "baselines": {k: (v.to_dict() if v else None) for k, v in plan.baselines.items()},
        "device_memory": plan.device_memory,
        "cloud": cloud.name if cloud and uses_cloud else None,
    }


def cut_name(on_device: list[bool], taken: set[str]) -> str:
    """all-device, all-cloud, or device-N (N: ops on the device), unique among ``taken``."""
    k = sum(on_device)
    name = "all-device" if k == len(on_device) else "all-cloud" if k == 0 else f"device-{k}"
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}.{i}"
    taken.add(name)
    return name


def describe_cuts(graph: planner.PlanGraph, opts: planner.PlanOptions, max_cuts: int = 6) -> list[dict[str, Any]]:
    """The candidate cuts ``compile --adaptive`` builds (``plan --adaptive``): per cut its name,
    ``on_device`` (per node), ops on the device, predicted cost at the options' link, device
    memory, and the grid conditions under which the planner finds it optimal."""
    out, taken = [], set()
    for c in planner.candidate_cuts(graph, opts, max_cuts):
        cost = planner.evaluate(graph, c.on_device, opts.link)
        out.append({"name": cut_name(c.on_device, taken), "device_ops": sum(c.on_device), "on_device": c.on_device,
                     "predicted": cost.to_dict(), "device_memory": planner.memory_use(graph, c.on_device)["total"],
                     "optimal_for": c.conditions})  # fmt: skip
    return out


def build_adaptive_artifact(imported, profile: TargetProfile, cloud: TargetProfile, graph: planner.PlanGraph,
                            plan: planner.Plan, root: Path, settings: PlanSettings,
                            tuning: tuning_log.TuningLog | None = None, precision: str = "fp32",
                            variants: list[tuple[TargetProfile, tuning_log.TuningLog | None]] = (),
                            max_cuts: int = 6) -> tuple[mf.Manifest, list[SegmentModel]]:  # fmt: skip
    """A device artifact with several candidate cuts (``compile --adaptive``): the planner's
    optimal cuts over a grid of bandwidths and cloud speeds (plan.candidate_cuts), plus the
    plan's own. The device nodes are built once, as pieces shared by the cuts
    (plan.pieces_of); each cut that uses the cloud has its suffix as one cloud segment. The
    manifest's ``cuts`` lists each cut's segments (run in that order) and its predicted cost;
    ``plan.default_cut`` is the plan for the profile's link. Returns the manifest and the
    segments (the cloud ones go into the cloud artifact)."""
    cands = describe_cuts(graph, plan.options, max_cuts)  # the plan's own among them
    pieces, per_cut = planner.pieces_of([c["on_device"] for c in cands])
    n = len(graph.nodes)
    groups: list[tuple[str, list[int]]] = [("device", idx) for idx in pieces]
    suffix_of: dict[int, int] = {}
    for k, c in enumerate(cands):
        rest = [i for i in range(n) if not c["on_device"][i]]
        if rest:
            suffix_of[k] = len(groups)
            groups.append(("cloud", rest))
    reasons = ["unsupported-op" if node.device_ms == planner.INF else "latency" for node in graph.nodes]
    segs = segment_models(imported, graph, groups, reasons)
    files: list[str] = []
    entries = []
    for seg in segs:
        e = _segment_entry(seg, graph)
        if seg.placement == "device":
            entries.append(_build_device_segment(seg, e, profile, root, tuning, precision, variants, files))
        else:
            entries.append(dataclasses.replace(e, reason=seg.reason, endpoint=_endpoint(imported, seg)))
    cuts = []
    for k, c in enumerate(cands):
        ids = list(per_cut[k]) + ([suffix_of[k]] if k in suffix_of else [])
        pred = {key: c["predicted"][key] for key in ("device_ms", "cloud_ms", "bytes_up", "bytes_down")}
        cuts.append({"name": c["name"], "segments": ids, "device_ops": c["device_ops"], "predicted": pred,
                     "device_memory": c["device_memory"], "optimal_for": c["optimal_for"]})  # fmt: skip
    doc = _plan_doc(plan, cloud, True)
    doc["default_cut"] = next(c["name"] for c in cands if c["on_device"] == plan.on_device)
    m = _manifest(imported, profile, entries, root, files, plan=doc, precision=precision, cuts=cuts)
    (root / mf.MANIFEST).write_text(m.dumps())
    return m, segs


def build_cloud_artifact(imported, cloud: TargetProfile, segs: list[tuple[SegmentModel, planner.PlanGraph]],
                         root: Path, tuning: tuning_log.TuningLog | None = None) -> mf.Manifest:  # fmt: skip
    """The cloud artifact: every segment a device artifact sends to the cloud, compiled for the
    cloud profile and kept as ONNX (servable by any engine), under its endpoint name and version."""
    files, entries = [], []
    for k, (seg, graph) in enumerate(sorted(segs, key=lambda sp: (sp[0].id, sp[0].version))):
        e = _segment_entry(dataclasses.replace(seg, placement="cloud"), graph)
        name = endpoint_name(imported.name, seg.id)
        onnx_rel = f"segments/{name}-{seg.version}.onnx"
        c = compile_segment(seg.imported, cloud, root, f"{name}-{seg.version}", tuning)
        (root / onnx_rel).write_bytes(seg.onnx_bytes)
        entries.append(dataclasses.replace(e, id=k, **_built(c), onnx=onnx_rel, endpoint=_endpoint(imported, seg),
                                           reason=seg.reason or None))  # fmt: skip
        files += c.files + [onnx_rel]
    m = _manifest(imported, cloud, entries, root, files, role="cloud")
    (root / mf.MANIFEST).write_text(m.dumps())
    return m


def _manifest(imported, profile: TargetProfile, segments: list[mf.Segment], root: Path, files: list[str],
              role: str = "device", plan: dict[str, Any] | None = None, precision: str = "fp32",
              cuts: list[dict[str, Any]] | None = None, decoder: dict[str, Any] | None = None) -> mf.Manifest:  # fmt: skip
    import tvm
    import tvm_ffi

    m = mf.Manifest(
        role=role,  # device: run the segments in order; cloud: serve each by its endpoint
        tool={"name": "tvm-hybrid", "version": __version__},
        versions={
            "tvm_hybrid": __version__,
            "tvm": tvm.__version__,
            "tvm_ffi": getattr(tvm_ffi, "__version__", ""),
            "onnx": onnx.__version__,
        },
        model={"name": imported.name, "sha256": imported.sha256, "opset": imported.opset},
        inputs=tuple(imported.inputs),
        outputs=tuple(imported.all_outputs) if role == "device" else tuple(imported.outputs),
        target=profile.to_dict(),
        segments=tuple(segments),
        files=tuple(mf.file_entry(root, rel) for rel in files),
        plan=plan,
        precision=precision,
        cuts=tuple(cuts or ()),
        decoder=decoder,
    )
    return mf.Manifest.from_dict(m.to_dict())  # the same checks a runtime makes when it loads it


def describe_plan(imported, graph: planner.PlanGraph, device: TargetProfile, cloud: TargetProfile | None,
                  settings: PlanSettings) -> dict[str, Any]:  # fmt: skip
    """The plan as `tvm-hybrid plan --json` prints it: segments (as in manifests), ops, latencies.
    ``imported`` is prepared for the device, ``graph`` its ``plan_graph``."""
    plan = solve_plan(graph, device, cloud, settings)
    segs = split(imported, graph, plan)
    segments = []
    for seg in segs:
        e = _segment_entry(seg, graph)
        if seg.placement == "cloud":
            e = dataclasses.replace(e, reason=seg.reason, endpoint=_endpoint(imported, seg))
        segments.append(e.to_dict())
    link = plan.options.link
    budget = settings.options(device).memory_bytes  # the device's, also when no cloud lifts it for the solve
    ops = [
        {
            "name": n.name,
            "op": n.op,
            "placement": "device" if on else "cloud",
            "reason": why,
            "device_ms": n.device_ms if n.device_ms != planner.INF else None,
            "cloud_ms": n.cloud_ms if n.cloud_ms != planner.INF else None,
            "flops": n.flops,
            "param_bytes": n.param_bytes,
            "output_bytes": sum(graph.tensor_bytes.get(t, 0) for t in n.outputs),
        }
        for n, on, why in zip(graph.nodes, plan.on_device, plan.reasons)
    ]
    return {
        "model": {"name": imported.name, "sha256": imported.sha256},
        "target": device.name,
        "cloud": cloud.name if cloud else None,
        "link": {"bandwidth_bps": link.bandwidth_bps, "rtt_ms": link.rtt_ms},
        "memory_budget": budget if budget != planner.INF else None,
        "keep_input_local": settings.keep_input_local,
        "max_crossings": settings.max_crossings,
        "segments": segments,
        "predicted": plan.cost.to_dict(),
        "baselines": {k: (v.to_dict() if v else None) for k, v in plan.baselines.items()},
        "device_memory": plan.device_memory,
        "ops": ops,
    }
