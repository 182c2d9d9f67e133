"""Session: run an artifact's segments in order, on the device and (when placed there) the cloud."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ArtifactError, RuntimeFailure, UsageError
from ..manifest import TensorSpec
from .artifact import Artifact, open_artifact
from .executors import create_executor

log = logging.getLogger(__name__)

FALLBACKS = ("auto", "off", "cloud")


class Session:
    """Runs a compiled artifact.

    >>> sess = Session("dist/x86-64-avx2")
    >>> out = sess.run({"x": image})          # {"output name": np.ndarray}
    >>> sess.trace                             # [{"segment": 0, "placement": "device", "ms": 3.1, ...}]

    ``verify_key`` (a PEM public key file or bytes; default ``$TVM_HYBRID_VERIFY_KEY``) requires
    the artifact to carry a valid signature by that key (``tvm-hybrid sign``); otherwise it is
    refused with ArtifactError before any of its code is loaded.
    """

    def __init__(
        self,
        artifact: str | Path,
        cloud_url: str | None = None,
        token: str | None = None,
        fallback: str = "auto",
        device: str | None = None,
        verify_key: str | Path | bytes | None = None,
    ):
        if fallback not in FALLBACKS:
            raise UsageError(f"fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
        self.fallback = fallback
        self.cloud_url = cloud_url
        self.token = token
        self._art: Artifact = open_artifact(artifact, verify_key)
        self.manifest = self._art.manifest
        self.inputs: list[TensorSpec] = self._art.inputs
        self.outputs: list[TensorSpec] = self._art.outputs
        self.trace: list[dict[str, Any]] = []
        self._executors = []
        try:
            for seg in self.manifest["segments"]:
                if seg["placement"] != "device":
                    raise RuntimeFailure(
                        f"segment {seg['id']} is placed in the cloud; this runtime version runs device segments only"
                    )
                self._executors.append(create_executor(self._art.root, seg, self.manifest["target"], device))
        except BaseException:
            self.close()
            raise

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on named inputs; returns the named outputs as numpy arrays."""
        env = self._check_feeds(feeds)
        trace = []
        for seg, ex in zip(self.manifest["segments"], self._executors):
            args = [env[t["name"]] for t in seg["inputs"]]
            t0 = time.perf_counter()
            try:
                outs = ex.run(args)
            except Exception as e:
                raise RuntimeFailure(f"segment {seg['id']} failed on the device: {e}") from e
            ms = (time.perf_counter() - t0) * 1e3
            if len(outs) != len(seg["outputs"]):
                raise ArtifactError(
                    f"segment {seg['id']} returned {len(outs)} outputs, its manifest lists {len(seg['outputs'])}: "
                    "the manifest does not describe this library; recompile the model"
                )
            for t, arr in zip(seg["outputs"], outs):
                env[t["name"]] = arr
            trace.append({"segment": seg["id"], "placement": "device", "ran_on": ex.device_name, "ms": ms, "bytes_sent": 0})
        self.trace = trace
        return {o.name: env[o.name] for o in self.outputs}

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise UsageError("run() takes a dict of input name → array")
        want = {s.name: s for s in self.inputs}
        unknown = sorted(set(feeds) - set(want))
        missing = sorted(set(want) - set(feeds))
        if unknown or missing:
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
        for name, spec in want.items():
            arr = feeds[name]
            if not isinstance(arr, np.ndarray):
                arr = np.asarray(arr, dtype=spec.dtype)
            if str(arr.dtype) != spec.dtype:
                raise UsageError(f"input {name} must be {spec.dtype}, got {arr.dtype}; cast it with .astype({spec.dtype!r})")
            if tuple(arr.shape) != tuple(spec.shape):
                raise UsageError(
                    f"input {name} must have shape {_fmt_shape(spec.shape)}, got {_fmt_shape(arr.shape)}; "
                    "the artifact was compiled for that shape (recompile with --input to change it)"
                )
            env[name] = np.ascontiguousarray(arr)
        return env

    def close(self) -> None:
        """Release the executors and any unpacked files."""
        self._executors = []
        self._art.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


__all__ = ["Session", "ArtifactError"]
