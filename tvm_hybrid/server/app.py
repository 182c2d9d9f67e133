"""The cloud side: cloud artifacts' segments served over KServe / Open Inference Protocol v2."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ArtifactError
from ..manifest import TensorSpec
from ..protocol import HEADER_LENGTH, ProtocolError, decode, encode, v2_datatype
from ..runtime.artifact import Artifact, open_artifact
from ..runtime.executors import create_executor

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServedModel:
    """One segment under its endpoint name and version; one VM, used by one request at a time."""

    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    executor: Any
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def metadata(self) -> dict[str, Any]:
        def t(s: TensorSpec):
            return {"name": s.name, "datatype": v2_datatype(s.dtype), "shape": list(s.shape)}

        return {"name": self.name, "versions": [self.version], "platform": "tvm-hybrid",
                "inputs": [t(s) for s in self.inputs], "outputs": [t(s) for s in self.outputs]}  # fmt: skip

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            outs = self.executor.run([feeds[s.name] for s in self.inputs])
        return {s.name: a for s, a in zip(self.outputs, outs)}


class Registry:
    """Every servable segment of the given cloud artifacts, by name and version."""

    def __init__(self, artifacts: list[str | Path]):
        self._arts: list[Artifact] = []
        self.models: dict[str, dict[str, ServedModel]] = {}
        for path in artifacts:
            art = open_artifact(path)
            self._arts.append(art)
            for seg in art.manifest["segments"]:
                ep = seg.get("endpoint")
                if ep is None or "library" not in seg:
                    continue
                ex = create_executor(art.root, seg, art.manifest["target"])
                sm = ServedModel(ep["model"], ep["version"], [TensorSpec.from_dict(t) for t in seg["inputs"]],
                                 [TensorSpec.from_dict(t) for t in seg["outputs"]], ex)  # fmt: skip
                self.models.setdefault(sm.name, {})[sm.version] = sm
                log.info("serving %s version %s from %s", sm.name, sm.version, path)
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
            return versions[sorted(versions)[-1]] if len(versions) > 1 else next(iter(versions.values()))
        return versions.get(version)

    def close(self) -> None:
        for a in self._arts:
            a.close()


def create_app(registry: Registry, token: str | None = None):
    """The Starlette app: health, metadata, infer (JSON and binary)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        return JSONResponse({"ready": True})

    async def server_meta(request: Request):
        return JSONResponse({"name": "tvm-hybrid", "version": __version__, "extensions": ["binary_tensor_data"]})

    def lookup(request: Request):
        name = request.path_params["name"]
        version = request.path_params.get("version")
        return registry.get(name, version), name, version

    def not_found(name: str, version: str | None) -> JSONResponse:
        if name not in registry.models:
            return error(404, f"unknown model {name!r}; served: {', '.join(sorted(registry.models))}")
        return error(404, f"model {name!r} has no version {version!r}; versions: {', '.join(sorted(registry.models[name]))}")

    async def model_meta(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong bearer token")
        model, name, version = lookup(request)
        return JSONResponse(model.metadata()) if model else not_found(name, version)

    async def model_ready(request: Request):
        model, name, version = lookup(request)
        return JSONResponse({"name": name, "ready": True}) if model else not_found(name, version)

    async def infer(request: Request):
        if not authorized(request):
            return error(401, "missing or wrong bearer token")
        model, name, version = lookup(request)
        if model is None:
            return not_found(name, version)
        body = await request.body()
        try:
            doc, feeds = decode(body, request.headers.get(HEADER_LENGTH.lower()))
            _check(model, feeds)
        except ProtocolError as e:
            return error(400, str(e))
        outs = await asyncio.to_thread(model.infer, feeds)
        wanted = _requested_outputs(doc, model)
        if isinstance(wanted, str):
            return error(400, wanted)
        outs = {k: outs[k] for k in wanted}
        binary = _wants_binary(doc)
        payload, headers = encode(outs, binary=binary, key="outputs",
                                  extra={"model_name": model.name, "model_version": model.version,
                                         **({"id": doc["id"]} if "id" in doc else {})})  # fmt: skip
        return Response(payload, headers=headers)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_meta),
        Route("/v2/models/{name}", model_meta),
        Route("/v2/models/{name}/versions/{version}", model_meta),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    return Starlette(routes=routes)


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


def _requested_outputs(doc: dict, model: ServedModel) -> list[str] | str:
    names = [s.name for s in model.outputs]
    req = doc.get("outputs")
    if not req:
        return names
    asked = [o.get("name") for o in req if isinstance(o, dict)]
    bad = [a for a in asked if a not in names]
    return f"unknown outputs {bad}; the model has {names}" if bad else asked


def _wants_binary(doc: dict) -> bool:
    if (doc.get("parameters") or {}).get("binary_data_output"):
        return True
    return any((o.get("parameters") or {}).get("binary_data") for o in doc.get("outputs") or [] if isinstance(o, dict))
