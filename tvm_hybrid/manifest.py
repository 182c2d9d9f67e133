"""Artifact manifest: schema, validation, file hashes, and the manifest as types. Standard library
only (the runtime loads it).

``Manifest.from_dict`` validates a parsed manifest.json and returns frozen dataclasses (Manifest,
Segment, Endpoint, File, TensorSpec); ``to_dict`` gives back the JSON form the compiler writes
(``dumps``: canonical bytes). The runtime, the server and the exporters read attributes; format
names (FORMAT_TVM_VM, FORMAT_WGSL_PLAN) and the schema live here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .dtypes import NARROW, np_dtype
from .errors import ArtifactError

SCHEMA = "tvm-hybrid/artifact@1"
#: Segment formats: a shared library the TVM Relax VM runs; WGSL kernels plus a launch plan
#: (runtime/wgpu_executor.py). The runtime's executor table is keyed by these names.
FORMAT_TVM_VM = "tvm-vm"
FORMAT_WGSL_PLAN = "wgsl-plan"
MANIFEST = "manifest.json"
# The detached signature of manifest.json (tvm_hybrid.signing); it cannot be listed in the
# manifest it signs, so it is the one file besides the manifest an artifact may hold unlisted.
SIGNATURE = "manifest.sig"
RESERVED = (MANIFEST, SIGNATURE)
# Manifest schemas this version reads; anything else is refused with the list. The schema's
# major (the number after @) is the compatibility contract: fields may be added within a major,
# a new major is refused by older runtimes.
READABLE_SCHEMAS = (SCHEMA,)
# A manifest is kilobytes (a few MiB for models with tens of thousands of nodes); a bigger one is
# not ours, and reading it whole would be a way to exhaust memory.
MAX_MANIFEST_BYTES = 32 << 20
# Tensor dtypes an artifact may declare: numpy names, as the runtime compares them.
DTYPES = frozenset({
    "float32", "float16", "float64", "bfloat16", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "bool",
}) | frozenset(NARROW)  # fmt: skip
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a static shape and a numpy dtype name; ``value``, as nested lists: a
    model input's, the value it was fixed to at compile time (``--input NAME=VALUE``); a model
    output's, its value when it is a constant (no segment computes it)."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str
    value: Any = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape) if self.shape is not None else None, "dtype": self.dtype}
        if self.value is not None:
            d["value"] = self.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        shape = d.get("shape")
        return cls(str(d["name"]), tuple(int(x) for x in shape) if shape is not None else None, str(d["dtype"]),
                   d.get("value"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class File:
    """A file the artifact holds: its path (relative, POSIX), sha256 and size."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> File:
        return cls(d["path"], d["sha256"], int(d["size"]))


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the cloud serves a segment: a KServe v2 model name and version (a content hash)."""

    model: str
    version: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version}


@dataclasses.dataclass(frozen=True)
class Segment:
    """One segment: the nodes it runs, where (placement), its tensors and the files that run it.

    ``library``: the main file of a segment the artifact runs (a device segment's, or a cloud
    artifact's); ``fallback_library``: a device build of a cloud segment; ``format``: how those
    files run (None where there is neither); ``endpoint``: the cloud's name for it.
    """

    id: int
    placement: str  # "device" or "cloud"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    format: str | None = None
    library: str | None = None
    fallback_library: str | None = None
    onnx: str | None = None  # a cloud artifact's ONNX copy of the segment (for any engine)
    endpoint: Endpoint | None = None
    nodes: tuple[str, ...] = ()
    reason: str | None = None  # why a cloud segment is in the cloud
    predicted: dict[str, Any] | None = None  # the planner's flops and ms
    kernels: dict[str, int] | None = None  # {"tuned": N, "default": N}
    device_code: dict[str, Any] | None = None  # GPU targets: the library's SASS / PTX
    #: Builds of ``library`` for other CPU levels, best first: {"profile", "library", "tvm_target"};
    #: the runtime loads the first this CPU runs, else ``library``.
    variants: tuple[dict[str, Any], ...] = ()
    #: {"file", "keys"}: weights kept out of the libraries (shared by the variants), passed to
    #: ``main`` after the inputs in ``keys`` order (each variant has its own "weights" keys).
    weights: dict[str, Any] | None = None

    @property
    def local_library(self) -> str | None:
        """The file that runs this segment here: its library, else its fallback build."""
        return self.library or self.fallback_library

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "placement": self.placement,
                             "inputs": [t.to_dict() for t in self.inputs],
                             "outputs": [t.to_dict() for t in self.outputs]}  # fmt: skip
        for key in ("format", "library", "fallback_library", "onnx", "reason", "predicted", "kernels", "device_code"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.endpoint is not None:
            d["endpoint"] = self.endpoint.to_dict()
        if self.nodes:
            d["nodes"] = list(self.nodes)
        if self.variants:
            d["variants"] = [dict(v) for v in self.variants]
        if self.weights is not None:
            d["weights"] = dict(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        ep = d.get("endpoint")
        return cls(
            id=d["id"], placement=d["placement"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            format=d.get("format"), library=d.get("library"), fallback_library=d.get("fallback_library"),
            onnx=d.get("onnx"), endpoint=Endpoint(ep["model"], ep["version"]) if ep is not None else None,
            nodes=tuple(d.get("nodes") or ()), reason=d.get("reason"), predicted=d.get("predicted"),
            kernels=d.get("kernels"), device_code=d.get("device_code"),
            variants=tuple(dict(v) for v in d.get("variants") or ()), weights=d.get("weights"),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Manifest:
    """An artifact's manifest.json, validated (``from_dict``) and typed.

    ``role`` "device": run the segments in order; "cloud": serve each by its endpoint.
    ``target`` is the profile it was compiled for, as ``TargetProfile.to_dict`` wrote it.
    """

    model: dict[str, Any]  # name, sha256, opset
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: dict[str, Any]
    segments: tuple[Segment, ...]
    files: tuple[File, ...]
    versions: dict[str, str]
    schema: str = SCHEMA
    role: str = "device"
    tool: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None  # the planner's link, predictions and baselines
    precision: str = "fp32"  # of the device segments' arithmetic: fp32, or fp16 (compile --precision)
    #: compile --adaptive: candidate cuts, each {"name", "segments": [ids, run in that order],
    #: "device_ops", "predicted": {device_ms, cloud_ms, bytes_up, bytes_down}, ...}; ``segments``
    #: then holds every cut's segments (device pieces first, then one cloud suffix per cut).
    cuts: tuple[dict[str, Any], ...] = ()
    #: compile --decoder: a language model's decode and prefill segments over one KV cache, run by
    #: ``runtime.Generator``: {"decode": id, "prefill": [{"segment": id, "tokens": n}, …],
    #: "max_context", "cache": [[input, output], …], "weights", "tokenizer": file or null,
    #: "config": {stop, bos, chat_template, …}}.
    decoder: dict[str, Any] | None = None

    @property
    def serves_segments(self) -> bool:
        """A cloud artifact: independent segments served by endpoint, not one model run in order."""
        return self.role == "cloud"

    def to_dict(self) -> dict[str, Any]:
        d = {"schema": self.schema, "role": self.role, "model": self.model,
             "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
             "target": self.target, "segments": [s.to_dict() for s in self.segments],
             "files": [f.to_dict() for f in self.files], "versions": self.versions,
             "precision": self.precision}  # fmt: skip
        if self.tool is not None:
            d["tool"] = self.tool
        if self.plan is not None:
            d["plan"] = self.plan
        if self.cuts:
            d["cuts"] = [dict(c) for c in self.cuts]
        if self.decoder is not None:
            d["decoder"] = self.decoder
        return d

    def cut(self, name: str) -> dict[str, Any]:
        """The candidate cut of that name (UsageError naming the cuts there are)."""
        for c in self.cuts:
            if c["name"] == name:
                return c
        from .errors import UsageError

        have = ", ".join(c["name"] for c in self.cuts) or "none: it was not compiled with --adaptive"
        raise UsageError(f"no cut {name!r} in this artifact; its cuts: {have}")

    @classmethod
    def from_dict(cls, m: Any, where: str = "manifest.json") -> Manifest:
        """Validate a parsed manifest (ArtifactError saying what is wrong) and type it."""
        validate(m, where)
        return cls(
            model=m["model"], inputs=tuple(TensorSpec.from_dict(t) for t in m["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in m["outputs"]), target=m["target"],
            segments=tuple(Segment.from_dict(s) for s in m["segments"]),
            files=tuple(File.from_dict(f) for f in m["files"]), versions=m["versions"], schema=m["schema"],
            role=m.get("role", "device"), tool=m.get("tool"), plan=m.get("plan"),
            precision=m.get("precision", "fp32"), cuts=tuple(m.get("cuts") or ()), decoder=m.get("decoder"),
        )  # fmt: skip

    def dumps(self) -> str:
        return dumps(self.to_dict())


def safe_filename(name: str) -> str:
    """A tensor name as a file name: characters outside [A-Za-z0-9_.-] become ``_``."""
    out = _SAFE_NAME.sub("_", name)
    return "_" + out if out in ("", ".", "..") else out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> File:
    """The manifest's record of one file: path, sha256, size."""
    p = root / rel
    return File(rel, sha256_file(p), p.stat().st_size)


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON (sorted keys, fixed indent) so equal manifests are equal bytes."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def read(artifact_dir: Path) -> Manifest:
    """Load and validate ``manifest.json``; raises ArtifactError saying what is wrong."""
    path = Path(artifact_dir) / MANIFEST
    return loads(read_bytes(artifact_dir), str(path))


def read_bytes(artifact_dir: Path) -> bytes:
    """The raw bytes of ``manifest.json`` (a regular file, at most MAX_MANIFEST_BYTES).

    A signature covers exactly these bytes, so the caller verifies and parses the same copy.
    """
    path = Path(artifact_dir) / MANIFEST
    st = _lstat(path, f"{artifact_dir} is not an artifact: no {MANIFEST} in it", str(path))
    if not stat.S_ISREG(st.st_mode):
        # A FIFO would block the read forever; a link could point anywhere.
        raise ArtifactError(f"{path} is not a regular file (a link, pipe or device); artifacts hold plain files")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have; "
            "it is not a tvm-hybrid manifest"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} grew past {MAX_MANIFEST_BYTES >> 20} MiB while being read")
    return data


def _lstat(path: Path, missing: str, what: str) -> os.stat_result:
    """``os.lstat``, its errors as one-line ArtifactErrors: ``missing`` when absent."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(missing) from None
    except OSError as e:
        raise ArtifactError(f"cannot read {what}: {e.strerror or e}") from e


def loads(data: bytes, where: str = MANIFEST) -> Manifest:
    """Parse and validate manifest bytes; raises ArtifactError saying what is wrong."""
    try:
        m = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except ValueError as e:
        raise ArtifactError(f"{where} is not valid JSON: {e}") from e
    except RecursionError as e:  # "[[[[…" nested past Python's limit
        raise ArtifactError(f"{where} is not a manifest: JSON nested too deeply") from e
    return Manifest.from_dict(m, where)


def validate(m: Any, where: str = MANIFEST) -> None:
    """Check the manifest's shape; every field the runtime reads must be there, typed and consistent."""
    if not isinstance(m, dict):
        raise ArtifactError(f"{where}: manifest must be a JSON object")
    schema = m.get("schema")
    if schema not in READABLE_SCHEMAS:
        from . import __version__

        raise ArtifactError(
            f"{where}: schema {str(schema)[:80]!r} is not one this runtime (tvm-hybrid {__version__}) reads "
            f"({', '.join(READABLE_SCHEMAS)}); recompile the model with a matching tvm-hybrid"
        )
    _need(m, "model", dict, where)
    _need(m, "inputs", list, where)
    _need(m, "outputs", list, where)
    _need(m, "segments", list, where)
    _need(m, "files", list, where)
    _need(m, "versions", dict, where)
    _need(m, "target", dict, where)
    if not all(isinstance(v, str) for v in m["versions"].values()):
        raise ArtifactError(f"{where}: 'versions' values must be strings")
    tvm_target = m["target"].get("tvm_target")
    if tvm_target is not None and not (isinstance(tvm_target, dict) and isinstance(tvm_target.get("kind"), str)):
        raise ArtifactError(f"{where}: target.tvm_target must be an object with a 'kind'")
    for key in ("inputs", "outputs"):
        _tensors(m[key], f"{where}: {key}")
        for t in m[key]:  # the runtime checks feeds against these: artifacts are static-shaped
            if t.get("shape") is None:
                raise ArtifactError(f"{where}: {key[:-1]} {t['name'][:100]!r} has no shape")
    if not m["outputs"]:
        raise ArtifactError(f"{where}: the model has no outputs")
    paths = _files(m["files"], where)
    if not m["segments"] and not all(t.get("value") is not None for t in m["outputs"]):
        raise ArtifactError(f"{where}: no segments")
    # Data flow: each segment reads only model inputs or what an earlier segment wrote.
    known = {t["name"] for t in m["inputs"]}
    ids = set()
    for i, seg in enumerate(m["segments"]):
        w = f"{where}: segment {i}"
        if not isinstance(seg, dict):
            raise ArtifactError(f"{w} must be an object")
        for k, typ in (("id", int), ("placement", str), ("inputs", list), ("outputs", list)):
            _need(seg, k, typ, w)
        if seg["id"] in ids:
            raise ArtifactError(f"{w}: id {seg['id']} is used twice")
        ids.add(seg["id"])
        if seg["placement"] not in ("device", "cloud"):
            raise ArtifactError(f"{w}: placement must be 'device' or 'cloud', not {str(seg['placement'])[:40]!r}")
        for k in ("format", "library"):
            if k in seg and not isinstance(seg[k], str):
                raise ArtifactError(f"{w}: {k!r} must be a string")
        _tensors(seg["inputs"], w)
        _tensors(seg["outputs"], w)
        unknown = [t["name"] for t in seg["inputs"] if t["name"] not in known]
        if unknown and not serves_segments(m) and "decoder" not in m:  # a decoder's segments are alternatives
            raise ArtifactError(
                f"{w} reads {', '.join(map(repr, unknown[:5]))}, which neither the model inputs nor an earlier segment provide"
            )
        known.update(t["name"] for t in seg["outputs"])
        for key in ("library", "fallback_library", "onnx"):
            lib = seg.get(key)
            if lib is not None and (not isinstance(lib, str) or lib not in paths):
                raise ArtifactError(f"{w}: {key} {str(lib)[:200]!r} is not among the listed files")
        variants = seg.get("variants", [])
        if not isinstance(variants, list) or not all(
            isinstance(v, dict) and isinstance(v.get("library"), str) and v["library"] in paths
            and isinstance(v.get("tvm_target"), dict) and isinstance(v.get("profile"), str) for v in variants
        ):  # fmt: skip
            raise ArtifactError(f"{w}: variants must be objects with a profile, a tvm_target and a listed library")
        wts = seg.get("weights")
        if wts is not None:
            keys_ok = lambda k: isinstance(k, list) and all(isinstance(x, str) for x in k)  # noqa: E731
            if not (isinstance(wts, dict) and wts.get("file") in paths and keys_ok(wts.get("keys"))
                    and all(keys_ok(v.get("weights")) for v in variants)):  # fmt: skip
                raise ArtifactError(f"{w}: weights must name a listed file and the keys of every build")
        if seg["placement"] == "device" and "library" not in seg:
            raise ArtifactError(f"{w}: a device segment names no library")
        ep = seg.get("endpoint")
        if ep is not None and not (isinstance(ep, dict) and isinstance(ep.get("model"), str)
                                   and isinstance(ep.get("version"), str)):  # fmt: skip
            raise ArtifactError(f"{w}: endpoint needs model and version")
        if seg["placement"] == "cloud" and ep is None:
            raise ArtifactError(f"{w}: a cloud segment names no endpoint")
    unmade = [t["name"] for t in m["outputs"] if t["name"] not in known and t.get("value") is None]
    if unmade and not serves_segments(m):
        raise ArtifactError(f"{where}: no segment produces the output(s) {', '.join(map(repr, unmade[:5]))}")
    if "cuts" in m:
        _cuts(m, where)
    if "decoder" in m:
        _decoder(m, where)


def _decoder(m: dict[str, Any], where: str) -> None:
    """A decoder names its decode and prefill segments (device, each reading and writing every
    cache pair, and giving its result: logits, or the hidden row a split device half sends); a
    split one its layer count, the cloud's endpoint and its fallback (the same, for the cloud
    half built for the device); a cloud half its endpoint."""
    d = m["decoder"]
    w = f"{where}: decoder"
    if not isinstance(d, dict):
        raise ArtifactError(f"{w} must be an object")
    _decoder_half(m, d, w)
    if isinstance(d.get("max_context"), bool) or not isinstance(d.get("max_context"), int) or d["max_context"] < 1:
        raise ArtifactError(f"{w}: max_context must be a positive integer")
    if not isinstance(d.get("config", {}), dict):
        raise ArtifactError(f"{w}: config must be an object")
    tok = d.get("tokenizer")
    if tok is not None and tok not in {f.get("path") for f in m["files"] if isinstance(f, dict)}:
        raise ArtifactError(f"{w}: tokenizer {str(tok)[:100]!r} is not among the listed files")
    split = d.get("split")
    if split is not None:
        if not isinstance(split, dict) or not isinstance(split.get("layers"), int) or not isinstance(split.get("hidden"), str):
            raise ArtifactError(f"{w}: split must give layers and hidden")
        _endpoint_doc(split.get("endpoint"), f"{w}: split")
        if not isinstance(split.get("fallback"), dict):
            raise ArtifactError(f"{w}: split.fallback must describe the cloud half's device build")
        _decoder_half(m, split["fallback"], f"{w}: split.fallback")
    if m.get("role") == "cloud":
        _endpoint_doc(d.get("endpoint"), w)


def _endpoint_doc(ep: Any, w: str) -> None:
    if not (isinstance(ep, dict) and isinstance(ep.get("model"), str) and isinstance(ep.get("version"), str)):
        raise ArtifactError(f"{w}: endpoint needs model and version")


def _decoder_half(m: dict[str, Any], d: dict[str, Any], w: str) -> None:
    by_id = {s["id"]: s for s in m["segments"]}
    prefill = d.get("prefill")
    if not isinstance(prefill, list) or not prefill or not all(
            isinstance(p, dict) and isinstance(p.get("tokens"), int) and not isinstance(p["tokens"], bool)
            and p["tokens"] > 1 for p in prefill):  # fmt: skip
        raise ArtifactError(f"{w}: prefill must list {{segment, tokens}} chunks of 2 tokens or more")
    ids = [d.get("decode")] + [p.get("segment") for p in prefill]
    for sid in ids:
        if isinstance(sid, bool) or not isinstance(sid, int) or sid not in by_id or by_id[sid]["placement"] != "device":
            raise ArtifactError(f"{w}: decode and prefill must name device segments")
    cache = d.get("cache")
    if not isinstance(cache, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                              for p in cache):  # fmt: skip
        raise ArtifactError(f"{w}: cache must be a list of [input, output] name pairs")
    result = d.get("result", "logits")
    for sid in ids:
        seg = by_id[sid]
        ins, outs = {t["name"] for t in seg["inputs"]}, {t["name"] for t in seg["outputs"]}
        missing = [n for p in cache for n, have in ((p[0], ins), (p[1], outs)) if n not in have]
        if missing or result not in outs:
            raise ArtifactError(f"{w}: segment {sid} lacks {', '.join((missing or [str(result)])[:3])}")


def _cuts(m: dict[str, Any], where: str) -> None:
    """Each cut runs listed segments in its order, device ones first and at most one in the
    cloud, each reading only what the model inputs or its earlier segments give, and ends with
    every model output."""
    cuts = m["cuts"]
    if not isinstance(cuts, list) or not cuts:
        raise ArtifactError(f"{where}: cuts must be a non-empty list")
    by_id = {s["id"]: s for s in m["segments"]}
    names = set()
    for i, cut in enumerate(cuts):
        w = f"{where}: cut {i}"
        if not isinstance(cut, dict) or not isinstance(cut.get("name"), str) or not isinstance(cut.get("segments"), list):
            raise ArtifactError(f"{w} must be an object with a name and a list of segments")
        if cut["name"] in names:
            raise ArtifactError(f"{w}: name {cut['name'][:80]!r} is used twice")
        names.add(cut["name"])
        pred = cut.get("predicted")
        if not (isinstance(pred, dict) and all(isinstance(pred.get(k), (int, float))
                                               for k in ("device_ms", "cloud_ms", "bytes_up", "bytes_down"))):  # fmt: skip
            raise ArtifactError(f"{w}: predicted needs device_ms, cloud_ms, bytes_up and bytes_down numbers")
        known = {t["name"] for t in m["inputs"]}
        clouds = 0
        for sid in cut["segments"]:
            seg = by_id.get(sid) if isinstance(sid, int) and not isinstance(sid, bool) else None
            if seg is None:
                raise ArtifactError(f"{w} names segment {str(sid)[:20]}, which the manifest does not list")
            if clouds:
                raise ArtifactError(f"{w}: segment {sid} comes after its cloud segment (a cut is a device prefix and a cloud suffix)")
            clouds += seg["placement"] == "cloud"
            unknown = [t["name"] for t in seg["inputs"] if t["name"] not in known]
            if unknown:
                raise ArtifactError(f"{w}: segment {sid} reads {', '.join(map(repr, unknown[:5]))} before any segment of the cut writes it")
            known.update(t["name"] for t in seg["outputs"])
        unmade = [t["name"] for t in m["outputs"] if t["name"] not in known and t.get("value") is None]
        if unmade:
            raise ArtifactError(f"{w}: no segment of the cut produces the output(s) {', '.join(map(repr, unmade[:5]))}")
    default = (m.get("plan") or {}).get("default_cut")
    if default is not None and default not in names:
        raise ArtifactError(f"{where}: plan.default_cut {str(default)[:80]!r} names no cut")


def serves_segments(m: dict[str, Any]) -> bool:
    """A cloud artifact: independent segments served by endpoint, not one model run in order."""
    return m.get("role") == "cloud"


def _files(files: list, where: str) -> set[str]:
    """Check files[] entries: a normalized relative path each, once, with a sha256 and a size."""
    paths: set[str] = set()
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("sha256"), str):
            raise ArtifactError(f"{where}: every files[] entry needs path and sha256")
        p = f["path"]
        parts = p.split("/")
        if (
            p.startswith("/")
            or "\\" in p
            or "\0" in p
            or len(p) > 1024
            or any(part in ("", ".", "..") for part in parts)
            or PurePosixPath(p).is_absolute()
        ):
            raise ArtifactError(f"{where}: file path {p[:200]!r} escapes the artifact or is not a normalized relative path")
        if p in RESERVED:
            raise ArtifactError(f"{where}: files[] lists {p}, which cannot be checksummed by the manifest itself")
        if p in paths:
            raise ArtifactError(f"{where}: file {p!r} is listed twice")
        if not _SHA256.match(f["sha256"]):
            raise ArtifactError(f"{where}: file {p!r} has a malformed sha256 (64 lowercase hex digits expected)")
        size = f.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{where}: file {p!r} needs a size in bytes")
        paths.add(p)
    return paths


def _need(d: dict, key: str, typ: type, where: str) -> None:
    if key not in d:
        raise ArtifactError(f"{where}: missing {key!r}")
    if not isinstance(d[key], typ) or (typ is int and isinstance(d[key], bool)):
        raise ArtifactError(f"{where}: {key!r} must be a {typ.__name__}")


def _tensors(ts: list, where: str) -> None:
    names = set()
    for t in ts:
        _tensor(t, where)
        if t["name"] in names:
            raise ArtifactError(f"{where}: tensor {t['name'][:100]!r} is listed twice")
        names.add(t["name"])


def _tensor(t: Any, where: str) -> None:
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str):
        raise ArtifactError(f"{where}: tensor entries need name and dtype")
    if t["dtype"] not in DTYPES:
        raise ArtifactError(
            f"{where}: tensor {t['name'][:100]!r} has dtype {t['dtype'][:40]!r}; known: {', '.join(sorted(DTYPES))}"
        )
    shape = t.get("shape")
    if shape is not None and (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62 for x in shape)
    ):
        raise ArtifactError(f"{where}: tensor {t['name'][:100]!r} has a bad shape {str(shape)[:100]}")
    if t.get("value") is not None:
        import numpy as np

        try:
            ok = shape is not None and np.asarray(t["value"], dtype=np_dtype(t["dtype"])).shape == tuple(shape)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ArtifactError(f"{where}: tensor {t['name'][:100]!r} has a value that is not a {t['dtype']} "
                                f"tensor of its shape")  # fmt: skip


def verify_files(artifact_dir: Path, m: Manifest) -> None:
    """Check every listed file (plain, the listed size and sha256) before anything is loaded.

    The artifact may hold nothing else besides the manifest and its signature: an unlisted file
    (a stray .so next to the segment) is refused, so what is on disk is exactly what was signed.
    """
    root = Path(artifact_dir)
    for f in m.files:
        rel = f.path
        p = root / rel
        # Every component must be a real directory or file: a linked directory would let a
        # checked path lead outside the artifact.
        here = root
        for i, part in enumerate(rel.split("/")):
            here = here / part
            st = _lstat(here, f"artifact file {rel} is missing from {root}; recompile or re-download it",
                        f"artifact file {rel}")
            last = i == rel.count("/")
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"artifact file {rel} is (or is under) a symbolic link; artifacts hold plain files")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise ArtifactError(f"artifact file {rel}: {here.relative_to(root)} is not a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact file {rel} is not a regular file (a directory, pipe or device)")
        if st.st_size != f.size:
            raise ArtifactError(
                f"artifact file {rel} is {st.st_size} bytes, the manifest says {f.size}: "
                "the artifact was modified or damaged; recompile or re-download it"
            )
        digest = sha256_file(p)
        if digest != f.sha256:
            raise ArtifactError(
                f"artifact file {rel} fails its checksum (sha256 {digest[:12]}…, manifest says "
                f"{f.sha256[:12]}…): the artifact was modified or damaged; recompile or re-download it"
            )
    check_no_extra_files(root, m)


def check_no_extra_files(root: Path, m: Manifest) -> None:
    """Refuse files, links or special files in the artifact that the manifest does not list."""
    listed = {f.path for f in m.files} | set(RESERVED)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames + filenames:
            p = base / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                continue
            if rel not in listed:
                raise ArtifactError(
                    f"artifact holds {rel!r}, which its manifest does not list; an artifact holds only what the "
                    "compiler wrote: remove it, or recompile"
                )
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"artifact file {rel} is not a regular file (a link, pipe or device)")
