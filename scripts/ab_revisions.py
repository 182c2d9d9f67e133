#!/usr/bin/env python3
"""The same models compiled by two revisions of tvm-hybrid, timed against each other in one run.

Each revision is checked out into a temporary git worktree and compiles each model there (in a
subprocess with that tree's ``tvm_hybrid``, untuned, for ``--target``); this checkout's runtime
then loads both artifacts and times them with bench.py's interleaving (a second of warm-up each,
blocks of 5, medians), so the ratio comes from one machine state. onnxruntime is not involved.

    python scripts/ab_revisions.py HEAD~3 HEAD --model zoo:yolov8n-320 --model det
    python scripts/ab_revisions.py main WORKTREE --model minilm-l3       # WORKTREE: this checkout as it is

--model takes what bench.py's does: a name, zoo:NAME or an ONNX path (with --input NAME:DIMS[:DTYPE]).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402  (scripts/bench.py: the models and the interleaving)


def _tree(rev: str, tmp: Path) -> Path:
    """A checkout of ``rev`` (WORKTREE: this one, uncommitted changes included)."""
    if rev == "WORKTREE":
        return ROOT
    dest = tmp / f"tree-{len(list(tmp.iterdir()))}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(dest), rev], check=True)
    return dest


def _text(o) -> str:
    """An InputOverride as ``compile --input`` takes it."""
    if o.value is not None:
        import json

        return f"{o.name}={json.dumps(o.value)}"
    return f"{o.name}:{'x'.join(map(str, o.shape))}" + (f":{o.dtype}" if o.dtype else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="a git revision, or WORKTREE")
    ap.add_argument("new", help="a git revision, or WORKTREE")
    ap.add_argument("--model", action="append", required=True, metavar="NAME|PATH")
    ap.add_argument("--input", action="append", default=[], metavar="NAME:DIMS[:DTYPE]")
    ap.add_argument("--target", default="host")
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()

    import numpy as np

    from tvm_hybrid.compiler import importer
    from tvm_hybrid.runtime import Session

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "trees").mkdir()
        trees = {"old": _tree(args.old, tmp / "trees"), "new": _tree(args.new, tmp / "trees")}
        try:
            for spec in args.model:
                path, overrides = bench.resolve_model(spec, args.input)
                feeds = bench.random_feeds(np, importer.load(path, overrides).inputs)
                sessions = {}
                for which, tree in trees.items():
                    out = tmp / f"{which}-{len(sessions)}-{Path(path).stem}"
                    cmd = [sys.executable, "-m", "tvm_hybrid", "compile", str(path), "--target", args.target,
                           "-o", str(out), "--no-tuning-logs", *[a for o in overrides for a in ("--input", _text(o))]]  # fmt: skip
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    # cwd: `python -m` puts the working directory ahead of PYTHONPATH
                    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
                    if proc.returncode:
                        print(f"{spec}: {which} ({tree}) failed to compile:\n{proc.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    [seg] = [p for p in out.iterdir() if p.is_dir()]
                    sessions[which] = Session(seg)
                times = bench.interleaved({k: (lambda s=s: s.run(feeds)) for k, s in sessions.items()}, args.runs)
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"{spec}: {args.old} {med['old']:.2f} ms, {args.new} {med['new']:.2f} ms, "
                      f"new/old {med['new'] / med['old']:.3f}", flush=True)  # fmt: skip
                for s in sessions.values():
                    s.close()
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
