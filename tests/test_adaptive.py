"""compile --adaptive and the runtime's per-call cut: candidate cuts, shared device pieces, the
estimates and the choice (simulated links, deterministic), and a real artifact served on loopback."""

from __future__ import annotations

import json
import random
import time
import types

import numpy as np
import pytest

from conftest import Server, assert_close, cli, reference
from test_plan import random_dag
from tvm_hybrid.compiler.plan import (
    INF, Link, PlanOptions, candidate_cuts, evaluate, feasible, memory_use, pieces_of, solve,
)  # fmt: skip
from tvm_hybrid.errors import ArtifactError, RuntimeFailure, UnsupportedError, UsageError
from tvm_hybrid.runtime.adaptive import Chooser, Cut, Estimates

# --------------------------------------------------------------------------------------------
# Candidate cuts and pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_candidates_keep_the_constraints_and_pieces_rebuild_every_cut(seed):
    rng = random.Random(seed)
    g = random_dag(rng, rng.randint(4, 12), unsupported=0.1 if seed % 3 == 0 else 0.0)
    keep = seed % 2 == 0
    budget = memory_use(g, [True] * len(g.nodes))["total"] * 0.6 if seed % 4 == 1 else INF
    opts = PlanOptions(Link(20e6, 40.0), memory_bytes=budget, keep_input_local=keep)
    try:
        solve(g, opts)
    except UnsupportedError:  # no placement satisfies the constraints: neither is there a candidate
        with pytest.raises(UnsupportedError):
            candidate_cuts(g, opts)
        return
    cands = candidate_cuts(g, opts)
    assert any(c.on_device == solve(g, opts).on_device for c in cands), "the plan's own cut is a candidate"
    assert len({tuple(c.on_device) for c in cands}) == len(cands), "deduplicated"
    for c in cands:
        assert feasible(g, c.on_device, opts), "every candidate keeps input-local, memory and one crossing"
    ends = {tuple(c.on_device) for c in cands}
    if feasible(g, [True] * len(g.nodes), opts):
        assert tuple([True] * len(g.nodes)) in ends, "all-device is a candidate where feasible"
    if not keep and feasible(g, [False] * len(g.nodes), opts):
        assert tuple([False] * len(g.nodes)) in ends, "all-cloud is a candidate where the input may leave"
    pieces, per_cut = pieces_of([c.on_device for c in cands])
    where = {i: p for p, idx in enumerate(pieces) for i in idx}
    for c, ps in zip(cands, per_cut):
        assert sorted(i for p in ps for i in pieces[p]) == [i for i, d in enumerate(c.on_device) if d]
    prod = {t: i for i, n in enumerate(g.nodes) for t in n.outputs}
    for i, n in enumerate(g.nodes):  # running the pieces in order is topological
        for t in n.inputs:
            if t in prod and i in where and prod[t] in where:
                assert where[prod[t]] <= where[i]


def test_candidates_span_the_grid_on_a_shrinking_chain():
    """A chain whose tensors shrink and whose later nodes are heavy: a slow link keeps the heavy
    part on the device, a fast one sends the smallest boundary and computes in the cloud."""
    from tvm_hybrid.compiler.plan import PlanGraph, PNode

    sizes = {"x": 600_000, "a": 150_000, "b": 150_000, "c": 4000}
    nodes = [PNode("embed", "Conv", ["x"], ["a"], 1.0, 0.1), PNode("body", "MatMul", ["a"], ["b"], 60.0, 3.0),
             PNode("head", "Gemm", ["b"], ["c"], 1.0, 0.1)]  # fmt: skip
    g = PlanGraph(nodes, sizes, ["x"], ["c"])
    cands = candidate_cuts(g, PlanOptions(Link(20e6, 40.0), keep_input_local=False))
    got = [c.on_device for c in cands]
    assert [True, True, True] in got and [False, False, False] in got and [True, False, False] in got
    split = next(c for c in cands if c.on_device == [True, False, False])
    assert split.conditions and all(c["bandwidth_bps"] >= 5e6 for c in split.conditions)
    assert evaluate(g, split.on_device, Link(100e6, 10)).total_ms < evaluate(g, [True] * 3, Link(100e6, 10)).total_ms


# --------------------------------------------------------------------------------------------
# Estimates and choice, against a simulated world
# --------------------------------------------------------------------------------------------
#: Segments: 0 (patch embedding) and 1 (the body) on the device; 2 the body in the cloud, 3 all of it.
PREDICTED = {0: 1.0, 1: 20.0, 2: 2.0, 3: 2.2}
CUTS = [Cut("all-device", (0, 1), None, 0, 0), Cut("split", (0,), 2, 150_000, 4_000),
        Cut("all-cloud", (), 3, 600_000, 4_000)]  # fmt: skip
TRUE_DEVICE = {0: 1.5, 1: 60.0}  # the device is 3x slower than the planner thought
TRUE_CLOUD = {2: 5.0, 3: 5.5}


def fake_manifest(bw=20e6, rtt=40.0):
    segs = [types.SimpleNamespace(id=i, predicted={"ms": ms}) for i, ms in PREDICTED.items()]
    return types.SimpleNamespace(plan={"link": {"bandwidth_bps": bw, "rtt_ms": rtt}}, segments=segs)


def true_ms(cut: Cut, bw: float, rtt: float, queue: float = 0.0) -> float:
    dev = sum(TRUE_DEVICE[s] for s in cut.device)
    if cut.cloud is None:
        return dev
    return dev + rtt + 8e3 * (cut.bytes_up + cut.bytes_down) / bw + queue + TRUE_CLOUD[cut.cloud]


def best_cut(bw, rtt, queue=0.0) -> str:
    return min(CUTS, key=lambda c: true_ms(c, bw, rtt, queue)).name


class World:
    """Runs the chooser's picks against true costs and feeds it what a Session would measure."""

    def __init__(self, objective="latency"):
        self.est = Estimates(fake_manifest())
        self.chooser = Chooser(CUTS, self.est, objective)
        self.by_name = {c.name: c for c in CUTS}

    def call(self, bw, rtt, queue=0.0) -> str:
        d = self.chooser.choose(CUTS)
        cut = self.by_name[d.cut]
        n = self.chooser.calls
        for s in cut.device:
            self.est.observe_device(s, TRUE_DEVICE[s], n)
        if cut.cloud is not None:
            ms = rtt + 8e3 * (cut.bytes_up + cut.bytes_down) / bw + queue + TRUE_CLOUD[cut.cloud]
            self.est.observe_cloud(cut.cloud, ms, cut.bytes_up, cut.bytes_down, TRUE_CLOUD[cut.cloud], queue, n)
        return d.cut

    def ping(self, rtt, in_flight=0, workers=1) -> bool:
        return self.est.observe_ping(rtt, {"in_flight": in_flight, "workers": workers}, 0)


CONDITIONS = [(100e6, 10.0, 0.0), (1e6, 100.0, 0.0), (20e6, 10.0, 0.0), (100e6, 10.0, 200.0), (5e6, 100.0, 0.0),
              (100e6, 100.0, 0.0), (100e6, 10.0, 0.0)]  # fmt: skip


def test_the_choice_follows_the_conditions_within_five_calls():
    """Each change of link or load (as pings see it, once a second, between calls): within five
    calls the cut is the one whose true cost is within 10% of the best, and stays there."""
    w = World()
    for _ in range(5):  # first calls: one-time costs, then samples
        w.call(100e6, 10.0)
    for bw, rtt, queue in CONDITIONS:
        if queue:
            w.ping(rtt, in_flight=3, workers=1)
        else:
            w.ping(rtt, in_flight=0)
        picks = [w.call(bw, rtt, queue) for _ in range(30)]
        best = min(true_ms(c, bw, rtt, queue) for c in CUTS)
        good = {c.name for c in CUTS if true_ms(c, bw, rtt, queue) <= 1.1 * best}
        first = next(i for i, p in enumerate(picks) if p in good)
        assert first < 5, (bw, rtt, queue, picks)
        settled = picks[first:]
        assert sum(p not in good for p in settled) <= 2, (bw, rtt, queue, picks)  # exploration only


def test_bandwidth_and_rtt_are_told_apart_by_pings():
    w = World()
    w.ping(10.0)
    for _ in range(8):
        w.call(50e6, 10.0)
        w.ping(10.0)
    snap = w.est.snapshot()
    assert abs(snap["rtt_ms"] - 10.0) < 1.0
    assert 35 <= snap["bandwidth_mbps"] <= 70, snap


def test_objectives_weigh_different_costs():
    """Behind a 100 ms round trip the fastest answer is the device's own, while the device's
    busy time (energy: compute and radio, not the wait) is least with the split; the cloud's bill
    is least with nothing sent. Over a 5 ms round trip the split is fastest too."""
    for objective, rtt, want in (("latency", 100.0, "all-device"), ("energy", 100.0, "split"),
                                 ("cloud", 100.0, "all-device"), ("latency", 5.0, "split"),
                                 ("cloud", 5.0, "all-device")):  # fmt: skip
        w = World(objective)
        w.ping(rtt)
        picks = [w.call(1000e6, rtt) for _ in range(12)]
        assert picks[-3:] == [want] * 3, (objective, rtt, picks)
    with pytest.raises(UsageError):
        Chooser(CUTS, Estimates(fake_manifest()), "cheapest")


def test_unchosen_cuts_are_explored_now_and_then():
    """All-device stays best at 20 Mbps, the split is close: it is tried again, at growing intervals."""
    w = World()
    picks = [w.call(20e6, 10.0) for _ in range(200)]
    explored = [i for i, p in enumerate(picks) if p != "all-device"]
    assert 2 <= len(explored) <= 12, explored
    gaps = np.diff(explored[1:])
    assert all(b >= a for a, b in zip(gaps, gaps[1:])), explored


# --------------------------------------------------------------------------------------------
# A real adaptive artifact
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adaptive_vit(tmp_path_factory, zoo_files):
    """zoo vit_tiny compiled with --adaptive, the input allowed to leave: all-device, the patch
    embedding on the device, all-cloud."""
    z, path = zoo_files("vit_tiny")
    shapes = z.input_shapes
    out = tmp_path_factory.mktemp("adaptive")
    flags = [f"--input={k}:{'x'.join(map(str, v))}" for k, v in shapes.items()]
    r = cli("compile", str(path), "-t", "x86-64-avx2", *flags, "--adaptive", "--no-keep-input-local", "-o", str(out),
            "--json", check=True)  # fmt: skip
    summary = json.loads(r.stdout)
    assert [a["target"] for a in summary["artifacts"]] == ["x86-64-avx2", "cloud-x86"]
    return out, path, shapes


def _feeds(shapes):
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def test_adaptive_artifact_lists_cuts_over_shared_pieces(adaptive_vit):
    out, _, _ = adaptive_vit
    m = json.loads((out / "x86-64-avx2" / "manifest.json").read_text())
    names = [c["name"] for c in m["cuts"]]
    assert names[0] == "all-device" and names[-1] == "all-cloud" and len(names) >= 3, names
    segs = {s["id"]: s for s in m["segments"]}
    dev = [s for s in m["segments"] if s["placement"] == "device"]
    # The device nodes are built once: the pieces cover every node exactly once.
    covered = [n for s in dev for n in s["nodes"]]
    assert len(covered) == len(set(covered)) == m["cuts"][0]["device_ops"]
    for c in m["cuts"]:
        placements = [segs[i]["placement"] for i in c["segments"]]
        assert placements == sorted(placements, key=lambda p: p != "device")  # device pieces, then the cloud
        assert set(c["predicted"]) >= {"device_ms", "cloud_ms", "bytes_up", "bytes_down"}
    assert m["plan"]["default_cut"] in names
    cloud = json.loads((out / "cloud-x86" / "manifest.json").read_text())
    assert len(cloud["segments"]) == sum(1 for s in m["segments"] if s["placement"] == "cloud")


def test_every_cut_computes_the_model(adaptive_vit):
    from tvm_hybrid.runtime import Session

    out, path, shapes = adaptive_vit
    feeds = _feeds(shapes)
    want = reference(path, feeds)
    srv = Server([out / "cloud-x86"])
    try:
        with Session(out / "x86-64-avx2", cloud_url=srv.url, fallback="off") as s:
            assert s.cuts[0] == "all-device"
            for name in s.cuts:
                got = s.run(feeds, cut=name)
                assert_close(got, want, rtol=1e-4, atol=1e-4)
                assert {e["cut"] for e in s.trace} == {name}
                assert s.decision.cut == name and s.decision.why == "forced"
                assert ("cloud" in {e["placement"] for e in s.trace}) == (name != "all-device")
            with pytest.raises(UsageError, match="no cut 'nope'.*all-device"):
                s.run(feeds, cut="nope")
    finally:
        srv.stop()


def test_server_reports_its_time_and_load_and_the_session_learns(adaptive_vit):
    from tvm_hybrid.runtime import Session
    from tvm_hybrid.runtime.cloud import CloudClient, LinkShaper

    out, _, shapes = adaptive_vit
    feeds = _feeds(shapes)
    srv = Server([out / "cloud-x86"], None, "--workers", "2")
    try:
        m = json.loads((out / "cloud-x86" / "manifest.json").read_text())
        seg = max(m["segments"], key=lambda s: len(s["nodes"]))  # all-cloud: reads the model input
        c = CloudClient(srv.url)
        c.infer(seg["endpoint"]["model"], seg["endpoint"]["version"], feeds)
        ex = c.last_exchange
        assert ex.compute_ms is not None and 0 < ex.compute_ms < ex.ms and ex.queue_ms >= 0
        assert ex.bytes_up > sum(a.nbytes for a in feeds.values())
        rtt, load = c.ping()
        assert rtt > 0 and load == {"in_flight": 0, "workers": 2}
        c.close()
        # Over a slow link with a long round trip, the device computes everything.
        with Session(out / "x86-64-avx2", cloud_url=srv.url, link=LinkShaper(0.5e6, 80.0), probe_interval=0.2) as s:
            picks = []
            for i in range(12):
                if i == 4:
                    time.sleep(0.8)  # the prober pings meanwhile
                s.run(feeds)
                picks.append(s.decision.cut)
            assert picks[-1] == "all-device" and picks[-3:].count("all-device") == 3, picks
            d = s.decision.to_dict()
            assert set(d["predicted_ms"]) == set(s.cuts) and d["objective"] == "latency"
            assert d["estimates"]["rtt_ms"] >= 60, d  # the pings saw the shaped round trip
    finally:
        srv.stop()


def test_a_failed_cloud_half_finishes_on_the_device(adaptive_vit):
    from tvm_hybrid.runtime import Session

    out, path, shapes = adaptive_vit
    feeds = _feeds(shapes)
    want = reference(path, feeds)
    srv = Server([out / "cloud-x86"])
    split = [c for c in json.loads((out / "x86-64-avx2" / "manifest.json").read_text())["cuts"]
             if c["name"] not in ("all-device", "all-cloud")][0]["name"]  # fmt: skip
    try:
        with Session(out / "x86-64-avx2", cloud_url=srv.url, timeout=3, cut=split, probe_interval=0) as s:
            s.run(feeds)
            srv.kill()
            got = s.run(feeds)
            assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert [e["placement"] for e in s.trace] == ["device", "device"] and s.trace[-1]["fallback"]
        with Session(out / "x86-64-avx2", cloud_url=srv.url, timeout=2, cut=split, fallback="off", probe_interval=0) as s:
            with pytest.raises(RuntimeFailure):
                s.run(feeds)
        # Choosing freely with the cloud gone: once the circuit breaker opens, only all-device runs.
        with Session(out / "x86-64-avx2", cloud_url=srv.url, timeout=2, objective="energy", probe_interval=0) as s:
            for _ in range(6):
                assert_close(s.run(feeds), want, rtol=1e-4, atol=1e-4)
            assert s.decision.cut == "all-device" and all(e["placement"] == "device" for e in s.trace)
    finally:
        srv.stop()
    with Session(out / "x86-64-avx2") as s:  # no cloud configured: the cuts without one
        s.run(feeds)
        assert s.decision.cut == "all-device" and s.decision.why == "no cloud"


def test_broken_cuts_are_refused(adaptive_vit):
    from tvm_hybrid.manifest import Manifest

    out, _, _ = adaptive_vit
    good = json.loads((out / "x86-64-avx2" / "manifest.json").read_text())
    Manifest.from_dict(good)
    cloud_id = next(s["id"] for s in good["segments"] if s["placement"] == "cloud")
    dev_ids = [s["id"] for s in good["segments"] if s["placement"] == "device"]
    for change, msg in [
        (lambda m: m["cuts"][0]["segments"].append(99), "does not list"),
        (lambda m: m["cuts"][0]["segments"].pop(), "produces the output"),
        (lambda m: m["cuts"][0].__setitem__("segments", [cloud_id, *dev_ids]), "comes after its cloud segment|reads"),
        (lambda m: m["cuts"][1].__setitem__("name", m["cuts"][0]["name"]), "used twice"),
        (lambda m: m["cuts"][0].pop("predicted"), "predicted"),
        (lambda m: m["plan"].__setitem__("default_cut", "elsewhere"), "names no cut"),
    ]:
        m = json.loads(json.dumps(good))
        change(m)
        with pytest.raises(ArtifactError, match=msg):
            Manifest.from_dict(m)


def test_cli_adaptive_flags(adaptive_vit, tmp_path):
    out, path, shapes = adaptive_vit
    x = tmp_path / "x.npy"
    np.save(x, _feeds(shapes)[next(iter(shapes))])
    r = cli("run", str(out / "x86-64-avx2"), "--input", str(x), "--cut", "all-device", "--json", check=True)
    doc = json.loads(r.stdout)
    assert doc["cut"]["cut"] == "all-device" and doc["cut"]["why"] == "forced" and doc["cuts_run"] == ["all-device"]
    r = cli("run", str(out / "x86-64-avx2"), "--input", str(x), "--cut", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "all-device" in r.stderr
    r = cli("compile", str(path), "-t", "x86-64-avx2", "--adaptive", "--cloud", "none", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "needs a cloud" in r.stderr and not (tmp_path / "o").exists()
