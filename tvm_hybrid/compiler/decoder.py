"""compile --decoder: a language model's decoder as one artifact that ``generate`` runs.

The ONNX contract (what ``scripts/gguf_decoder.py`` writes, and the static-cache layout
onnxruntime-genai uses): inputs ``input_ids`` [1, S] int64 (S symbolic), ``start`` [1] int64
(the first token's position), optionally ``last`` [1] int64 (whose logits to return), and a KV
cache as pairs ``past_<kind>.<layer>`` → ``present_<kind>.<layer>`` of one fixed shape [1, heads,
max_context, head_dim]; outputs ``logits`` [1, vocab] and the presents. It is compiled twice —
S = 1 (decode, one token a call) and S = each prefill chunk size (the prompt a chunk at a time)
— into segments over one weights file (shared by content), so any prompt length up to the
cache's runs without recompiling. ``tokenizer.json`` and ``llm.json`` beside the model (stop
tokens, BOS, chat template) travel in the artifact.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import UnsupportedError, UsageError
from ..targets import resolve
from . import backends, importer, tuning_log
from .package import ArtifactSummary, WeightStore, _built, _manifest, _replace_dir, _stage, _summary, compile_segment
from .. import manifest as mf

CACHE_NAME = re.compile(r"^past_(\w+)\.(\d+)$")


def decoder_contract(model) -> dict[str, Any]:
    """The cache pairs and sizes of an ONNX decoder (UsageError saying what breaks the contract)."""
    init = {i.name for i in model.graph.initializer}
    ins = {i.name: i for i in model.graph.input if i.name not in init}
    outs = {o.name for o in model.graph.output}

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]

    need = "inputs input_ids [1, S], start [1] (+ last [1]), past_<kind>.<n> and outputs logits, present_<kind>.<n>"
    if "input_ids" not in ins or "start" not in ins or "logits" not in outs:
        raise UsageError(f"not a decoder this compiler knows: it needs {need} (scripts/gguf_decoder.py writes one)")
    cache, shape = [], None
    for name, vi in ins.items():
        if name in ("input_ids", "start", "last"):
            continue
        m = CACHE_NAME.match(name)
        present = f"present_{m.group(1)}.{m.group(2)}" if m else None
        if present not in outs:
            raise UsageError(f"decoder input {name!r} is neither input_ids, start, last nor a past_* cache "
                             f"with its present_* output ({need})")  # fmt: skip
        d = dims(vi)
        if len(d) != 4 or not all(isinstance(x, int) and x > 0 for x in d) or (shape and d != shape):
            raise UsageError(f"decoder cache {name!r} has shape {d}; every cache must have one fixed shape "
                             "[1, heads, max_context, head_dim]")  # fmt: skip
        shape = d
        cache.append([name, present])
    if not cache:
        raise UsageError(f"the model has no KV cache inputs; a decoder needs {need}")
    ids = dims(ins["input_ids"])
    if len(ids) != 2 or ids[0] not in (1, None):
        raise UsageError(f"decoder input_ids has shape {ids}; [1, S] expected")
    return {"cache": cache, "max_context": shape[2], "cache_shape": shape}


#: Prefill chunk sizes: a short prompt pads to the small one, a long one runs in big ones (each
#: prefill call dequantizes the weights once, so fewer, larger calls win on long prompts).
CHUNKS = (16, 128)


def compile_decoder(model: Path, target: str, output: Path, chunks: tuple[int, ...] = CHUNKS, weights: str | None = "q4",
                    tuning_logs: Path | None = None) -> ArtifactSummary:  # fmt: skip
    """Build ``output/<target>/``: the decode and prefill segments, weights, tokenizer; atomically."""
    from . import weightquant

    weightquant.check_mode(weights)
    profile = resolve(target)
    backend = backends.for_profile(profile)
    backend.check_toolchain(profile)
    if profile.placement != "device":
        raise UsageError(f"--decoder builds a device artifact; {profile.name} is a cloud profile")
    if weights is not None and not backend.cpu:
        raise UnsupportedError(f"--weights {weights}: quantized-weight kernels exist for CPU targets only, not {profile.name}")
    chunks = tuple(sorted(set(int(c) for c in chunks)))
    if not chunks or chunks[0] < 2:
        raise UsageError(f"--chunk {','.join(map(str, chunks))}: a prefill chunk holds 2 tokens or more "
                         "(decode runs one at a time)")  # fmt: skip
    model = Path(model)
    data = _read(model)
    import hashlib

    digest = hashlib.sha256(data)
    proto = importer.parse(data, str(model), base_dir=model.parent, digest=digest)
    contract = decoder_contract(proto)
    if chunks[-1] > contract["max_context"]:
        raise UsageError(f"--chunk {chunks[-1]} is longer than the cache ({contract['max_context']} tokens)")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    t0 = time.perf_counter()
    try:
        stage = _stage(out, profile.name, staged)
        tuning = tuning_log.open_database(tuning_logs, profile) if tuning_logs else None
        store = WeightStore()
        files: list[str] = []
        entries = []
        for sid, (role, seq) in enumerate([("decode", 1)] + [(f"prefill{c}", c) for c in chunks]):
            imp = importer.prepare(proto, [importer.InputOverride("input_ids", (1, seq))])
            imp.name, imp.sha256 = model.stem, digest.hexdigest()
            c = compile_segment(imp, profile, stage, role, tuning, "fp32", store, weights)
            entries.append(mf.Segment(id=sid, placement="device", nodes=(), inputs=tuple(imp.inputs),
                                      outputs=tuple(imp.outputs), predicted={"tokens": seq}, **_built(c),
                                      weights={"file": "segments/weights.npz", "keys": c.weight_keys}))  # fmt: skip
            files += c.files
            top = imp
        store.save(stage / "segments/weights.npz")
        files.append("segments/weights.npz")
        config, tokenizer = {}, None
        if (model.parent / "llm.json").is_file():
            config = json.loads((model.parent / "llm.json").read_text())
        if (model.parent / "tokenizer.json").is_file():
            shutil.copyfile(model.parent / "tokenizer.json", stage / "tokenizer.json")
            tokenizer = "tokenizer.json"
            files.append(tokenizer)
        doc = {"decode": 0, "prefill": [{"segment": i + 1, "tokens": c} for i, c in enumerate(chunks)],
               "max_context": contract["max_context"],
               "cache": contract["cache"], "weights": weights or "fp32", "tokenizer": tokenizer,
               "config": {k: config[k] for k in ("name", "bos", "stop", "chat_template", "vocab") if k in config}}  # fmt: skip
        m = _manifest(top, profile, entries, stage, files, decoder=doc)
        (stage / mf.MANIFEST).write_text(m.dumps())
        summary = _summary(profile.name, out, m, t0)
        _replace_dir(stage, out / profile.name)
    except BaseException:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return summary


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read model {path}: {e.strerror or e}") from e
