"""compile --decoder: a language model's decoder as one artifact that ``generate`` runs.

The ONNX contract (what ``scripts/gguf_decoder.py`` writes, and the static-cache layout
onnxruntime-genai uses): inputs ``input_ids`` [1, S] int64 (S symbolic), ``start`` [1] int64
(the first token's position), optionally ``last`` [1] int64 (whose logits to return), and a KV
cache as pairs ``past_<kind>.<layer>`` → ``present_<kind>.<layer>`` of one fixed shape [1, heads,
max_context, head_dim]; outputs ``logits`` [1, vocab] and the presents. It is compiled once per
sequence length — S = 1 (decode, one token a call) and S = each prefill chunk size (the prompt
a chunk at a time) — into segments over one weights file (shared by content), so any prompt
length up to the cache's runs without recompiling. ``tokenizer.json`` and ``llm.json`` beside
the model (stop tokens, BOS, chat template) travel in the artifact.

Split decoding: where the residual stream between layers is named ``hidden.<i>`` (the
embeddings ``hidden.0``) and everything positional derives from ``start`` and the stream's
shape, the decoder splits after layer k: the device keeps the embedding and layers < k (the
prompt's tokens never leave it) and its part of the KV cache; the cloud runs the rest with its
own cache, kept per sequence by ``serve``; per token one hidden row crosses. k is the most
layers the device's memory budget holds (``--memory``), or ``--split-layers``. The device
artifact also carries the cloud half built for the device (the fallback: on a cloud failure
the runtime rebuilds that cache from the rows it sent and goes on locally).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..errors import UnsupportedError, UsageError
from ..targets import TargetProfile, resolve
from . import backends, importer, tuning_log
from .package import WeightStore, _built, _manifest, _stage, _summary, compile_builds, dispatch_profiles, staging

CACHE_NAME = re.compile(r"^past_(\w+)\.(\d+)$")
HIDDEN_NAME = re.compile(r"^hidden\.(\d+)$")

#: Prefill chunk sizes: a short prompt pads to the small one, a long one runs in big ones (each
#: prefill call dequantizes the weights once, so fewer, larger calls win on long prompts).
CHUNKS = (16, 128)

def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def decoder_contract(model) -> dict[str, Any]:
    """The stream input, cache pairs and sizes of an ONNX decoder (or of one half of a split
    decoder: a ``hidden.<i>`` stream in place of input_ids, or out in place of logits);
    UsageError saying what breaks the contract."""
    init = {i.name for i in model.graph.initializer}
    ins = {i.name: i for i in model.graph.input if i.name not in init}
    outs = {o.name for o in model.graph.output}
    need = "inputs input_ids [1, S], start [1] (+ last [1]), past_<kind>.<n> and outputs logits, present_<kind>.<n>"
    stream = "input_ids" if "input_ids" in ins else next((n for n in ins if HIDDEN_NAME.match(n)), None)
    result = "logits" if "logits" in outs else next((n for n in outs if HIDDEN_NAME.match(n)), None)
    if stream is None or "start" not in ins or result is None:
        raise UsageError(f"not a decoder this compiler knows: it needs {need} (scripts/gguf_decoder.py writes one)")
    cache, shape = [], None
    for name, vi in ins.items():
        if name in (stream, "start", "last"):
            continue
        m = CACHE_NAME.match(name)
        present = f"present_{m.group(1)}.{m.group(2)}" if m else None
        if present not in outs:
            raise UsageError(f"decoder input {name!r} is neither input_ids, start, last nor a past_* cache "
                             f"with its present_* output ({need})")  # fmt: skip
        d = _dims(vi)
        if len(d) != 4 or not all(isinstance(x, int) and x > 0 for x in d) or (shape and d != shape):
            raise UsageError(f"decoder cache {name!r} has shape {d}; every cache must have one fixed shape "
                             "[1, heads, max_context, head_dim]")  # fmt: skip
        shape = d
        cache.append([name, present])
    if not cache:
        raise UsageError(f"the model has no KV cache inputs; a decoder needs {need}")
    ids = _dims(ins[stream])
    if len(ids) not in (2, 3) or ids[0] not in (1, None):
        raise UsageError(f"decoder input {stream} has shape {ids}; [1, S] expected")
    return {"cache": cache, "max_context": shape[2], "cache_shape": shape, "stream": stream, "stream_shape": ids,
            "result": result}  # fmt: skip


def layers_of(model) -> int:
    """How many ``hidden.<i>`` boundaries the graph names after the embeddings (0: not splittable)."""
    names = {o for n in model.graph.node for o in n.output if HIDDEN_NAME.match(o)}
    k = 0
    while f"hidden.{k + 1}" in names:
        k += 1
    return k if "hidden.0" in names else 0


def layer_bytes(model, weights: str | None) -> tuple[int, list[int], int]:
    """(shared bytes, bytes per layer, KV-cache bytes per layer) of the weights as compiled with
    ``weights``: initializers of one layer (between hidden.i and hidden.i+1) go to that layer,
    the ones several layers use (a tied embedding) are shared; 2-D weights at their packed size."""
    from . import weightquant

    n_layers = layers_of(model)
    level: dict[str, int] = {}
    first_use: dict[str, set[int]] = {}
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        lv = max([level.get(x, 0) for x in node.input if x] or [0])
        for x in node.input:
            if x in inits:
                first_use.setdefault(x, set()).add(lv)
        for o in node.output:
            m = HIDDEN_NAME.match(o)
            level[o] = int(m.group(1)) if m else lv
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits}
    per = [0] * max(n_layers, 1)
    shared = 0
    for name, uses in first_use.items():
        t = inits[name]
        n = 1
        for d in t.dims:
            n *= int(d)
        bits = weightquant.MODES.get(weights) if len(t.dims) == 2 else None
        if name in tables or len(uses) > 1 or min(uses) >= n_layers:  # embeddings (and a tied output layer)
            shared += weightquant.packed_bytes(n, 8 if bits else None)
        else:
            per[min(uses)] += weightquant.packed_bytes(n, bits)
    contract = decoder_contract(model)
    c = contract["cache_shape"]
    kv = 2 * c[0] * c[1] * c[2] * c[3] * 4  # a key and a value cache per layer
    return shared, per, kv


def choose_split(model, weights: str | None, memory_bytes: float) -> int | None:
    """The most layers the device holds within ``memory_bytes`` (weights, its cache, the shared
    embedding): None when the whole model fits; UnsupportedError when not even one layer does."""
    n = layers_of(model)
    shared, per, kv = layer_bytes(model, weights)
    total = shared + sum(per) + kv * n
    if total <= memory_bytes:
        return None
    if n < 2:
        raise UnsupportedError(f"the decoder needs {total / 2**20:.1f} MiB, over the device's {memory_bytes / 2**20:.1f} "
                               "MiB, and names no hidden.<i> layer boundaries to split at")  # fmt: skip
    used, k = shared, 0
    while k < n - 1 and used + per[k] + kv <= memory_bytes:
        used += per[k] + kv
        k += 1
    if k == 0:
        raise UnsupportedError(f"the device's {memory_bytes / 2**20:.1f} MiB hold not even the embeddings and one "
                               f"layer ({(shared + per[0] + kv) / 2**20:.1f} MiB)")  # fmt: skip
    return k


def split_decoder(model, k: int):
    """(device half, cloud half) of a decoder split after layer ``k`` (1 <= k < layers): the
    device half ends at ``hidden.k``, the cloud half starts there, each with its caches."""
    import onnx
    import onnx.utils

    n = layers_of(model)
    if not 1 <= k < n:
        raise UsageError(f"--split-layers {k}: the decoder has {n} layers to split between (1 .. {n - 1} on the device)"
                         if n else "the decoder names no hidden.<i> layer boundaries to split at")  # fmt: skip
    contract = decoder_contract(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    hidden = f"hidden.{k}"
    pairs = contract["cache"]
    layer_of = {p: int(CACHE_NAME.match(p).group(2)) for p, _ in pairs}
    dev_in = ["input_ids", "start"] + [p for p, _ in pairs if layer_of[p] < k]
    dev_out = [hidden] + [q for p, q in pairs if layer_of[p] < k]
    device = onnx.utils.Extractor(inferred).extract_model(dev_in, dev_out)
    # The cloud half derives the sequence length from the stream it receives: every hidden.<i>
    # has the embeddings' shape, so Shape(hidden.0) may read hidden.k instead.
    cloud_src = onnx.ModelProto()
    cloud_src.CopyFrom(inferred)
    for node in cloud_src.graph.node:
        if node.op_type == "Shape" and list(node.input) == ["hidden.0"]:
            node.input[0] = hidden
    has_last = any(i.name == "last" for i in model.graph.input)
    cl_in = [hidden, "start"] + (["last"] if has_last else []) + [p for p, _ in pairs if layer_of[p] >= k]
    cl_out = [contract["result"]] + [q for p, q in pairs if layer_of[p] >= k]
    cloud = onnx.utils.Extractor(cloud_src).extract_model(cl_in, cl_out)
    for half, where in ((device, "device"), (cloud, "cloud")):
        if where == "cloud" and any("input_ids" in n.input for n in half.graph.node):
            raise UsageError(f"the decoder's layers after hidden.{k} read input_ids: it cannot be split there")
        decoder_contract(half)
    return device, cloud


@dataclasses.dataclass
class _Half:
    """One decoder (or half) compiled into an artifact's segments."""

    doc: dict[str, Any]
    entries: list[mf.Segment]
    files: list[str]
    top: importer.ImportedModel


def _build_half(proto, name: str, sha: str, profile: TargetProfile, stage: Path, store: WeightStore, chunks,
                weights: str | None, tuning_dir: Path | None, first_id: int, prefix: str = "",
                tied: frozenset = frozenset()) -> _Half:  # fmt: skip
    tuning = tuning_log.open_database(tuning_dir, profile) if tuning_dir else None
    contract = decoder_contract(proto)
    stream, sshape = contract["stream"], contract["stream_shape"]
    entries, files, top = [], [], None
    # A portable profile's dispatch builds (AVX2, AVX-512 …), one weights copy for all: the
    # runtime loads the best this CPU runs, as it does for any segment.
    variants = [(v, tuning_log.open_database(tuning_dir, v) if tuning_dir else None)
                for v in dispatch_profiles(profile) if backends.for_profile(v).builds_differently(v, proto)]  # fmt: skip
    for sid, (role, seq) in enumerate([("decode", 1)] + [(f"prefill{c}", c) for c in chunks], start=first_id):
        dims = (1, seq) if len(sshape) == 2 else (1, seq, int(sshape[2]))
        imp = importer.prepare(proto, [importer.InputOverride(stream, dims)])
        imp.name, imp.sha256 = name, sha
        c, built = compile_builds(imp, profile, stage, prefix + role, tuning, "fp32", variants, files, store, weights, tied)
        entries.append(mf.Segment(id=sid, placement="device", nodes=(), inputs=tuple(imp.inputs),
                                  outputs=tuple(imp.outputs), predicted={"tokens": seq}, **_built(c),
                                  variants=tuple(built),
                                  weights={"file": "segments/weights.npz", "keys": c.weight_keys}))  # fmt: skip
        top = top or imp
    doc = {"decode": first_id, "prefill": [{"segment": first_id + 1 + i, "tokens": c} for i, c in enumerate(chunks)],
           "cache": contract["cache"], "stream": stream, "result": contract["result"]}  # fmt: skip
    return _Half(doc, entries, files, top)


def compile_decoder(model: Path, target: str, output: Path, chunks: tuple[int, ...] = CHUNKS, weights: str | None = "q4",
                    tuning_logs: Path | None = None, memory: float | None = None, split_layers: int | None = None,
                    cloud: str | None = "cloud-x86"):  # fmt: skip
    """Build ``output/<target>/`` (and ``output/<cloud>/`` for a split): the decode and prefill
    segments, weights, tokenizer; atomically. Returns the artifact summaries."""
    from . import weightquant

    profile = resolve(target)
    backends.for_profile(profile).check_toolchain(profile)
    if profile.placement != "device":
        raise UsageError(f"--decoder builds a device artifact; {profile.name} is a cloud profile")
    weightquant.check_mode(weights, profile)  # before the model is read: a GPU target fails at once
    chunks = tuple(sorted(set(int(c) for c in chunks)))
    if not chunks or chunks[0] < 2:
        raise UsageError(f"--chunk {','.join(map(str, chunks))}: a prefill chunk holds 2 tokens or more "
                         "(decode runs one at a time)")  # fmt: skip
    model = Path(model)
    proto, sha = importer.read(model)
    contract = decoder_contract(proto)
    tied = weightquant.embedding_digests(proto) if weights else frozenset()
    if contract["stream"] != "input_ids" or contract["result"] != "logits":
        raise UsageError("the model is one half of a split decoder; compile the whole decoder")
    if chunks[-1] > contract["max_context"]:
        raise UsageError(f"--chunk {chunks[-1]} is longer than the cache ({contract['max_context']} tokens)")
    k = split_layers
    if k is None:
        budget = memory if memory is not None else float(profile.capacity.get("memory_bytes", float("inf")))
        k = choose_split(proto, weights, budget)
    cloud_prof = None
    if k is not None:
        if cloud is None:
            raise UsageError(f"the decoder does not fit the device ({'--split-layers' if split_layers else 'memory budget'})"
                             " and --cloud none leaves it nowhere else to run")  # fmt: skip
        cloud_prof = resolve(cloud)
        if cloud_prof.placement != "cloud":
            raise UsageError(f"--cloud {cloud_prof.name} is a device profile")
        backends.for_profile(cloud_prof).check_toolchain(cloud_prof)
    out = Path(output)
    summaries = []
    t0 = time.perf_counter()
    with staging(out) as staged:
        stage = _stage(out, profile.name, staged)
        store = WeightStore()
        config, tokenizer, extra = {}, None, []
        if (model.parent / "llm.json").is_file():
            config = json.loads((model.parent / "llm.json").read_text())
        if (model.parent / "tokenizer.json").is_file():
            shutil.copyfile(model.parent / "tokenizer.json", stage / "tokenizer.json")
            tokenizer = "tokenizer.json"
            extra.append(tokenizer)
        common = {"max_context": contract["max_context"], "weights": weights or "fp32", "tokenizer": tokenizer,
                  "config": {k2: config[k2] for k2 in ("name", "bos", "stop", "chat_template", "vocab") if k2 in config}}  # fmt: skip
        if k is None:
            half = _build_half(proto, model.stem, sha, profile, stage, store, chunks, weights, tuning_logs, 0, tied=tied)
            doc = {**half.doc, **common}
            halves = [half]
        else:
            dev_proto, cloud_proto = split_decoder(proto, k)
            half = _build_half(dev_proto, model.stem, sha, profile, stage, store, chunks, weights, tuning_logs, 0, tied=tied)
            n_seg = len(half.entries)
            # The cloud half built for the device too: the runtime's fallback when the cloud fails.
            back = _build_half(cloud_proto, model.stem, sha, profile, stage, store, chunks, weights, tuning_logs, n_seg,
                               "fallback-", tied)  # fmt: skip
            endpoint = {"model": re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model.stem}-decoder-{k}"),
                        "version": hashlib.sha256(f"{sha}:{k}:{weights}:{chunks}".encode()).hexdigest()[:12]}  # fmt: skip
            doc = {**half.doc, **common,
                   "split": {"layers": k, "of": layers_of(proto), "hidden": f"hidden.{k}", "endpoint": endpoint,
                             "fallback": back.doc}}  # fmt: skip
            halves = [half, back]
        store.save(stage / "segments/weights.npz")
        files = [f for h in halves for f in h.files] + ["segments/weights.npz", *extra]
        m = _manifest(half.top, profile, [e for h in halves for e in h.entries], stage, files, decoder=doc)
        (stage / mf.MANIFEST).write_text(m.dumps())
        summaries.append(_summary(profile.name, out, m, t0))
        if k is not None:
            t1 = time.perf_counter()
            cstage = _stage(out, cloud_prof.name, staged)
            cstore = WeightStore()
            cweights = weights if backends.for_profile(cloud_prof).cpu else None
            chalf = _build_half(cloud_proto, model.stem, sha, cloud_prof, cstage, cstore, chunks, cweights, tuning_logs, 0,
                                tied=tied)  # fmt: skip
            cstore.save(cstage / "segments/weights.npz")
            cdoc = {**chalf.doc, **common, "tokenizer": None, "weights": cweights or "fp32", "endpoint": endpoint}
            cm = _manifest(chalf.top, cloud_prof, chalf.entries, cstage, chalf.files + ["segments/weights.npz"],
                           role="cloud", decoder=cdoc)  # fmt: skip
            (cstage / mf.MANIFEST).write_text(cm.dumps())
            summaries.append(_summary(cloud_prof.name, out, cm, t1))
    return summaries
