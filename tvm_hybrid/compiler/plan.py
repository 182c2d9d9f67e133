"""Device/cloud placement: minimum predicted end-to-end latency by s-t min-cut (as in DADS).

Every node runs either on the device (source side S) or in the cloud (sink side T). The cut's
capacity is exactly the predicted latency without the round trip:

    sum(device ms of S) + sum(cloud ms of T) + sum(bytes of tensors crossing S→T) / bandwidth
    + bytes of model outputs computed in T (they come back) / bandwidth

and infinite edges encode the constraints: a node the device cannot run stays out of S; with one
crossing (a device prefix, a cloud suffix) no edge may run from T back to S; a node that reads the
model's input stays in S when the input must stay local. A tensor read by several cloud nodes is
sent once (one auxiliary vertex per tensor). The round trip is a constant paid once when T is not
empty, so the optimum is the better of the min-cut plus RTT and all-device.

The device memory budget (weights + peak activations) is not a cut constraint (it is a knapsack
over an order ideal, NP-hard in general); it is met by Lagrangian relaxation: each node's device
cost grows by λ per byte it keeps on the device, λ searched until the plan fits. Plans are exact
when the budget does not bind, and feasible when it does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import sys
from typing import Any

from ..errors import UnsupportedError, UsageError

INF = float("inf")


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------
_RATE = {"bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "bit/s": 1, "kbit/s": 1e3, "mbit/s": 1e6, "gbit/s": 1e9}
_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse(text: str | float | int, table: dict[str, float], what: str, example: str) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z/]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in table:
        raise UsageError(f"bad {what} {text!r}: expected a number with a unit, e.g. {example} ({', '.join(table)})")
    return float(m.group(1)) * table[unit]


def parse_bandwidth(text) -> float:
    """'20Mbps' → bits per second."""
    return _parse(text, _RATE, "bandwidth", "20Mbps")


def parse_duration_ms(text) -> float:
    """'40ms' → milliseconds."""
    return _parse(text, _TIME, "duration", "40ms")


def parse_size(text) -> float:
    """'512MiB' → bytes."""
    return _parse(text, _SIZE, "size", "512MiB")


# --------------------------------------------------------------------------------------------
# The abstract graph the planner works on
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PNode:
    name: str
    op: str
    inputs: list[str]  # tensor names (model inputs or other nodes' outputs; weights excluded)
    outputs: list[str]
    device_ms: float  # INF when the device cannot run it
    cloud_ms: float  # INF when the cloud cannot run it either
    param_bytes: int = 0
    flops: int = 0


@dataclasses.dataclass
class PlanGraph:
    nodes: list[PNode]  # in a topological order
    tensor_bytes: dict[str, int]
    model_inputs: list[str]
    model_outputs: list[str]
    #: Tensors the kernels never write to memory (device memory counts them 0; a cut there
    #: still sends their bytes): dequantized weights and fake-quantization pairs' intermediates.
    fused: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth_bps: float
    rtt_ms: float

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes * 8 / self.bandwidth_bps * 1e3


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    link: Link
    memory_bytes: float = INF
    keep_input_local: bool = True
    max_crossings: int = 1


@dataclasses.dataclass
class Cost:
    device_ms: float
    cloud_ms: float
    transfer_ms: float
    rtt_ms: float
    bytes_up: int
    bytes_down: int

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.cloud_ms + self.transfer_ms + self.rtt_ms

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_ms"] = self.total_ms
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()}


@dataclasses.dataclass
class Plan:
    on_device: list[bool]  # per node
    reasons: list[str | None]  # per cloud node: unsupported-op, memory, latency
    cost: Cost
    device_memory: dict[str, int]
    baselines: dict[str, Cost | None]  # all-device, all-cloud (None when infeasible)
    options: PlanOptions | None = None  # what it was solved under (link, budget, constraints)


# --------------------------------------------------------------------------------------------
# Evaluation: the objective the planner minimizes, written out directly
# --------------------------------------------------------------------------------------------
def producers(g: PlanGraph) -> dict[str, int]:
    return {t: i for i, n in enumerate(g.nodes) for t in n.outputs}


def evaluate(g: PlanGraph, on_device: list[bool], link: Link) -> Cost:
    """Predicted latency of a placement: compute on each side, tensors crossing, one RTT per crossing."""
    prod = producers(g)
    dev = sum(n.device_ms for n, d in zip(g.nodes, on_device) if d)
    cloud = sum(n.cloud_ms for n, d in zip(g.nodes, on_device) if not d)
    up = down = 0
    sent_up, sent_down = set(), set()
    for n, d in zip(g.nodes, on_device):
        for t in dict.fromkeys(n.inputs):
            src_dev = on_device[prod[t]] if t in prod else True  # model inputs live on the device
            if src_dev and not d and t not in sent_up:
                up += g.tensor_bytes[t]
                sent_up.add(t)
            elif not src_dev and d and t not in sent_down:
                down += g.tensor_bytes[t]
                sent_down.add(t)
    for t in g.model_outputs:
        if t in prod and not on_device[prod[t]] and t not in sent_down:
            down += g.tensor_bytes[t]
            sent_down.add(t)
    crossings = count_crossings(g, on_device)
    return Cost(
        device_ms=dev,
        cloud_ms=cloud,
        transfer_ms=link.transfer_ms(up + down),
        rtt_ms=link.rtt_ms * crossings,
        bytes_up=up,
        bytes_down=down,
    )


def count_crossings(g: PlanGraph, on_device: list[bool]) -> int:
    """Round trips to the cloud: the number of cloud segments when run in order."""
    if all(on_device):
        return 0
    segs = segments_in_order(g, on_device)
    return sum(1 for placement, _ in segs if placement == "cloud")


def feasible(g: PlanGraph, on_device: list[bool], opts: PlanOptions) -> bool:
    prod = producers(g)
    for n, d in zip(g.nodes, on_device):
        if d and n.device_ms == INF or not d and n.cloud_ms == INF:
            return False
        if opts.keep_input_local and not d and any(t in g.model_inputs for t in n.inputs):
            return False
        if opts.max_crossings == 1 and d and any(t in prod and not on_device[prod[t]] for t in n.inputs):
            return False
    if count_crossings(g, on_device) > opts.max_crossings:
        return False
    return memory_use(g, on_device)["total"] <= opts.memory_bytes


def memory_use(g: PlanGraph, on_device: list[bool]) -> dict[str, int]:
    """Device memory: weights of device nodes + peak of live device tensors in execution order."""
    weights = sum(n.param_bytes for n, d in zip(g.nodes, on_device) if d)
    last_use: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for t in n.inputs:
            last_use[t] = i
    for t in g.model_outputs:
        last_use[t] = len(g.nodes)
    live: dict[str, int] = {t: g.tensor_bytes[t] for t in g.model_inputs}
    peak = sum(live.values())
    for i, (n, d) in enumerate(zip(g.nodes, on_device)):
        if d:
            for t in n.outputs:
                live[t] = 0 if t in g.fused else g.tensor_bytes.get(t, 0)
            peak = max(peak, sum(live.values()))
        for t in list(live):
            if last_use.get(t, -1) <= i and t not in g.model_inputs:
                del live[t]
    return {"weights": weights, "activations": peak, "total": weights + peak}


def segments_in_order(g: PlanGraph, on_device: list[bool]) -> list[tuple[str, list[int]]]:
    """Group nodes into maximal runs of one placement, in a topological order that keeps
    each placement's nodes together where the dependencies allow."""
    n = len(g.nodes)
    prod = producers(g)
    deps = [{prod[t] for t in node.inputs if t in prod} for node in g.nodes]
    users = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for j in ds:
            users[j].append(i)
    indeg = [len(d) for d in deps]
    ready = {True: collections.deque(), False: collections.deque()}
    for i in range(n):
        if indeg[i] == 0:
            ready[on_device[i]].append(i)
    segs: list[tuple[str, list[int]]] = []
    side = True
    while ready[True] or ready[False]:
        if not ready[side]:
            side = not side
        run = []
        while ready[side]:
            i = ready[side].popleft()
            run.append(i)
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready[on_device[u]].append(u)
        segs.append(("device" if side else "cloud", sorted(run)))
    return segs


# --------------------------------------------------------------------------------------------
# Solving: min-cut
# --------------------------------------------------------------------------------------------
class _MaxFlow:
    """Dinic's algorithm on float capacities."""

    def __init__(self, n: int):
        self.n = n
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def add(self, u: int, v: int, c: float) -> None:
        if c <= 0:
            return
        self.adj[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(c)
        self.adj[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)

    def source_side(self, s: int, t: int) -> list[bool]:
        eps = 1e-12
        # Augmenting paths are as long as the graph is deep (hundreds of layers).
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * self.n + 1000))
        while True:
            level = [-1] * self.n
            level[s] = 0
            q = collections.deque([s])
            while q:
                u = q.popleft()
                for e in self.adj[u]:
                    if self.cap[e] > eps and level[self.to[e]] < 0:
                        level[self.to[e]] = level[u] + 1
                        q.append(self.to[e])
            if level[t] < 0:
                break
            it = [0] * self.n

            def dfs(u: int, f: float) -> float:
                if u == t:
                    return f
                while it[u] < len(self.adj[u]):
                    e = self.adj[u][it[u]]
                    v = self.to[e]
                    if self.cap[e] > eps and level[v] == level[u] + 1:
                        got = dfs(v, min(f, self.cap[e]))
                        if got > eps:
                            self.cap[e] -= got
                            self.cap[e ^ 1] += got
                            return got
                    it[u] += 1
                return 0.0

            while True:
                f = dfs(s, INF)
                if f <= eps:
                    break
                if f == INF:  # an infinite path: the constraints cannot all hold
                    raise _Infeasible()
        seen = [False] * self.n
        seen[s] = True
        q = collections.deque([s])
        while q:
            u = q.popleft()
            for e in self.adj[u]:
                if self.cap[e] > eps and not seen[self.to[e]]:
                    seen[self.to[e]] = True
                    q.append(self.to[e])
        return seen


class _Infeasible(Exception):
    pass


def _min_cut(g: PlanGraph, opts: PlanOptions, lam: float) -> list[bool]:
    """The placement minimizing the cut objective (+ λ·device bytes); see the module docstring."""
    n = len(g.nodes)
    prod = producers(g)
    consumers: dict[str, list[int]] = collections.defaultdict(list)
    for i, node in enumerate(g.nodes):
        for t in dict.fromkeys(node.inputs):
            consumers[t].append(i)
    tensors = [t for t in consumers]
    S, T = n, n + 1
    aux = {t: n + 2 + k for k, t in enumerate(tensors)}
    mf = _MaxFlow(n + 2 + len(tensors))
    link = opts.link
    outs = set(g.model_outputs)
    for i, node in enumerate(g.nodes):
        ret = link.transfer_ms(sum(g.tensor_bytes[t] for t in node.outputs if t in outs))
        cloud = node.cloud_ms + ret
        dev = node.device_ms + lam * (node.param_bytes + sum(g.tensor_bytes.get(t, 0) for t in node.outputs))
        pinned_local = opts.keep_input_local and any(t in g.model_inputs for t in node.inputs)
        mf.add(S, i, INF if pinned_local else cloud)  # cut when i is in the cloud
        mf.add(i, T, dev)  # cut when i is on the device
    for t in tensors:
        src = prod.get(t, S)  # model inputs are produced on the device
        mf.add(src, aux[t], link.transfer_ms(g.tensor_bytes[t]))
        for c in consumers[t]:
            mf.add(aux[t], c, INF)
            if opts.max_crossings == 1 and src != S:
                mf.add(c, src, INF)  # no edge from the cloud back to the device
    side = mf.source_side(S, T)
    return side[:n]


def solve(g: PlanGraph, opts: PlanOptions, fit_iters: int = 40) -> Plan:
    """Minimum predicted latency placement under the options' constraints (``fit_iters``: steps
    of the search for the memory budget's multiplier, where it binds)."""
    if opts.max_crossings != 1:
        raise UsageError(
            f"--max-crossings {opts.max_crossings} is not supported yet; plans have one crossing "
            "(a device prefix, a cloud suffix)"
        )
    all_dev = [True] * len(g.nodes)
    all_cloud = [False] * len(g.nodes)
    baselines = {
        "all-device": evaluate(g, all_dev, opts.link) if feasible(g, all_dev, opts) else None,
        "all-cloud": evaluate(g, all_cloud, opts.link)
        if feasible(g, all_cloud, dataclasses.replace(opts, keep_input_local=False, memory_bytes=INF))
        else None,
    }
    try:
        best = _min_cut(g, opts, 0.0)
    except _Infeasible:
        raise UnsupportedError(_infeasible_reason(g, opts)) from None
    unconstrained = list(best)
    if memory_use(g, best)["total"] > opts.memory_bytes:
        best = _fit_memory(g, opts, fit_iters)
    candidates = [best]
    if baselines["all-device"] is not None:
        candidates.append(all_dev)
    best = min(
        (c for c in candidates if feasible(g, c, opts)),
        key=lambda c: (evaluate(g, c, opts.link).total_ms, -sum(c)),
        default=None,
    )
    if best is None:
        raise UnsupportedError(_infeasible_reason(g, opts))
    reasons: list[str | None] = []
    for i, node in enumerate(g.nodes):
        if best[i]:
            reasons.append(None)
        elif node.device_ms == INF:
            reasons.append("unsupported-op")
        elif unconstrained[i]:
            reasons.append("memory")
        else:
            reasons.append("latency")
    return Plan(best, reasons, evaluate(g, best, opts.link), memory_use(g, best), baselines, opts)


def _fit_memory(g: PlanGraph, opts: PlanOptions, iters: int = 40) -> list[bool]:
    """Smallest λ (ms per byte kept on the device) whose min-cut fits the memory budget."""
    lo, hi = 0.0, 1e-9
    while True:
        cand = _min_cut(g, opts, hi)
        if memory_use(g, cand)["total"] <= opts.memory_bytes:
            break
        if hi > 1e6:
            raise UnsupportedError(
                f"no placement fits the device memory budget of {opts.memory_bytes / 2**20:.0f} MiB, even with "
                "everything possible in the cloud (the nodes that read the input stay local; "
                "--no-keep-input-local lifts that, or raise --memory)"
            )
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = (lo + hi) / 2
        c = _min_cut(g, opts, mid)
        if memory_use(g, c)["total"] <= opts.memory_bytes:
            hi, cand = mid, c
        else:
            lo = mid
    return cand


def _infeasible_reason(g: PlanGraph, opts: PlanOptions) -> str:
    both = sorted({n.op for n in g.nodes if n.device_ms == INF and n.cloud_ms == INF})
    if both:
        return f"unsupported ops on the device and in the cloud: {', '.join(both)}"
    local = [n for n in g.nodes if n.device_ms == INF and any(t in g.model_inputs for t in n.inputs)]
    if opts.keep_input_local and local:
        return (
            f"{local[0].op} node {local[0].name} reads the model's input but the device cannot run it; "
            "pass --no-keep-input-local to let the cloud read the input"
        )
    return "no placement satisfies the constraints (device support, memory, crossings)"


# --------------------------------------------------------------------------------------------
# From an imported ONNX model and two target profiles
# --------------------------------------------------------------------------------------------
def graph_from_model(imported, device, cloud) -> PlanGraph:
    """The planner's graph: per-node roofline times on both profiles, tensor sizes, support."""
    from . import analysis

    infos = analysis.analyze(imported, device)
    cloud_infos = analysis.analyze(imported, cloud) if cloud is not None else None
    model = imported.model
    inits = {t.name for t in model.graph.initializer}
    sizes = analysis.tensor_bytes(imported)
    nodes = []
    for k, info in enumerate(infos):
        moved = info.param_bytes + info.activation_bytes + sum(sizes.get(t, 0) for t in info.inputs if t not in inits)
        dev_ms = analysis.predicted_ms(info.flops, moved, device) if info.supported else INF
        if cloud_infos is not None and cloud_infos[k].supported:
            cloud_ms = analysis.predicted_ms(info.flops, moved, cloud)
        else:
            cloud_ms = INF
        nodes.append(
            PNode(
                name=info.name,
                op=info.op_type,
                inputs=[t for t in info.inputs if t not in inits],
                outputs=list(info.outputs),
                device_ms=dev_ms,
                cloud_ms=cloud_ms,
                param_bytes=info.param_bytes,
                flops=info.flops,
            )
        )
    return PlanGraph(
        nodes=nodes,
        tensor_bytes=sizes,
        model_inputs=[t.name for t in imported.inputs],
        model_outputs=[t.name for t in imported.outputs],
        fused=_fused_tensors(model, inits),
    )


def _fused_tensors(model, inits: set[str]) -> frozenset[str]:
    """What a compiled QDQ model never materializes: a weight's DequantizeLinear output (read
    from the int8 or folded constant by the kernel that uses it), and around a QuantizeLinear
    that only DequantizeLinears read (fake quantization of an activation, fused into the epilogue
    of the kernel before it) its output and, when it is the only reader, its input."""
    from . import analysis

    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in model.graph.output}
    fused = set()
    for n in model.graph.node:
        if analysis.dequantizes_initializer(n, inits):
            fused.update(o for o in n.output if o not in outputs)
        elif n.op_type == "QuantizeLinear" and n.output and n.output[0] not in outputs:
            users = consumers.get(n.output[0], [])
            if users and all(u.op_type == "DequantizeLinear" for u in users):
                fused.add(n.output[0])
                x = n.input[0]
                if len(consumers.get(x, [])) == 1 and x not in outputs and x not in inits:
                    fused.add(x)
    return frozenset(fused)


# --------------------------------------------------------------------------------------------
# Candidate cuts for the runtime to choose from (compile --adaptive)
# --------------------------------------------------------------------------------------------
#: The conditions the planner solves for: link bandwidth (bits/s), and the speed of each side (a
#: factor on the profile's roofline compute: devices run below their roofline, clouds are loaded
#: or faster than profiled). The round trip is paid once by every cut that uses the cloud, so it
#: decides cloud or not, never which cut: the grid solves with none (the best cut that uses the
#: cloud), and all-device is a candidate of its own. Where the memory budget binds, each solve
#: searches a Lagrange multiplier, and the grid is coarser (GRID_*_FIT).
GRID_BANDWIDTHS = tuple(r * 1e6 for r in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
GRID_DEVICE_SPEEDS = (0.1, 0.3, 1.0)
GRID_CLOUD_SPEEDS = (0.1, 0.3, 1.0, 3.0)
GRID_BANDWIDTHS_FIT = tuple(r * 1e6 for r in (0.5, 2, 10, 50, 200, 1000))
GRID_SPEEDS_FIT = (0.3, 1.0)


@dataclasses.dataclass
class Candidate:
    """A cut: which nodes run on the device, and the grid conditions under which it is optimal."""

    on_device: list[bool]
    conditions: list[dict[str, float]]


def candidate_cuts(g: PlanGraph, opts: PlanOptions, max_cuts: int = 6) -> list[Candidate]:
    """The planner's optimal placements over a grid of bandwidths and device and cloud speeds,
    deduplicated, plus the plan for the options' own link, and all-device and all-cloud where
    they are feasible (all-cloud: where the input may leave the device); each keeps the options'
    constraints (the input stays local unless allowed, the memory budget, one crossing). At most
    ``max_cuts`` (3 or more): those optimal under the most conditions, the plan's own and the two
    ends always among them. Sorted from most on the device to least. UnsupportedError where no
    placement is feasible."""
    own = solve(g, opts).on_device  # the plan for the options' own link (UnsupportedError: none is feasible)
    found: dict[tuple[bool, ...], Candidate] = {tuple(own): Candidate(own, [])}
    binds = memory_use(g, [True] * len(g.nodes))["total"] > opts.memory_bytes
    speeds = (GRID_SPEEDS_FIT, GRID_SPEEDS_FIT) if binds else (GRID_DEVICE_SPEEDS, GRID_CLOUD_SPEEDS)
    for dev_speed in speeds[0]:
        for speed in speeds[1]:
            nodes = [dataclasses.replace(n, device_ms=n.device_ms / dev_speed, cloud_ms=n.cloud_ms / speed) for n in g.nodes]
            scaled = dataclasses.replace(g, nodes=nodes)
            for bw in GRID_BANDWIDTHS_FIT if binds else GRID_BANDWIDTHS:
                try:
                    plan = solve(scaled, dataclasses.replace(opts, link=Link(bw, 0.0)), fit_iters=12)
                except UnsupportedError:
                    continue
                c = found.setdefault(tuple(plan.on_device), Candidate(list(plan.on_device), []))
                c.conditions.append({"bandwidth_bps": bw, "device_speed": dev_speed, "cloud_speed": speed})
    ends = [[True] * len(g.nodes), [False] * len(g.nodes)]
    for cut in ends:
        if feasible(g, cut, opts):
            found.setdefault(tuple(cut), Candidate(cut, []))
    first = (*ends, own)
    keep = sorted(found.values(), key=lambda c: (c.on_device not in first, -len(c.conditions)))[:max(max_cuts, 3)]
    return sorted(keep, key=lambda c: -sum(c.on_device))


def pieces_of(cuts: list[list[bool]]) -> tuple[list[list[int]], list[list[int]]]:
    """Device pieces shared by the cuts (each ``on_device`` per node): the nodes grouped by which
    cuts run them on the device.

    Returns (pieces, per cut the indices of its pieces). A cut's device nodes are the union of its
    pieces, and running every piece in the order given is topological: if u feeds v, every cut that
    runs v on the device runs u there too (one crossing), so v's set of cuts is a subset of u's,
    and pieces are ordered by how many cuts run them, most first. Nodes no cut runs on the device
    are in no piece."""
    if not cuts:
        return [], []
    groups: dict[frozenset[int], list[int]] = {}
    for i in range(len(cuts[0])):
        member = frozenset(k for k, on_device in enumerate(cuts) if on_device[i])
        if member:
            groups.setdefault(member, []).append(i)
    order = sorted(groups, key=lambda s: (-len(s), groups[s][0]))
    pieces = [groups[s] for s in order]
    per_cut = [[p for p, s in enumerate(order) if k in s] for k in range(len(cuts))]
    return pieces, per_cut
