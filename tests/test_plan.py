"""The planner: its min-cut optimum equals exhaustive search on small graphs, and its constraints hold."""

from __future__ import annotations

import itertools
import random

import pytest

from tvm_hybrid.compiler.plan import (
    INF,
    Link,
    PlanGraph,
    PlanOptions,
    PNode,
    evaluate,
    feasible,
    parse_bandwidth,
    parse_duration_ms,
    parse_size,
    solve,
)
from tvm_hybrid.errors import UnsupportedError, UsageError


def random_dag(rng: random.Random, n: int, unsupported: float = 0.0) -> PlanGraph:
    """A random DAG: one or two model inputs, nodes with 1-3 inputs, 1-2 model outputs."""
    inputs = ["in0"] + (["in1"] if rng.random() < 0.3 else [])
    tensors = {t: rng.choice([1e3, 1e4, 1e5, 1e6]) for t in inputs}
    avail = list(inputs)
    nodes = []
    for i in range(n):
        ins = rng.sample(avail, k=min(len(avail), rng.randint(1, 3)))
        out = f"t{i}"
        tensors[out] = rng.choice([1e2, 1e3, 1e4, 1e5, 1e6, 4e6])
        dev = rng.uniform(0.1, 30.0)
        nodes.append(
            PNode(
                name=f"n{i}",
                op="Op",
                inputs=ins,
                outputs=[out],
                device_ms=INF if rng.random() < unsupported else dev,
                cloud_ms=dev * rng.uniform(0.02, 0.5),
                param_bytes=int(rng.choice([0, 1e4, 1e5, 1e6, 5e6])),
            )
        )
        avail.append(out)
    used = {t for nd in nodes for t in nd.inputs}
    outs = [nd.outputs[0] for nd in nodes if nd.outputs[0] not in used] or [nodes[-1].outputs[0]]
    return PlanGraph(nodes=nodes, tensor_bytes={k: int(v) for k, v in tensors.items()}, model_inputs=inputs,
                     model_outputs=outs[:2])  # fmt: skip


def exhaustive(g: PlanGraph, opts: PlanOptions):
    best = None
    for bits in itertools.product([True, False], repeat=len(g.nodes)):
        on = list(bits)
        if feasible(g, on, opts):
            c = evaluate(g, on, opts.link).total_ms
            if best is None or c < best:
                best = c
    return best


LINKS = [Link(parse_bandwidth(b), parse_duration_ms(r)) for b in ("1Mbps", "10Mbps", "100Mbps", "1Gbps")
         for r in ("5ms", "40ms")]  # fmt: skip


@pytest.mark.parametrize("seed", range(60))
def test_min_cut_equals_exhaustive_optimum(seed):
    rng = random.Random(seed)
    g = random_dag(rng, rng.randint(3, 11), unsupported=0.15 if seed % 3 == 0 else 0.0)
    opts = PlanOptions(link=rng.choice(LINKS), keep_input_local=seed % 2 == 0)
    want = exhaustive(g, opts)
    if want is None:
        with pytest.raises(UnsupportedError):
            solve(g, opts)
        return
    plan = solve(g, opts)
    assert feasible(g, plan.on_device, opts)
    assert plan.cost.total_ms == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_memory_budget_is_met(seed):
    """With a binding budget the plan fits; it is optimal in most cases (Lagrangian relaxation)."""
    rng = random.Random(1000 + seed)
    g = random_dag(rng, rng.randint(4, 10))
    opts = PlanOptions(link=rng.choice(LINKS), keep_input_local=False, memory_bytes=rng.choice([2e6, 5e6, 1e7]))
    want = exhaustive(g, opts)
    if want is None:
        with pytest.raises(UnsupportedError):
            solve(g, opts)
        return
    plan = solve(g, opts)
    assert feasible(g, plan.on_device, opts)
    assert plan.device_memory["total"] <= opts.memory_bytes
    assert plan.cost.total_ms >= want - 1e-9


def test_unsupported_node_goes_to_the_cloud_with_its_successors():
    g = PlanGraph(
        nodes=[
            PNode("a", "Conv", ["x"], ["ta"], 1.0, 0.1),
            PNode("b", "NonMaxSuppression", ["ta"], ["tb"], INF, 0.1),
            PNode("c", "Relu", ["tb"], ["tc"], 1.0, 0.1),
        ],
        tensor_bytes={"x": 1000, "ta": 1000, "tb": 1000, "tc": 1000},
        model_inputs=["x"],
        model_outputs=["tc"],
    )
    plan = solve(g, PlanOptions(link=Link(1e7, 40)))
    assert plan.on_device == [True, False, False]
    assert plan.reasons == [None, "unsupported-op", "latency"]
    assert plan.baselines["all-device"] is None


def test_input_stays_local_unless_lifted():
    g = PlanGraph(
        nodes=[PNode("a", "Det", ["x"], ["ta"], INF, 0.1)],
        tensor_bytes={"x": 1000, "ta": 4},
        model_inputs=["x"],
        model_outputs=["ta"],
    )
    with pytest.raises(UnsupportedError, match="--no-keep-input-local"):
        solve(g, PlanOptions(link=Link(1e7, 40)))
    plan = solve(g, PlanOptions(link=Link(1e7, 40), keep_input_local=False))
    assert plan.on_device == [False]


def test_units():
    assert parse_bandwidth("20Mbps") == 20e6 and parse_bandwidth("1 Gbit/s") == 1e9
    assert parse_duration_ms("40ms") == 40 and parse_duration_ms("0.5s") == 500
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(UsageError, match="20Mbps"):
        parse_bandwidth("fast")
