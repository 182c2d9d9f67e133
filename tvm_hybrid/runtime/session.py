"""Session: run an artifact's segments in order, on the device and (when placed there) the cloud."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..dtypes import from_carrier, np_dtype, to_carrier
from ..errors import ArtifactError, RuntimeFailure, UsageError, one_line
from ..manifest import Segment, TensorSpec
from .adaptive import Chooser, Decision, Estimates, Prober, cuts_of
from .artifact import Artifact, open_artifact
from .cloud import CloudClient, CloudPolicy, LinkShaper
from .executors import create_executor
from .threads import resolve as resolve_threads

log = logging.getLogger(__name__)

FALLBACKS = ("auto", "off", "cloud")


class Session:
    """Runs a compiled artifact: device segments here, cloud segments on a KServe v2 server.

    >>> sess = Session("dist/x86-64-avx2", cloud_url="http://127.0.0.1:8000")
    >>> out = sess.run({"x": image})          # {"output name": np.ndarray}
    >>> sess.trace                             # [{"segment": 0, "placement": "device", "ms": 3.1, ...}]

    ``fallback``: ``auto`` runs each segment where the plan put it and, when that fails, once
    more on the other side if the artifact allows it (a cloud copy of a device segment; a local
    build of a cloud segment the device can run); ``off`` never moves a segment; ``cloud`` runs
    every segment the cloud serves in the cloud, and nothing it serves locally.
    ``verify_key`` (a PEM public key file or bytes; default ``$TVM_HYBRID_VERIFY_KEY``) requires
    the artifact to carry a valid signature by that key (``tvm-hybrid sign``); otherwise it is
    refused with ArtifactError before any of its code is loaded.
    ``threads``: CPU threads TVM computes each call with (1 … the cores this process may use);
    default ``$TVM_NUM_THREADS`` if set, else every core its CPU affinity and cgroup quota allow.
    The count used is ``sess.threads`` and each device entry of ``sess.trace``.

    An artifact compiled with ``--adaptive`` carries candidate cuts; the Session picks one per
    call (runtime/adaptive.py) by ``objective`` (``latency``, ``energy``: the device's compute and
    radio time, ``cloud``: the cloud's compute) from what it measures, pinging the cloud every
    ``probe_interval`` seconds (0: never) for the round trip and its load; ``cut`` (or
    ``run(..., cut=NAME)``) runs one cut always. ``sess.decision`` says which cut the last call
    ran and why (the predictions and the estimates used). With ``fallback="auto"`` a cut whose
    cloud half fails finishes on the device, where the artifact has every piece.
    """

    def __init__(
        self,
        artifact: str | Path,
        cloud_url: str | None = None,
        token: str | None = None,
        fallback: str = "auto",
        device: str | None = None,
        timeout: float = 30.0,
        link: LinkShaper | None = None,
        cloud_policy: CloudPolicy | None = None,
        verify_key: str | Path | bytes | None = None,
        threads: int | None = None,
        objective: str = "latency",
        cut: str | None = None,
        probe_interval: float = 1.0,
    ):
        if fallback not in FALLBACKS:
            raise UsageError(f"fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
        self.fallback = fallback
        self.threads = resolve_threads(threads)  # before the artifact: a bad value costs nothing
        self._art: Artifact = open_artifact(artifact, verify_key)
        self.manifest = self._art.manifest
        if self.manifest.decoder is not None:
            self._art.close()
            raise UsageError(f"{artifact} is a decoder artifact (compile --decoder): generate text with it "
                             "(`tvm-hybrid generate`, runtime.Generator), not Session/run")  # fmt: skip
        self.inputs: list[TensorSpec] = self._art.inputs
        self.outputs: list[TensorSpec] = self._art.outputs
        # Constant outputs (no segment makes them): their values, built once.
        self._constants = {o.name: np.array(o.value, dtype=np_dtype(o.dtype)).reshape(o.shape)
                           for o in self.outputs if o.value is not None}  # fmt: skip
        self.trace: list[dict[str, Any]] = []
        # What _check_feeds holds each input to: its spec and numpy dtype (None: compared by name).
        self._want = {s.name: (s, _np_dtype_or_none(s.dtype)) for s in self.inputs}
        # ``timeout`` bounds each cloud call (retries included); ``cloud_policy`` sets every knob.
        self._cloud = CloudClient(cloud_url, token, timeout, link, cloud_policy) if cloud_url else None
        self._steps: list[_Step] = []
        self.decision: Decision | None = None
        self._chooser: Chooser | None = None
        self._prober: Prober | None = None
        self._in_flight = 0
        try:
            if self.manifest.cuts:
                self._setup_cuts(device, objective, cut, probe_interval)
            else:
                if cut is not None:
                    self.manifest.cut(cut)  # UsageError: the artifact has no cuts
                for seg in self.manifest.segments:
                    self._steps.append(self._plan_step(seg, device))
        except BaseException:
            self.close()
            raise

    def _setup_cuts(self, device: str | None, objective: str, cut: str | None, probe_interval: float) -> None:
        """Every segment of every cut: device pieces built here, cloud suffixes as endpoints."""
        self._cuts = {c.name: c for c in cuts_of(self.manifest)}
        if cut is not None:
            self.manifest.cut(cut)  # UsageError naming the cuts
        self._forced = cut
        self._estimates = Estimates(self.manifest)
        self._chooser = Chooser(list(self._cuts.values()), self._estimates, objective)  # checks the objective
        # The cuts this session can run: those with a cloud half only when a cloud is configured.
        self._usable = [c for c in self._cuts.values() if c.cloud is None or self._cloud is not None]
        if not self._usable:
            raise RuntimeFailure("every cut of this artifact runs part of the model in the cloud and no cloud is "
                                 "configured; pass --cloud-url (Session(cloud_url=...))")  # fmt: skip
        if cut is not None and cut not in {c.name for c in self._usable}:
            raise RuntimeFailure(f"cut {cut} runs part of the model in the cloud and no cloud is configured")
        for seg in self.manifest.segments:
            if seg.placement == "device":
                ex = create_executor(self._art.root, seg, self.manifest.target, device, self.threads, library=seg.library)
                self._steps.append(_Step(seg, ex, None, ["device"]))
            else:
                remote = (seg.endpoint.model, seg.endpoint.version) if self._cloud is not None else None
                self._steps.append(_Step(seg, None, remote, ["cloud"] if remote else []))
        self._step_of = {st.segment.id: st for st in self._steps}
        if self._cloud is not None and probe_interval > 0:
            self._prober = Prober(self._cloud, self._estimates, probe_interval, lambda: self._in_flight)

    def _plan_step(self, seg: Segment, device: str | None) -> _Step:
        ep = seg.endpoint
        local_lib = seg.local_library
        can_cloud = ep is not None and self._cloud is not None
        want_cloud = seg.placement == "cloud" or (self.fallback == "cloud" and ep is not None)
        if want_cloud and not can_cloud:
            if self.fallback == "auto" and local_lib:
                want_cloud = False  # no cloud configured: the device runs its local build
            else:
                hint = "pass --cloud-url (Session(cloud_url=...))" if ep else "recompile it with a cloud"
                raise RuntimeFailure(
                    f"segment {seg.id} runs in the cloud ({ep.model if ep else 'no endpoint'}) "
                    f"and no cloud is configured; {hint}"
                    + ("" if local_lib else ", or plan it onto the device")
                )
        local = None
        if local_lib and (not want_cloud or self.fallback == "auto"):
            local = create_executor(self._art.root, seg, self.manifest.target, device, self.threads, library=local_lib)
        remote = (ep.model, ep.version) if can_cloud else None
        order = ["cloud", "device"] if want_cloud else ["device", "cloud"]
        if self.fallback != "auto":
            order = order[:1]
        order = [o for o in order if (o == "device" and local is not None) or (o == "cloud" and remote is not None)]
        return _Step(seg, local, remote, order)

    @property
    def cuts(self) -> list[str]:
        """The candidate cuts' names (an artifact compiled with --adaptive), else []."""
        return [c["name"] for c in self.manifest.cuts]

    def run(self, feeds: Mapping[str, Any], cut: str | None = None) -> dict[str, np.ndarray]:
        """Run the model on named inputs; returns the named outputs as numpy arrays. ``cut``
        (adaptive artifacts): run that cut instead of choosing one."""
        env = self._check_feeds(feeds)
        if self._chooser is not None:
            return self._run_cut(env, cut or self._forced)
        if cut is not None:
            self.manifest.cut(cut)
        trace = []
        for step in self._steps:
            self._run_step(step, env, trace)
        self.trace = trace
        return self._outputs(env)

    def _run_cut(self, env: dict[str, np.ndarray], forced: str | None) -> dict[str, np.ndarray]:
        usable = self._usable
        if self._cloud is not None and self._cloud.breaker.state == "open" and self.fallback == "auto":
            usable = [c for c in usable if c.cloud is None] or usable  # the cloud is down: the device alone
        if self.fallback == "cloud":  # as much in the cloud as the cuts allow
            usable = [min(usable, key=lambda c: len(c.device))]
        if forced is not None:
            self.manifest.cut(forced)
            d = self._chooser.choose([self._cuts[forced]])
            d.why = "forced"
        else:
            d = self._chooser.choose(usable)
            if self._cloud is None:
                d.why = "no cloud"
        self.decision = d
        cut = self._cuts[d.cut]
        call = self._chooser.calls
        steps = self._step_of
        trace: list[dict[str, Any]] = []
        for sid in cut.device:
            entry = self._run_step(steps[sid], env, trace)
            self._estimates.observe_device(sid, entry["ms"], call)
        if cut.cloud is not None:
            self._in_flight += 1
            try:
                entry = self._run_step(steps[cut.cloud], env, trace)
                ex = self._cloud.last_exchange
                self._estimates.observe_cloud(cut.cloud, ex.ms, ex.bytes_up, ex.bytes_down, ex.compute_ms,
                                              ex.queue_ms, call)  # fmt: skip
            except RuntimeFailure as e:
                rest = self._finish_locally(cut)
                if self.fallback != "auto" or rest is None:
                    raise
                log.warning("cut %s: the cloud failed (%s); finishing on the device", cut.name, one_line(e))
                for sid in rest:
                    self._run_step(steps[sid], env, trace)
                    trace[-1]["fallback"] = True
            finally:
                self._in_flight -= 1
        for entry in trace:
            entry["cut"] = cut.name
        self.trace = trace
        return self._outputs(env)

    def _finish_locally(self, cut) -> list[int] | None:
        """The device pieces that finish ``cut`` without the cloud, where some cut runs every node here."""
        whole = next((c for c in self._cuts.values() if c.cloud is None), None)
        return None if whole is None else [s for s in whole.device if s not in cut.device]

    def _run_step(self, step: _Step, env: dict[str, np.ndarray], trace: list[dict[str, Any]]) -> dict[str, Any]:
        """Run one segment where its step says (trying the next place on failure); its outputs go
        into ``env`` and its trace entry onto ``trace``."""
        seg = step.segment
        args = {t.name: env[t.name] for t in seg.inputs}
        errors = []
        for where in step.order:
            t0 = time.perf_counter()
            try:
                if where == "device":
                    res = step.local.run(list(args.values()))
                    if len(res) != len(seg.outputs):
                        raise ArtifactError(
                            f"segment {seg.id} returned {len(res)} outputs, its manifest lists "
                            f"{len(seg.outputs)}: the manifest does not describe this library; recompile the model"
                        )
                    outs = dict(zip((t.name for t in seg.outputs), res))
                    sent, ran_on = 0, step.local.device_name
                    extra = {"threads": used} if (used := getattr(step.local, "threads_used", None)) else {}
                    if seg.variants:  # a portable artifact: which CPU level's build ran
                        extra["build"] = getattr(step.local, "build", None)
                else:
                    outs, sent = self._cloud.infer(*step.remote, args)
                    ran_on, extra = self._cloud.url, {}
            except ArtifactError:
                raise
            except Exception as e:
                errors.append(f"{where}: {one_line(e)}")
                if where != step.order[-1]:
                    log.warning("segment %s failed on the %s (%s); trying the other side", seg.id, where, one_line(e))
                continue
            missing = [t.name for t in seg.outputs if t.name not in outs]
            if missing:
                errors.append(f"{where}: outputs {missing} missing from the reply")
                continue
            env.update({t.name: outs[t.name] for t in seg.outputs})
            trace.append(
                {
                    "segment": seg.id,
                    "placement": where,
                    "planned": seg.placement,
                    "fallback": where != step.order[0],
                    "ran_on": ran_on,
                    "ms": (time.perf_counter() - t0) * 1e3,
                    "bytes_sent": sent,
                    **extra,
                }
            )
            return trace[-1]
        self.trace = trace
        raise RuntimeFailure(
            f"segment {seg.id} ({seg.placement}) failed"
            + (f": {'; '.join(errors)}" if errors else "")
            + ("" if self.fallback == "auto" else f" (fallback is {self.fallback!r})")
        )

    def _outputs(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs by name, as the caller's types (a constant output: its value)."""
        return {o.name: self._constants[o.name].copy() if o.name in self._constants else from_carrier(env[o.name], o.dtype)
                for o in self.outputs}  # fmt: skip

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if type(feeds) is not dict and not isinstance(feeds, Mapping):
            raise UsageError("run() takes a dict of input name → array")
        want = self._want
        if feeds.keys() != want.keys():
            unknown, missing = sorted(set(feeds) - set(want)), sorted(set(want) - set(feeds))
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown input(s) {', '.join(unknown)}")
            raise UsageError(
                f"{'; '.join(parts)}; the model takes "
                + ", ".join(f"{s.name} {_fmt_shape(s.shape)} {s.dtype}" for s in self.inputs)
            )
        env = {}
        for name, (spec, dtype) in want.items():
            arr = feeds[name]
            if not isinstance(arr, np.ndarray):
                arr = np.asarray(arr, dtype=np_dtype(spec.dtype))
            if arr.dtype != dtype if dtype is not None else str(arr.dtype) != spec.dtype:
                raise UsageError(f"input {name} must be {spec.dtype}, got {arr.dtype}; cast it with .astype({spec.dtype!r})")
            if tuple(arr.shape) != tuple(spec.shape):
                raise UsageError(
                    f"input {name} must have shape {_fmt_shape(spec.shape)}, got {_fmt_shape(arr.shape)}; "
                    "the artifact was compiled for that shape (recompile with --input to change it)"
                )
            if spec.value is not None and not np.array_equal(arr, np.asarray(spec.value, dtype=np_dtype(spec.dtype))):
                raise UsageError(
                    f"input {name} was fixed to {_fmt_value(spec.value)} at compile time (--input {name}=VALUE), "
                    f"got {_fmt_value(arr.tolist())}; recompile with that value to run it"
                )
            env[name] = to_carrier(np.asarray(arr, order="C"), spec.dtype)  # (ascontiguousarray makes a scalar 1-d)
        return env

    def close(self) -> None:
        """Release the executors, the cloud connection and any unpacked files."""
        self._steps, self._step_of = [], {}
        if getattr(self, "_prober", None) is not None:
            self._prober.close()
            self._prober = None
        if getattr(self, "_cloud", None) is not None:
            self._cloud.close()
        self._art.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class _Step:
    """How one segment runs: where first, and where else if that fails."""

    segment: Segment
    local: Any  # an executor, or None
    remote: tuple[str, str] | None  # (model, version) on the cloud, or None
    order: list[str]


def _fmt_value(v) -> str:
    import json

    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _np_dtype_or_none(name: str) -> np.dtype | None:
    try:
        return np.dtype(np_dtype(name))
    except Exception:  # a dtype only its carrier represents: compared by name
        return None


def _fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"

