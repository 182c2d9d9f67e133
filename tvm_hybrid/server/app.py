"""The cloud side: cloud artifacts' segments served over KServe / Open Inference Protocol v2.

Starlette handles HTTP; inference runs on a thread pool of ``workers`` threads, each model keeping
``workers`` TVM VMs so that that many requests compute at once. Operability: bearer-token auth,
a request size limit (413), validation of names, shapes and dtypes (400), a bounded queue (503),
Prometheus metrics at ``/metrics`` and one JSON access-log line per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import queue
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ArtifactError, UsageError
from ..manifest import TensorSpec
from ..protocol import COMPUTE_HEADER, HEADER_LENGTH, LOAD_HEADER, QUEUE_HEADER, ProtocolError, decode, encode, v2_datatype
from ..runtime.artifact import Artifact, open_artifact
from ..runtime.cloud import wire_version
from ..runtime.executors import create_executor
from ..runtime.threads import per_worker
from .decoder import SequenceError, ServedDecoder

log = logging.getLogger(__name__)
access_log = logging.getLogger("tvm_hybrid.access")

DEFAULT_MAX_REQUEST_BYTES = 64 << 20


class ServedModel:
    """One segment under its endpoint name and version, with a pool of VMs (one per worker)."""

    def __init__(self, name: str, version: str, inputs: list[TensorSpec], outputs: list[TensorSpec], executors: list):
        self.name, self.version = name, version
        self.inputs, self.outputs = inputs, outputs
        self._vms: queue.SimpleQueue = queue.SimpleQueue()
        for ex in executors:
            self._vms.put(ex)
        self.pool_size = len(executors)

    @property
    def versions(self) -> list[str]:
        """The version as the manifest names it and as Triton would (its integer form)."""
        return list(dict.fromkeys([self.version, wire_version(self.version)]))

    def metadata(self) -> dict[str, Any]:
        def t(s: TensorSpec):
            return {"name": s.name, "datatype": v2_datatype(s.dtype), "shape": list(s.shape)}

        return {"name": self.name, "versions": self.versions, "platform": "tvm-hybrid",
                "inputs": [t(s) for s in self.inputs], "outputs": [t(s) for s in self.outputs]}  # fmt: skip

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vm = self._vms.get()  # never waits long: the pool has as many VMs as there are worker threads
        try:
            outs = vm.run([feeds[s.name] for s in self.inputs])
        finally:
            self._vms.put(vm)
        return {s.name: a for s, a in zip(self.outputs, outs)}


class Registry:
    """Every servable segment of the given cloud artifacts, by name and version."""

    def __init__(self, artifacts: list[str | Path], workers: int = 1, threads: int | None = None,
                 max_sequences: int = 16, sequence_timeout: float = 300.0):  # fmt: skip
        if workers < 1:
            raise UsageError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = per_worker(workers, threads)  # CPU threads each worker computes with
        self._arts: list[Artifact] = []
        self.models: dict[str, dict[str, ServedModel]] = {}
        self._aliases: dict[tuple[str, str], str] = {}
        for path in artifacts:
            art = open_artifact(path)
            self._arts.append(art)
            if art.manifest.decoder is not None:
                if art.manifest.role != "cloud":
                    raise ArtifactError(f"{path} is a device decoder artifact; serve its cloud half (OUT/cloud-x86)")
                sd = ServedDecoder(art, workers, self.threads, max_sequences, sequence_timeout)
                self.models.setdefault(sd.name, {})[sd.version] = sd
                for v in sd.versions:
                    self._aliases[(sd.name, v)] = sd.version
                log.info("serving decoder %s version %s from %s (%d sequences at most)", sd.name, sd.version, path,
                         max_sequences)  # fmt: skip
                continue
            for seg in art.manifest.segments:
                ep = seg.endpoint
                if ep is None or seg.library is None:
                    continue
                exs = [create_executor(art.root, seg, art.manifest.target, threads=self.threads) for _ in range(workers)]
                sm = ServedModel(ep.model, ep.version, list(seg.inputs), list(seg.outputs), exs)
                self.models.setdefault(sm.name, {})[sm.version] = sm
                for v in sm.versions:
                    self._aliases[(sm.name, v)] = sm.version
                log.info("serving %s version %s from %s (%d VMs)", sm.name, sm.version, path, workers)
        if not self.models:
            raise ArtifactError(
                "no servable segments in " + ", ".join(map(str, artifacts))
                + "; serve the cloud artifact (OUT/cloud-x86), not the device one"
            )

    def get(self, name: str, version: str | None) -> ServedModel | None:
        versions = self.models.get(name)
        if not versions:
            return None
        if version is None:
            # No version asked: a fixed choice among content hashes (the runtime always names one).
            return max(versions.values(), key=lambda m: m.version) if len(versions) > 1 else next(iter(versions.values()))
        return versions.get(self._aliases.get((name, version), version))

    def close(self) -> None:
        for a in self._arts:
            a.close()


class Metrics:
    """Prometheus metrics in a registry of their own (requests, latency, bytes, queue)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["route", "model", "code"]
        self.requests = Counter("tvm_hybrid_requests", "HTTP requests answered.", labels, registry=self.registry)
        self.latency = Histogram(
            "tvm_hybrid_request_duration_seconds", "Time from request to the end of the reply.", ["route", "model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )  # fmt: skip
        self.infer_seconds = Histogram(
            "tvm_hybrid_inference_duration_seconds", "Time a VM spent computing one request.", ["model", "version"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=self.registry,
        )  # fmt: skip
        self.bytes_in = Counter("tvm_hybrid_request_bytes", "Request body bytes received.", ["route", "model"],
                                registry=self.registry)  # fmt: skip
        self.bytes_out = Counter("tvm_hybrid_response_bytes", "Response body bytes sent.", ["route", "model"],
                                 registry=self.registry)  # fmt: skip
        self.in_flight = Gauge("tvm_hybrid_inferences_in_flight", "Inference requests queued or computing.",
                               registry=self.registry)  # fmt: skip

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?$")


def _route(path: str, registry: Registry) -> tuple[str, str]:
    """Low-cardinality labels for a path: (route, model); unknown models are all '-'."""
    m = _MODEL_PATH.match(path)
    if not m:
        named = {"/v2": "server_metadata", "/v2/health/live": "live", "/v2/health/ready": "ready", "/metrics": "metrics"}
        return named.get(path, "other"), "-"
    route = {"/infer": "infer", "/ready": "model_ready", None: "model_metadata"}[m.group(3)]
    return route, (m.group(1) if m.group(1) in registry.models else "-")


class _Observe:
    """ASGI middleware: Prometheus counters and one structured access-log line per request."""

    def __init__(self, app, registry: Registry, metrics: Metrics):
        self.app, self.registry, self.metrics = app, registry, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        box = {"status": 500, "in": 0, "out": 0}

        async def counting_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                box["in"] += len(msg.get("body", b""))
            return msg

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                box["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                box["out"] += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            dt = time.perf_counter() - t0
            route, model = _route(scope["path"], self.registry)
            m = self.metrics
            m.requests.labels(route, model, str(box["status"])).inc()
            m.latency.labels(route, model).observe(dt)
            m.bytes_in.labels(route, model).inc(box["in"])
            m.bytes_out.labels(route, model).inc(box["out"])
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(json.dumps({
                    "ts": round(time.time(), 3), "remote": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"], "path": scope["path"], "status": box["status"],
                    "ms": round(dt * 1e3, 3), "bytes_in": box["in"], "bytes_out": box["out"],
                    "route": route, "model": model,
                }, separators=(",", ":")))  # fmt: skip


def create_app(registry: Registry, token: str | None = None, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_queue: int | None = None, metrics: Metrics | None = None, cors_origins: tuple[str, ...] = (),
               web: Path | None = None):  # fmt: skip
    """The ASGI app: v2 health, metadata and infer (JSON and binary), /metrics, auth and limits.

    ``max_queue``: inference requests waiting or computing beyond which the server answers 503
    (default: 32 per worker). ``cors_origins``: web origins (or ``*``) whose pages may call the
    API from a browser: preflights answered, the v2 headers a browser client reads exposed.
    ``web``: a device artifact for browsers (the webgpu profile) served under ``/web/`` with the
    JavaScript runtime and the demo page (``/web/``), on the same origin as the API."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = metrics or Metrics()
    max_queue = max_queue if max_queue is not None else 32 * registry.workers
    pool = concurrent.futures.ThreadPoolExecutor(registry.workers, thread_name_prefix="tvm-vm")
    state = {"in_flight": 0}

    def error(status: int, msg: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    def guarded(handler):
        async def wrapped(request: Request):
            if not authorized(request):
                return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return await handler(request)

        return wrapped

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        # The load, so devices choosing a cut per call see a busy cloud: inferences computing or
        # waiting (``in_flight``) against the workers that compute them.
        return JSONResponse({"ready": True, "load": {"in_flight": state["in_flight"], "workers": registry.workers}},
                            headers={LOAD_HEADER: f"{state['in_flight']}/{registry.workers}"})

    async def server_meta(request: Request):
        return JSONResponse({"name": "tvm-hybrid", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def prometheus(request: Request):
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    def lookup(request: Request):
        name = request.path_params["name"]
        version = request.path_params.get("version")
        return registry.get(name, version), name, version

    def not_found(name: str, version: str | None) -> JSONResponse:
        if name not in registry.models:
            return error(404, f"unknown model {name!r}; served: {', '.join(sorted(registry.models))}")
        versions = sorted(v for m in registry.models[name].values() for v in m.versions)
        return error(404, f"model {name!r} has no version {version!r}; versions: {', '.join(versions)}")

    async def model_meta(request: Request):
        model, name, version = lookup(request)
        return JSONResponse(model.metadata()) if model else not_found(name, version)

    async def model_ready(request: Request):
        model, name, version = lookup(request)
        return JSONResponse({"name": name, "ready": True}) if model else not_found(name, version)

    async def read_body(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, f"request body of {declared} bytes is over the {max_request_bytes}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                return error(413, f"request body is over the {max_request_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(request: Request):
        model, name, version = lookup(request)
        if model is None:
            return not_found(name, version)
        try:
            body = await read_body(request)
        except ClientDisconnect:
            return error(400, "client went away before sending the whole body")
        if isinstance(body, Response):
            return body
        stateful = getattr(model, "stateful", False)
        try:
            n_max = max(int(np.prod(s.shape, dtype=np.int64)) for s in model.inputs)
            if stateful:  # a prefill chunk's rows are the largest input
                n_max = max(n_max, max(model.chunks) * int(np.prod(model.inputs[0].shape[2:], dtype=np.int64)))
            doc, feeds = decode(body, request.headers.get(HEADER_LENGTH.lower()), max_elements=max(n_max, 1))
            params = doc.get("parameters") or {}
            if stateful:
                try:
                    model.check(feeds, params if isinstance(params, dict) else {})
                except SequenceError as e:
                    return error(e.status, str(e))
                wanted = None
            else:
                _check(model, feeds)
                wanted = _requested_outputs(doc, model)
        except ProtocolError as e:
            return error(400, str(e))
        if state["in_flight"] >= max_queue:
            return error(503, f"{state['in_flight']} inferences are queued; try again shortly", {"Retry-After": "1"})
        state["in_flight"] += 1
        metrics.in_flight.inc()
        try:
            t0 = time.perf_counter()
            if stateful:
                try:
                    outs, started, ended = await asyncio.get_running_loop().run_in_executor(
                        pool, _timed, model.infer_sequence, feeds, params)
                except SequenceError as e:
                    return error(e.status, str(e))
            else:
                outs, started, ended = await asyncio.get_running_loop().run_in_executor(pool, _timed, model.infer, feeds)
            metrics.infer_seconds.labels(model.name, model.version).observe(time.perf_counter() - t0)
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.dec()
        if wanted is not None:
            outs = {k: outs[k] for k in wanted}
        payload, headers = encode(outs, binary=_wants_binary(doc), key="outputs",
                                  extra={"model_name": model.name, "model_version": model.version,
                                         **({"id": doc["id"]} if "id" in doc else {})})  # fmt: skip
        # Where the request's time went here: waiting for a worker, computing (milliseconds).
        headers[QUEUE_HEADER] = f"{(started - t0) * 1e3:.3f}"
        headers[COMPUTE_HEADER] = f"{(ended - started) * 1e3:.3f}"
        return Response(payload, headers=headers)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_meta),
        Route("/metrics", guarded(prometheus)),
        Route("/v2/models/{name}", guarded(model_meta)),
        Route("/v2/models/{name}/versions/{version}", guarded(model_meta)),
        Route("/v2/models/{name}/ready", guarded(model_ready)),
        Route("/v2/models/{name}/versions/{version}/ready", guarded(model_ready)),
        Route("/v2/models/{name}/infer", guarded(infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", guarded(infer), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=True)  # uvicorn has let in-flight requests finish by now

    middleware = []
    if cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", HEADER_LENGTH],
            expose_headers=[HEADER_LENGTH, QUEUE_HEADER, COMPUTE_HEADER, LOAD_HEADER], max_age=600,
        ))  # fmt: skip
    if web is not None:
        routes += _web_routes(Path(web))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    return _Observe(app, registry, metrics)


def _web_routes(root: Path) -> list:
    """``/web/``: the demo page; ``/web/tvm-hybrid.js`` (and .d.ts): the runtime; ``/web/artifact/…``:
    the files of the artifact in ``root`` (the browser checks them against its manifest)."""
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Route

    from ..runtime.browser import WEB_DIR, content_type, under

    pages = {"": "demo.html", "tvm-hybrid.js": "tvm-hybrid.js", "tvm-hybrid.d.ts": "tvm-hybrid.d.ts"}

    async def page(request):
        rel = request.path_params.get("path", "")
        if rel in pages:
            return Response((WEB_DIR / pages[rel]).read_bytes(), media_type=content_type(pages[rel]),
                            headers={"Cache-Control": "no-cache"})  # fmt: skip
        if rel.startswith("artifact/") and (p := under(root, rel[len("artifact/"):])) is not None:
            return Response(p.read_bytes(), media_type=content_type(p.name), headers={"Cache-Control": "no-cache"})
        return Response("not found", status_code=404, media_type="text/plain")

    return [Route("/web", lambda request: RedirectResponse("/web/")), Route("/web/", page),
            Route("/web/{path:path}", page)]  # fmt: skip


def _timed(fn, *args):
    """fn(*args) in a worker thread, with when it started and ended (perf_counter seconds)."""
    started = time.perf_counter()
    out = fn(*args)
    return out, started, time.perf_counter()


def _check(model: ServedModel, feeds: dict[str, np.ndarray]) -> None:
    want = {s.name: s for s in model.inputs}
    missing, unknown = sorted(set(want) - set(feeds)), sorted(set(feeds) - set(want))
    if missing or unknown:
        raise ProtocolError(f"inputs must be {', '.join(want)}; missing {missing}, unknown {unknown}")
    for name, spec in want.items():
        arr = feeds[name]
        if str(arr.dtype) != spec.dtype:
            raise ProtocolError(f"input {name} must be {v2_datatype(spec.dtype)}, got {v2_datatype(str(arr.dtype))}")
        if tuple(arr.shape) != tuple(spec.shape):
            raise ProtocolError(f"input {name} must have shape {list(spec.shape)}, got {list(arr.shape)}")


def _requested_outputs(doc: dict, model: ServedModel) -> list[str]:
    names = [s.name for s in model.outputs]
    req = doc.get("outputs")
    if not req:
        return names
    if not isinstance(req, list):
        raise ProtocolError("outputs must be a list of {name: ...}")
    asked = [o.get("name") for o in req if isinstance(o, dict)]
    bad = [a for a in asked if a not in names]
    if bad:
        raise ProtocolError(f"unknown outputs {bad}; the model has {names}")
    return asked


def _wants_binary(doc: dict) -> bool:
    if (doc.get("parameters") or {}).get("binary_data_output"):
        return True
    return any((o.get("parameters") or {}).get("binary_data") for o in doc.get("outputs") or [] if isinstance(o, dict))
