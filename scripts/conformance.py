#!/usr/bin/env python3
"""ONNX's backend node tests through tvm-hybrid's real path, beside onnxruntime on the same cases.

Each case the installed onnx wheel generates (``onnx.backend.test.case.node.collect_testcases``)
is written to a file, compiled for ``host`` with ``compile_model`` (what ``tvm-hybrid compile``
runs, no cloud, no tuning log), run with the runtime's ``Session`` (1 thread) and compared with
the expected outputs at the case's own tolerances, the way ONNX's backend runner compares them
(same shape, same dtype, ``assert_allclose(rtol, atol)``). onnxruntime runs the same case in the
same process first. Every case runs in its own process, forked from this one once TVM is loaded,
with a timeout; ``--jobs`` of them at a time.

    python scripts/conformance.py                          # every case, a table by reason
    python scripts/conformance.py --filter 'test_(lstm|gru|rnn)' -v
    python scripts/conformance.py --jobs 2 --json conformance.json --markdown docs/conformance.md
    python scripts/conformance.py --cases tests/conformance_cases.txt --expect-pass   # CI's subset

A failure is classified by where it stopped:

  unsupported_op   an op type TVM's ONNX frontend has no converter for (or a non-tensor type)
  shape_inference  ONNX shape inference (or our shape fixing) refused the model
  import           the frontend has the op but failed to convert this node
  legalization     Relax could not turn an op into kernels (LegalizeOps and the fusion passes)
  codegen          scheduling, lowering or LLVM failed
  runtime          the artifact loaded or ran with an error
  wrong_numbers    it ran and an output differs (shape, dtype or values) from the expected one
  crash            the process died (a signal) or reported nothing
  timeout          it took longer than --timeout seconds

Exit status: 0; with --expect-pass, 1 when any case listed fails (CI's regression check).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's tvm_hybrid, whatever is installed

REASONS = ("unsupported_op", "shape_inference", "import", "legalization", "codegen", "runtime",
           "wrong_numbers", "crash", "timeout")  # fmt: skip


def collect(pattern: str | None = None, names: list[str] | None = None):
    """The node test cases, by name, filtered by a regex and/or a list of names."""
    import numpy as np
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases(None) if c.kind == "node"]
    if pattern:
        rx = re.compile(pattern)
        cases = [c for c in cases if rx.search(c.name)]
    if names is not None:
        wanted = set(names)
        cases = [c for c in cases if c.name in wanted]
    return sorted(cases, key=lambda c: c.name)


def op_of(case) -> str:
    """The op a node test tests: its graph's one node, or the first not-Constant one."""
    ops = [n.op_type for n in case.model.graph.node if n.op_type != "Constant"]
    return ops[0] if ops else "Constant"


def ops_of(cases) -> dict[str, str]:
    """The op of every case; an "_expanded" case (the op's function body) counts for its op."""
    ops = {c.name: op_of(c) for c in cases}
    for name in ops:
        base = name.removesuffix("_expanded")
        if base != name and base in ops:
            ops[name] = ops[base]
    return ops


def compare(outputs: list, expected: list, rtol: float, atol: float) -> str | None:
    """None when every output matches as ONNX's backend runner requires, else what differs."""
    import numpy as np

    if len(outputs) != len(expected):
        return f"{len(outputs)} outputs, expected {len(expected)}"
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        if isinstance(ref, (list, tuple)) or ref is None:
            return f"output {i}: expected a {type(ref).__name__}, not a tensor"
        out = np.asarray(out)
        if out.shape != ref.shape:
            return f"output {i}: shape {out.shape}, expected {ref.shape}"
        if ref.dtype == object or ref.dtype.kind in "SU":
            if not np.array_equal(out.astype(object), ref):
                return f"output {i}: strings differ"
            continue
        if out.dtype != ref.dtype:
            return f"output {i}: dtype {out.dtype}, expected {ref.dtype}"
        r = rtol
        if out.dtype.name == "bfloat16":  # as ONNX's runner: two bfloat16 ULPs, compared in float32
            r, out, ref = max(rtol, 2**-6), out.astype(np.float32), ref.astype(np.float32)
        try:
            with np.errstate(all="ignore"):
                np.testing.assert_allclose(out, ref, rtol=r, atol=atol)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("Mismatched", "Max abs"))]
            return f"output {i}: " + "; ".join(lines)
    return None


def _feeds(case, inputs: list) -> dict:
    names = [vi.name for vi in case.model.graph.input]
    return dict(zip(names, (_array(x) for x in inputs)))


def _array(x):
    """Data sets hold numpy arrays, or TensorProtos for types numpy lacks (bfloat16, float8)."""
    import onnx

    return onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x


def run_onnxruntime(case) -> tuple[bool, str]:
    """(passed, detail) for onnxruntime on every data set of the case."""
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.log_severity_level = 4
        sess = ort.InferenceSession(case.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = [o.name for o in case.model.graph.output]
        for inputs, expected in case.data_sets:
            got = sess.run(outs, _feeds(case, inputs))
            diff = compare(got, [_array(x) for x in expected], case.rtol, case.atol)
            if diff:
                return False, diff
        return True, ""
    except Exception as e:
        return False, _line(e)


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400]


def _frames(tb) -> set[str]:
    return {f.name for f in traceback.extract_tb(tb)}


def run_tvm(case, work: Path) -> tuple[str, str]:
    """("passed"|reason, detail) for tvm-hybrid: compile for host, run with Session."""
    import numpy as np
    import onnx

    from tvm_hybrid.compiler import importer, package
    from tvm_hybrid.compiler.package import CompileOptions, compile_model
    from tvm_hybrid.targets import resolve
    from tvm_hybrid.errors import UnsupportedError, UsageError
    from tvm_hybrid.runtime.session import Session

    path = work / f"{case.name}.onnx"
    onnx.save(case.model, path)
    data = [([_array(x) for x in ins], [_array(x) for x in outs]) for ins, outs in case.data_sets]
    # Where does it stop? Import on its own first, so the reason names the stage.
    bound: list[str] = []
    for attempt in range(2):
        overrides = [importer.InputOverride(n, tuple(np.shape(v)), None, np.asarray(v).tolist())
                     for n, v in _feeds(case, data[0][0]).items() if n in bound]  # fmt: skip
        try:
            imported = importer.load(path, overrides)
            break
        except UsageError as e:
            return ("shape_inference" if "shape" in str(e) or "dims" in str(e) else "import"), _line(e)
        except UnsupportedError as e:
            # An output shape that depends on an input's value (axes, sizes): fixed at compile
            # time to the case's value, as `--input NAME=VALUE` does.
            if attempt == 0 and getattr(e, "shape_inputs", None):
                bound = e.shape_inputs
                continue
            return "unsupported_op", _line(e)
        except Exception as e:
            return "import", _line(e)
    bad = importer.unsupported_ops(imported)
    if bad:
        return "unsupported_op", f"no converter for {', '.join(bad)}"
    try:  # as compile does: the backend's preparation (fp16 computed in fp32 on CPUs), then Relax
        importer.to_relax(package.prepare(imported, resolve("host")))
    except Exception as e:
        return "import", _line(e)
    out = work / "out"
    try:
        summaries = compile_model(CompileOptions(model=path, targets=("host",), output=out, cloud=None,
                                                 inputs=tuple(overrides), tuning_logs=None))  # fmt: skip
    except Exception as e:
        frames = _frames(e.__traceback__)
        if isinstance(e, UnsupportedError) and "unsupported ops" in str(e):
            return "unsupported_op", _line(e)
        if "no kernel for Relax ops" in str(e) or "fuse" in frames:
            return "legalization", _line(e)
        return "codegen", _line(e)
    try:
        sess = Session(summaries[0].path, threads=1)
        outs = [o.name for o in case.model.graph.output]
        for inputs, expected in data:
            feeds = _feeds(case, inputs)
            if any(not np.array_equal(feeds[n], data[0][0][k]) for k, n in enumerate(feeds) if n in bound):
                continue  # another value of a fixed input: another compile (not done here)
            res = sess.run(feeds)
            diff = compare([res[o] for o in outs], expected, case.rtol, case.atol)
            if diff:
                return "wrong_numbers", diff
        sess.close()
    except Exception as e:
        return "runtime", _line(e)
    return "passed", f"inputs fixed at compile time: {', '.join(bound)}" if bound else ""


def _child(case, result_path: Path) -> None:
    """In the forked process: both engines, one JSON line each, written as soon as known."""
    import numpy as np

    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    with open(result_path, "w") as f:
        ok, detail = run_onnxruntime(case)
        f.write(json.dumps({"onnxruntime": ok, "onnxruntime_detail": detail}) + "\n")
        f.flush()
        with tempfile.TemporaryDirectory(prefix="conformance-") as work:
            status, detail = run_tvm(case, Path(work))
        f.write(json.dumps({"status": status, "detail": detail}) + "\n")


def run_all(cases, jobs: int, timeout: float, verbose: bool = False, log=sys.stderr) -> dict[str, dict]:
    """Every case in its own forked process, ``jobs`` at a time; results by case name."""
    # Load what the children use once, here: each fork starts with TVM, onnx and onnxruntime imported.
    import onnxruntime  # noqa: F401
    import tvm  # noqa: F401
    import tvm.relax.frontend.onnx  # noqa: F401

    from tvm_hybrid.compiler import package  # noqa: F401
    from tvm_hybrid.runtime import session  # noqa: F401

    results: dict[str, dict] = {}
    ops = ops_of(cases)
    pending = list(reversed(cases))
    running: dict[int, tuple] = {}  # pid: (case, result file, start)
    tmp = Path(tempfile.mkdtemp(prefix="conformance-results-"))
    done = 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                case = pending.pop()
                rpath = tmp / f"{case.name}.jsonl"
                pid = os.fork()
                if pid == 0:  # child
                    code = 0
                    try:
                        os.setpgid(0, 0)
                        devnull = os.open(os.devnull, os.O_WRONLY)
                        os.dup2(devnull, 1)
                        os.dup2(devnull, 2)
                        _child(case, rpath)
                    except BaseException:
                        code = 1
                    finally:
                        os._exit(code)
                running[pid] = (case, rpath, time.monotonic())
            pid, status = _wait_any(running, timeout)
            if pid is None:
                continue
            case, rpath, t0 = running.pop(pid)
            res = _read(rpath)
            if status == "timeout":
                res.update(status="timeout", detail=f"no result within {timeout:.0f} s")
            elif "status" not in res:
                res.update(status="crash", detail=status or "the process reported nothing")
            res.setdefault("onnxruntime", False)
            res["op"] = ops[case.name]
            res["seconds"] = round(time.monotonic() - t0, 2)
            results[case.name] = res
            done += 1
            if verbose or (res["status"] != "passed" and log is not None and verbose is None):
                print(f"[{done}/{len(cases)}] {case.name}: {res['status']} {res.get('detail', '')}"[:300], file=log)
            elif log is not None and done % 100 == 0:
                print(f"[{done}/{len(cases)}]", file=log)
    finally:
        for pid in running:
            _kill(pid)
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return results


def _wait_any(running: dict, timeout: float):
    """(pid, None | "signal N" | "exit N" | "timeout") of a finished or overdue child; (None, None)
    after a short wait with neither."""
    deadline = time.monotonic() + 0.5
    while True:
        pid, st = os.waitpid(-1, os.WNOHANG)
        if pid in running:
            if os.WIFSIGNALED(st):
                return pid, f"killed by signal {os.WTERMSIG(st)} ({signal.Signals(os.WTERMSIG(st)).name})"
            code = os.WEXITSTATUS(st)
            return pid, (None if code == 0 else f"exit {code}")
        now = time.monotonic()
        for p, (_, _, t0) in running.items():
            if now - t0 > timeout:
                _kill(p)
                os.waitpid(p, 0)
                return p, "timeout"
        if now > deadline:
            return None, None
        time.sleep(0.01)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read(path: Path) -> dict:
    res: dict = {}
    try:
        for line in path.read_text().splitlines():
            res.update(json.loads(line))
    except (OSError, ValueError):
        pass
    return res


def summary(results: dict[str, dict]) -> dict:
    by_reason = collections.Counter(r["status"] for r in results.values() if r["status"] != "passed")
    passed = sum(r["status"] == "passed" for r in results.values())
    return {
        "passed": passed,
        "failed": len(results) - passed,
        "total": len(results),
        "wrong_numbers": by_reason.get("wrong_numbers", 0),
        "by_reason": {k: by_reason[k] for k in REASONS if by_reason.get(k)},
        "onnxruntime": {"passed": sum(bool(r["onnxruntime"]) for r in results.values()), "total": len(results)},
    }


def passing_subset(results: dict[str, dict], per_op: int, info: dict) -> str:
    """The passing cases, at most ``per_op`` of each op (the plain case first, then an expanded
    one), one name a line under a header saying how they were chosen."""
    by_op: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(results, key=lambda n: (n.endswith("_expanded"), n)):
        if results[name]["status"] == "passed":
            by_op[results[name]["op"]].append(name)
    chosen = sorted(n for names in by_op.values() for n in names[:per_op])
    head = (f"# ONNX node tests that pass through compile and run: at most {per_op} per op, from a full run of\n"
            f"# scripts/conformance.py on {info['date']} ({', '.join(f'{k} {v}' for k, v in info['versions'].items())}).\n"
            f"# CI runs them (tests/test_conformance.py); remake with --write-passing FILE --per-op {per_op}.\n")
    return head + "\n".join(chosen) + "\n"


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import tvm

    from tvm_hybrid import __version__

    return {"tvm-hybrid": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}  # fmt: skip


def markdown(results: dict[str, dict], info: dict) -> str:
    s = summary(results)
    ops: dict[str, list] = collections.defaultdict(list)
    for r in results.values():
        ops[r["op"]].append(r)
    pct = 100.0 * s["passed"] / max(s["total"], 1)
    ort = s["onnxruntime"]
    lines = [
        "# ONNX backend node tests: conformance",
        "",
        f"{info['date']}, `python scripts/conformance.py --markdown docs/conformance.md` on {info['machine']}: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "",
        f"**tvm-hybrid {s['passed']} of {s['total']} ({pct:.1f}%)**, wrong numbers {s['wrong_numbers']}; "
        f"onnxruntime on the same cases in the same run: {ort['passed']} of {ort['total']} "
        f"({100.0 * ort['passed'] / max(ort['total'], 1):.1f}%).",
        "",
        "Failures by reason: " + (", ".join(f"{k} {v}" for k, v in s["by_reason"].items()) or "none") + ".",
        "",
        "| op | cases | tvm-hybrid | onnxruntime | why not (first failing case) |",
        "|---|---:|---:|---:|---|",
    ]
    for op in sorted(ops):
        rs = ops[op]
        ok = sum(r["status"] == "passed" for r in rs)
        ok_ort = sum(bool(r["onnxruntime"]) for r in rs)
        fail = next((r for r in rs if r["status"] != "passed"), None)
        why = f"{fail['status']}: {fail['detail'][:120]}".replace("|", "/") if fail else ""
        lines.append(f"| {op} | {len(rs)} | {ok} | {ok_ort} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", "-j", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--filter", help="regex on case names (test_conv_...)")
    ap.add_argument("--cases", type=Path, help="file of case names, one a line (# comments)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    ap.add_argument("--json", type=Path, help="write the summary and every case's result")
    ap.add_argument("--markdown", type=Path, help="write the per-op table")
    ap.add_argument("--expect-pass", action="store_true", help="exit 1 when any selected case fails")
    ap.add_argument("--write-passing", type=Path, metavar="FILE",
                    help="write the passing cases, at most --per-op of each op (CI's fixed subset)")
    ap.add_argument("--per-op", type=int, default=3)
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    args = ap.parse_args(argv)
    names = None
    if args.cases:
        names = [ln.split("#")[0].strip() for ln in args.cases.read_text().splitlines()]
        names = [n for n in names if n]
    cases = collect(args.filter, names)
    if names is not None:
        missing = sorted(set(names) - {c.name for c in cases})
        if missing:
            print(f"error: no such case(s) in this onnx: {', '.join(missing[:10])}", file=sys.stderr)
            return 2
    if not cases:
        print("error: no case matches", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    results = run_all(cases, max(1, args.jobs), args.timeout, verbose=args.verbose or None)
    s = summary(results)
    info = {"date": datetime.date.today().isoformat(), "versions": versions(), "seconds": round(time.monotonic() - t0, 1),
            "machine": f"{os.uname().machine}, {len(os.sched_getaffinity(0))} cores, --jobs {args.jobs}"}  # fmt: skip
    ort = s["onnxruntime"]
    print(f"tvm-hybrid: {s['passed']}/{s['total']} passed ({100.0 * s['passed'] / s['total']:.1f}%), "
          f"wrong numbers {s['wrong_numbers']}; onnxruntime: {ort['passed']}/{ort['total']} "
          f"({100.0 * ort['passed'] / ort['total']:.1f}%); {info['seconds']} s")  # fmt: skip
    for k, v in s["by_reason"].items():
        print(f"  {k:16} {v}")
    if args.json:
        args.json.write_text(json.dumps({**s, **info, "cases": results}, indent=1, sort_keys=True) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results, info))
    if args.write_passing:
        args.write_passing.write_text(passing_subset(results, args.per_op, info))
    if args.expect_pass and s["failed"]:
        bad = sorted(n for n, r in results.items() if r["status"] != "passed")
        print(f"{len(bad)} case(s) that should pass failed: " + ", ".join(
            f"{n} ({results[n]['status']}: {results[n].get('detail', '')[:100]})" for n in bad[:20]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
