"""Choosing a cut per call (artifacts compiled with ``--adaptive``), from what the Session measures.

An adaptive artifact carries candidate cuts: device pieces run here, then (for all but
all-device) one cloud suffix. Before each call the Session predicts every cut's cost from its
estimates and runs the cheapest by the objective:

    latency  device ms + RTT + bytes / bandwidth + cloud queue + cloud compute   (default)
    energy   device ms + bytes / bandwidth     (the device's busy time: compute and radio)
    cloud    cloud compute ms                  (the cloud's bill; latency breaks ties)

The estimates start from the planner's (the manifest's per-segment predictions and the link it
planned for) and follow measurements: each device piece's ms; per cloud request, the server's
compute and queue ms (``tvm-hybrid serve`` reports them in response headers) and, what remains of
the wall time, the link — a round trip plus bytes / bandwidth; a prober thread pings
``/v2/health/ready`` now and then for the round trip and the server's load. Unmeasured segments
are predicted from the planner's ms times the measured/predicted ratio of their side. A changed
round trip or load is taken as changed conditions: the bandwidth estimate becomes optimistic again
(the best this session has seen), so the next call tries the cloud and measures it. Every
``explore_every`` calls (doubling each time, up to ``explore_max``; back to ``explore_every``
and at once when conditions change) the runner-up is run once when its prediction is within
``explore_margin`` of the best and it has not been measured since: estimates of cuts not taken
would otherwise never recover.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any

import numpy as np

from ..errors import UsageError
from ..manifest import Manifest

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "energy", "cloud")


@dataclasses.dataclass(frozen=True)
class Cut:
    """A candidate cut: device segments run in order, then at most one cloud segment."""

    name: str
    device: tuple[int, ...]
    cloud: int | None
    bytes_up: int
    bytes_down: int

    @property
    def segments(self) -> tuple[int, ...]:
        return self.device + ((self.cloud,) if self.cloud is not None else ())


def cuts_of(manifest: Manifest) -> list[Cut]:
    segs = {s.id: s for s in manifest.segments}

    def nbytes(specs) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize for t in specs)

    out = []
    for c in manifest.cuts:
        ids = list(c["segments"])
        cloud = ids[-1] if ids and segs[ids[-1]].placement == "cloud" else None
        dev = tuple(i for i in ids if i != cloud)
        cs = segs.get(cloud)
        out.append(Cut(c["name"], dev, cloud, nbytes(cs.inputs) if cs else 0, nbytes(cs.outputs) if cs else 0))
    return out


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else old + alpha * (new - old)


class Estimates:
    """What the Session believes about the device, the link and the cloud (thread-safe)."""

    def __init__(self, manifest: Manifest, alpha: float = 0.3):
        link = (manifest.plan or {}).get("link") or {}
        self.alpha = alpha
        self.rtt_ms: float = float(link.get("rtt_ms", 40.0))
        self.bandwidth_bps: float = float(link.get("bandwidth_bps", 20e6))
        self.best_bandwidth_bps = self.bandwidth_bps  # the optimistic guess after a change
        self.queue_ms = 0.0
        self.predicted = {s.id: float((s.predicted or {}).get("ms", 0.0)) for s in manifest.segments}
        self.device_ms: dict[int, float] = {}
        self.cloud_ms: dict[int, float] = {}
        self.cloud_min: dict[int, float] = {}
        self.ratio = {"device": None, "cloud": None}  # measured / planner's ms, per side
        self.seen: dict[int, int] = {}  # segment id → the call it was last measured in
        self.changes = 0  # conditions seen to change (round trip or load), for the chooser
        self.loaded = False
        self._lock = threading.Lock()

    # ---- reading
    def segment_ms(self, sid: int, side: str) -> float:
        table = self.device_ms if side == "device" else self.cloud_ms
        if sid in table:
            return table[sid]
        return self.predicted.get(sid, 0.0) * (self.ratio[side] or 1.0)

    def predict(self, cut: Cut) -> dict[str, float]:
        with self._lock:
            dev = sum(self.segment_ms(s, "device") for s in cut.device)
            if cut.cloud is None:
                return {"device_ms": dev, "transfer_ms": 0.0, "rtt_ms": 0.0, "queue_ms": 0.0, "cloud_ms": 0.0,
                        "total_ms": dev}  # fmt: skip
            transfer = 8e3 * (cut.bytes_up + cut.bytes_down) / self.bandwidth_bps
            cloud = self.segment_ms(cut.cloud, "cloud")
            total = dev + self.rtt_ms + transfer + self.queue_ms + cloud
            return {"device_ms": dev, "transfer_ms": transfer, "rtt_ms": self.rtt_ms, "queue_ms": self.queue_ms,
                    "cloud_ms": cloud, "total_ms": total}  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"bandwidth_mbps": round(self.bandwidth_bps / 1e6, 3), "rtt_ms": round(self.rtt_ms, 3),
                    "cloud_queue_ms": round(self.queue_ms, 3),
                    "device_ratio": round(self.ratio["device"], 3) if self.ratio["device"] else None,
                    "cloud_ratio": round(self.ratio["cloud"], 3) if self.ratio["cloud"] else None}  # fmt: skip

    # ---- learning
    def observe_device(self, sid: int, ms: float, call: int) -> None:
        with self._lock:
            first = sid not in self.seen
            self.seen[sid] = call
            if first:  # a first call pays one-time costs (loading, allocation): not a sample
                return
            self.device_ms[sid] = _ewma(self.device_ms.get(sid), ms, self.alpha)
            self._ratio("device", sid, ms)

    def observe_cloud(self, sid: int, ms: float, bytes_up: int, bytes_down: int, compute_ms: float | None,
                      queue_ms: float | None, call: int) -> None:  # fmt: skip
        """One cloud request: its wall ms, bytes, and the server's compute and queue ms (None where
        the server does not say: then the link is what is left after the estimated compute)."""
        with self._lock:
            first = sid not in self.seen
            self.seen[sid] = call
            if compute_ms is not None and not first:
                self.cloud_ms[sid] = _ewma(self.cloud_ms.get(sid), compute_ms, self.alpha)
                self.cloud_min[sid] = min(self.cloud_min.get(sid, compute_ms), compute_ms)
                self._ratio("cloud", sid, compute_ms)
                self.queue_ms = _ewma(self.queue_ms, queue_ms or 0.0, 0.5)
            elif compute_ms is None:
                compute_ms = self.segment_ms(sid, "cloud")
            net = ms - compute_ms - (queue_ms or 0.0)
            nbytes = bytes_up + bytes_down
            transfer = net - self.rtt_ms
            if nbytes and transfer > 0.25 * net:  # the link's time is mostly the bytes: a bandwidth sample
                self._bandwidth(8e3 * nbytes / transfer)
            else:  # mostly the round trip: an RTT sample, and the bandwidth is at least this
                expected = 8e3 * nbytes / self.bandwidth_bps
                self.rtt_ms = max(0.0, _ewma(self.rtt_ms, net - min(expected, 0.25 * net), 0.5))
                if nbytes and net > 0:
                    self._bandwidth(max(self.bandwidth_bps, 8e3 * nbytes / (0.25 * net)))

    def observe_ping(self, ms: float, load: dict[str, int], own_in_flight: int) -> bool:
        """A round trip measured by a ping, with the server's load; True when conditions changed."""
        with self._lock:
            changed = abs(ms - self.rtt_ms) > 0.25 * self.rtt_ms + 2.0
            self.rtt_ms = ms if changed else _ewma(self.rtt_ms, ms, 0.5)
            if load:
                others = max(0, load["in_flight"] - own_in_flight)
                loaded = others >= max(1, load["workers"])
                if not others:  # an idle server: no queue, and compute as fast as it has been
                    self.queue_ms *= 0.5
                    for sid, low in self.cloud_min.items():
                        self.cloud_ms[sid] = 0.5 * (self.cloud_ms[sid] + low)
                changed |= loaded != self.loaded
                self.loaded = loaded
            if changed:
                self.changes += 1
                self.bandwidth_bps = max(self.bandwidth_bps, self.best_bandwidth_bps)
            return changed

    def _ratio(self, side: str, sid: int, ms: float) -> None:
        pred = self.predicted.get(sid, 0.0)
        if pred > 0:
            self.ratio[side] = _ewma(self.ratio[side], ms / pred, self.alpha)

    def _bandwidth(self, sample: float) -> None:
        r = sample / self.bandwidth_bps
        # Far off (a new link): take it; near: smooth, in log space (rates multiply).
        self.bandwidth_bps = sample if not 0.5 <= r <= 2 else math.exp(_ewma(math.log(self.bandwidth_bps), math.log(sample), 0.5))
        self.best_bandwidth_bps = max(self.best_bandwidth_bps, self.bandwidth_bps)


@dataclasses.dataclass
class Decision:
    cut: str
    why: str  # "best" (lowest predicted by the objective), "explore", "forced", "no cloud"
    objective: str
    predicted: dict[str, float]  # cut name → predicted ms (total) under the estimates
    estimates: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "why": self.why, "objective": self.objective,
                "predicted_ms": {k: round(v, 3) for k, v in self.predicted.items()}, "estimates": self.estimates}  # fmt: skip


class Chooser:
    """Picks a cut per call by the objective, with rare exploration of the runner-up."""

    def __init__(self, cuts: list[Cut], estimates: Estimates, objective: str = "latency",
                 explore_every: int = 16, explore_max: int = 512, explore_margin: float = 3.0):  # fmt: skip
        if objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        self.cuts, self.est, self.objective = cuts, estimates, objective
        self.explore_every, self.explore_max, self.explore_margin = explore_every, explore_max, explore_margin
        self._interval = explore_every
        self._last_explore = 0
        self._changed_at = 0  # the call conditions last changed in: what was measured before is stale
        self._pending = explore_every  # a new session knows only the planner's guesses: explore early
        self._changes = estimates.changes
        self.calls = 0

    def score(self, p: dict[str, float]) -> float:
        if self.objective == "energy":
            return p["device_ms"] + p["transfer_ms"]
        if self.objective == "cloud":
            return p["cloud_ms"] + 1e-6 * p["total_ms"]
        return p["total_ms"]

    def choose(self, allowed: list[Cut]) -> Decision:
        self.calls += 1
        preds = {c.name: self.est.predict(c) for c in allowed}
        ranked = sorted(allowed, key=lambda c: self.score(preds[c.name]))
        best, why = ranked[0], "best"
        if self.est.changes != self._changes:  # conditions changed: what was measured is stale; explore soon
            self._changes, self._interval, self._changed_at = self.est.changes, self.explore_every, self.calls
            self._pending = self.explore_every  # calls left to find the runner-up worth a try
        due = self.calls - self._last_explore >= self._interval
        if len(ranked) > 1 and (due or self._pending):
            runner = ranked[1]
            # Stale: not measured since conditions changed, nor in the last interval.
            since = max(self._changed_at, self.calls - self._interval + 1)
            stale = any(self.est.seen.get(s, -1) < since for s in runner.segments)
            if stale and self.score(preds[runner.name]) <= self.explore_margin * self.score(preds[best.name]):
                best, why, self._pending = runner, "explore", 0
            elif self._pending:
                self._pending -= 1
                due = due and not self._pending
            if due or why == "explore":
                self._last_explore = self.calls
                self._interval = min(self.explore_max, self._interval * 2)
        return Decision(best.name, why, self.objective, {k: v["total_ms"] for k, v in preds.items()}, self.est.snapshot())


class Prober:
    """A daemon thread pinging the cloud every ``interval`` seconds (RTT and load) into ``estimates``."""

    def __init__(self, client, estimates: Estimates, interval: float, in_flight):
        self.client, self.est, self.interval, self.in_flight = client, estimates, interval, in_flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tvm-hybrid-prober", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ms, load = self.client.ping(timeout=max(1.0, 2 * self.interval))
                if self.est.observe_ping(ms, load, self.in_flight()):
                    log.info("cloud conditions changed (ping %.1f ms, load %s): re-estimating the link", ms, load)
            except Exception as e:  # a down cloud is the breaker's business, not the prober's
                log.debug("ping failed: %s", e)
            self._stop.wait(self.interval)
        try:
            self.client.close_ping()
        except Exception:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
