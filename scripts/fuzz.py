#!/usr/bin/env python3
"""Fuzz `tvm-hybrid compile` and `run` with malformed models, artifacts, manifests and signatures.

Every case must end cleanly: an exit code from the contract (0 when a mutation happened to leave
a valid input; 2, 3, 4 or 5 otherwise, never 1 = internal error), exactly one stderr line
starting with ``Error: `` on failure, no traceback, no crash or hang, and no artifact left
behind by a failed compile. Cases are drawn by hypothesis; the CLI runs in-process
(``tvm_hybrid.cli.main``) unless ``--subprocess`` (slower, isolates native crashes and
catches hangs with a timeout).

    PYTHONPATH=$PWD python scripts/fuzz.py --cases 500            # both families
    PYTHONPATH=$PWD python scripts/fuzz.py --cases 200 --family onnx --seed 7
    PYTHONPATH=$PWD python scripts/fuzz.py --cases 100 --subprocess --keep-failures /tmp/fuzz-fail

Prints a table of outcomes (exit code per case kind) and the failing cases, if any.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import faulthandler
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
# A case that runs longer than this is a hang: faulthandler dumps the stacks and exits.
CASE_TIMEOUT_S = 120
HUGE = [0, -1, -7, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1]


# ---------------------------------------------------------------------------------------------
# seed inputs
# ---------------------------------------------------------------------------------------------


def base_model() -> onnx.ModelProto:
    """A tiny convnet with the structure exporters emit (Conv, Reshape by a shape constant,
    Shape arithmetic, MatMul + Add, Concat, Softmax); weights are small so most bytes are graph."""
    rng = np.random.RandomState(0)
    inits = [
        numpy_helper.from_array(rng.randn(3, 2, 3, 3).astype(np.float32) * 0.3, "conv.weight"),
        numpy_helper.from_array(rng.randn(3).astype(np.float32) * 0.1, "conv.bias"),
        numpy_helper.from_array(rng.randn(48, 4).astype(np.float32) * 0.2, "fc.weight"),
        numpy_helper.from_array(rng.randn(4).astype(np.float32) * 0.1, "fc.bias"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="/conv/Conv",
                         pads=[1, 1, 1, 1], strides=[1, 1], kernel_shape=[3, 3], group=1),
        helper.make_node("Relu", ["c"], ["r"], name="/act/Relu"),
        helper.make_node("Shape", ["r"], ["s"], name="/Shape"),
        helper.make_node("Gather", ["s", "axes0"], ["b"], name="/Gather", axis=0),
        helper.make_node("Concat", ["b", "minus1"], ["shape2"], name="/Concat", axis=0),
        helper.make_node("Reshape", ["r", "shape2"], ["f"], name="/Reshape"),
        helper.make_node("MatMul", ["f", "fc.weight"], ["m"], name="/fc/MatMul"),
        helper.make_node("Add", ["m", "fc.bias"], ["logits"], name="/fc/Add"),
        helper.make_node("Softmax", ["logits"], ["prob"], name="/Softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "fuzz_base",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 4])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


BASE_INPUT = ["--input", "x:1x2x4x4"]


@dataclasses.dataclass
class Outcome:
    kind: str
    code: int
    stderr: str
    argv: list[str]
    seconds: float
    problem: str | None = None


# ---------------------------------------------------------------------------------------------
# running the CLI
# ---------------------------------------------------------------------------------------------


def run_cli(argv: list[str], isolate: bool = False, timeout: float = CASE_TIMEOUT_S) -> tuple[int, str]:
    """Run `tvm-hybrid ARGV`; returns (exit code, stderr). In-process unless ``isolate``."""
    if isolate:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tvm_hybrid", *argv], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return -999, f"HANG: no exit after {timeout} s"
        return proc.returncode, proc.stderr
    from tvm_hybrid.cli import main

    err, out = io.StringIO(), io.StringIO()
    code = None
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException as e:  # main() let something through: that is a finding
                code = -1
                err.write(f"Traceback (escaped main): {type(e).__name__}: {e}\n")
    finally:
        faulthandler.cancel_dump_traceback_later()
    return (code if code is not None else 0), err.getvalue()


def problem_with(code: int, stderr: str, allowed: set[int], leftovers: list[str] = ()) -> str | None:
    """What is wrong with this ending, or None when it is clean."""
    if code not in allowed:
        return f"exit {code} not in {sorted(allowed)}"
    if "Traceback" in stderr:
        return "traceback on stderr"
    if code != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("Error: "):
            return f"stderr is not one 'Error: ' line: {lines[:4]!r}"
    if leftovers:
        return f"failed compile left {leftovers[:3]}"
    return None


# ---------------------------------------------------------------------------------------------
# malformed ONNX
# ---------------------------------------------------------------------------------------------

ONNX_KINDS = (
    "random-bytes", "truncated", "byte-mutated", "input-dims", "initializer-dims", "initializer-data",
    "missing-initializer", "cycle", "dangling-input", "duplicate-output", "op-type", "attribute",
    "opset", "elem-type", "no-output", "reshape-target", "input-override", "external-data", "ir-version",
    "deep-chain", "constant-bomb", "huge-intermediate",
)  # fmt: skip


@st.composite
def onnx_case(draw, base: bytes, kinds=ONNX_KINDS):
    """(kind, model bytes, extra CLI args) for one malformed-model case."""
    kind = draw(st.sampled_from(kinds))
    args = list(BASE_INPUT)
    if kind == "random-bytes":
        return kind, draw(st.binary(min_size=0, max_size=512)), args
    if kind == "truncated":
        return kind, base[: draw(st.integers(0, len(base) - 1))], args
    if kind == "byte-mutated":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
            if op == "flip":
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
            elif op == "insert":
                data[i:i] = draw(st.binary(min_size=1, max_size=8))
            elif len(data) > 1:
                del data[i]
        return kind, bytes(data), args
    m = onnx.load_model_from_string(base)
    g = m.graph
    names = [n for node in g.node for n in node.output]
    if kind == "input-dims":
        dims = g.input[0].type.tensor_type.shape.dim
        d = dims[draw(st.integers(0, len(dims) - 1))]
        d.Clear()
        d.dim_value = draw(st.sampled_from(HUGE + [3, 5]))
        args = [] if draw(st.booleans()) else args
    elif kind == "initializer-dims":
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from(HUGE + [2, 100]))
    elif kind == "initializer-data":
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        cut = draw(st.integers(0, max(0, len(t.raw_data) - 1)))
        t.raw_data = t.raw_data[:cut] if draw(st.booleans()) else t.raw_data + b"\0" * (cut + 1)
    elif kind == "missing-initializer":
        del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
    elif kind == "cycle":
        # Make a node read the output of itself or of a later node.
        i = draw(st.integers(0, len(g.node) - 1))
        j = draw(st.integers(i, len(g.node) - 1))
        node = g.node[i]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = g.node[j].output[0]
        if draw(st.booleans()):  # also sorted "topologically" the wrong way round
            nodes = list(g.node)
            del g.node[:]
            g.node.extend(reversed(nodes))
    elif kind == "dangling-input":
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        if node.input:
            node.input[0] = draw(st.sampled_from(["nope", "", "x ", "prob", "\u00e9\u0000"]))
    elif kind == "duplicate-output":
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        node.output[0] = draw(st.sampled_from(names + ["x", "conv.weight"]))
    elif kind == "op-type":
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        node.op_type = draw(st.sampled_from(["Conv", "Gemm", "Reshape", "Loop", "If", "Scan", "NonZero",
                                             "FooBar", "", "Relu ", "TopK", "Resize", "Einsum"]))  # fmt: skip
        if draw(st.booleans()):
            node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "x"]))
    elif kind == "attribute":
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        if node.attribute and draw(st.booleans()):
            a = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[draw(st.integers(0, len(a.ints) - 1))] = draw(st.sampled_from(HUGE + [-1, 0, 2, 99]))
            elif a.type == onnx.AttributeProto.INT:
                a.i = draw(st.sampled_from(HUGE + [-1, 0, 2, 99]))
            else:
                node.attribute.remove(a)
        else:
            attr = draw(st.sampled_from(["group", "axis", "strides", "dilations", "pads", "kernel_shape", "to"]))
            val = draw(st.sampled_from([0, -1, 3, 2**31, [0, 0], [2**40, 1], [-5, -5, -5, -5], [1] * 9]))
            for a in list(node.attribute):
                if a.name == attr:
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute(attr, val))
    elif kind == "opset":
        m.opset_import[0].version = draw(st.sampled_from([0, 1, 6, 9, 23, 99, 2**31, -1]))
    elif kind == "elem-type":
        t = draw(st.sampled_from([0, TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.FLOAT16,
                                  TensorProto.INT8, TensorProto.BOOL, 99, TensorProto.FLOAT8E4M3FN]))  # fmt: skip
        if draw(st.booleans()):
            g.input[0].type.tensor_type.elem_type = t
        else:
            g.initializer[draw(st.integers(0, len(g.initializer) - 1))].data_type = t
    elif kind == "no-output":
        if draw(st.booleans()):
            del g.output[:]
        else:
            g.output[0].name = draw(st.sampled_from(["nope", "x", "conv.weight", ""]))
    elif kind == "reshape-target":
        t = [i for i in g.initializer if i.name == "minus1"][0]
        t.CopyFrom(numpy_helper.from_array(
            np.array(draw(st.lists(st.sampled_from([-1, 0, 1, 7, 2**40, -2]), min_size=0, max_size=3)),
                     np.int64).reshape(-1), "minus1"))  # fmt: skip
    elif kind == "input-override":
        dims = draw(st.lists(st.sampled_from([0, 1, 2, 4, 5, 2**20, 2**31, 2**40]), min_size=1, max_size=6))
        dtype = draw(st.sampled_from(["", ":float32", ":int64", ":float16", ":bool", ":nope"]))
        name = draw(st.sampled_from(["x", "y", "conv.weight"]))
        args = ["--input", f"{name}:{'x'.join(map(str, dims))}{dtype}"]
    elif kind == "external-data":
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        loc = draw(st.sampled_from(["/etc/passwd", "../../../../etc/hostname", "weights.bin", "/dev/zero"]))
        t.external_data.append(onnx.StringStringEntryProto(key="location", value=loc))
    elif kind == "ir-version":
        m.ir_version = draw(st.sampled_from([0, 1, 3, 7, 11, 99, 2**62]))
    elif kind == "deep-chain":
        # A long chain of elementwise ops: recursion limits in importers and passes.
        depth = draw(st.sampled_from([500, 3000]))
        prev = "prob"
        for k in range(depth):
            out = f"chain{k}"
            g.node.append(helper.make_node("Neg", [prev], [out], name=f"/chain/{k}"))
            prev = out
        g.output[0].name = prev
    elif kind == "constant-bomb":
        # A constant the compiler would have to compute: ConstantOfShape / Expand of initializers.
        dims = draw(st.lists(st.sampled_from([1, 3, 1 << 10, 1 << 14, 1 << 20, 2**31, 2**40]), min_size=1, max_size=3))
        g.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), "bomb_shape"))
        op = draw(st.sampled_from(["ConstantOfShape", "Expand"]))
        if op == "ConstantOfShape":
            g.node.append(helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                                           value=numpy_helper.from_array(np.array([1.0], np.float32))))  # fmt: skip
        else:
            g.initializer.append(numpy_helper.from_array(np.array([1.0], np.float32), "one"))
            g.node.append(helper.make_node("Expand", ["one", "bomb_shape"], ["bomb"]))
        g.node.append(helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0))
        g.node.append(helper.make_node("Add", ["prob", "bomb_sum"], ["prob_plus"]))
        g.output[0].name = "prob_plus"
    elif kind == "huge-intermediate":
        # An activation blown up from the input: Tile / Expand to huge sizes.
        reps = draw(st.lists(st.sampled_from([1, 2, 1 << 12, 1 << 20, 2**31]), min_size=4, max_size=4))
        g.initializer.append(numpy_helper.from_array(np.array(reps, np.int64), "reps"))
        g.node.insert(0, helper.make_node("Tile", ["x", "reps"], ["xt"]))
        g.node.insert(1, helper.make_node("ReduceMean", ["xt"], ["xm"], keepdims=0))
        g.node.append(helper.make_node("Add", ["prob", "xm"], ["prob_plus"]))
        g.output[0].name = "prob_plus"
    return kind, m.SerializeToString(), args


def compile_case(tmp: Path, kind: str, data: bytes, args: list[str], isolate: bool) -> Outcome:
    work = Path(tempfile.mkdtemp(dir=tmp))
    model = work / "model.onnx"
    model.write_bytes(data)
    out = work / "out"
    argv = ["compile", str(model), "--target", "x86-64-avx2", *args, "-o", str(out)]
    t0 = time.perf_counter()
    code, stderr = run_cli(argv, isolate)
    dt = time.perf_counter() - t0
    leftovers = sorted(str(p.relative_to(work)) for p in out.rglob("*")) if code != 0 and out.exists() else []
    if code != 0 and out.exists() and not leftovers:
        leftovers = ["out/ (empty)"]
    prob = problem_with(code, stderr, {0, 2, 3}, leftovers)
    shutil.rmtree(work, ignore_errors=True)
    return Outcome(kind, code, stderr, argv, dt, prob)


# ---------------------------------------------------------------------------------------------
# malformed artifacts, manifests and signatures
# ---------------------------------------------------------------------------------------------

ARTIFACT_KINDS = (
    "manifest-random", "manifest-truncated", "manifest-json", "manifest-nested", "file-flip", "file-missing",
    "extra-file", "symlink", "fifo-manifest", "tar-mutated", "tar-bomb", "signature",
)  # fmt: skip

_JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["float32", "device", "cloud", "segments/0.so", "../0.so", "0" * 64]),
)  # fmt: skip
JSON_VALUES = st.recursive(
    _JSON_LEAF,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)),
    max_leaves=10,
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def artifact_case(draw, base_dir: Path, key_dir: Path, kinds=ARTIFACT_KINDS):
    """(kind, mutate(dir) -> artifact path, extra args) for one malformed-artifact case."""
    kind = draw(st.sampled_from(kinds))
    manifest = (base_dir / "manifest.json").read_bytes()
    extra: list[str] = []
    if kind == "manifest-random":
        blob = draw(st.binary(max_size=256))
        return kind, lambda d: ((d / "manifest.json").write_bytes(blob), d)[1], extra
    if kind == "manifest-truncated":
        cut = draw(st.integers(0, len(manifest) - 1))
        return kind, lambda d: ((d / "manifest.json").write_bytes(manifest[:cut]), d)[1], extra
    if kind == "manifest-json":
        doc = json.loads(manifest)
        for _ in range(draw(st.integers(1, 3))):
            paths = list(_paths(doc))
            path = draw(st.sampled_from(paths))
            op = draw(st.sampled_from(["replace", "delete", "insert"]))
            if not path:
                doc = draw(JSON_VALUES) if op == "replace" else doc
                continue
            parent = doc
            for k in path[:-1]:
                parent = parent[k]
            last = path[-1]
            if op == "replace":
                parent[last] = draw(JSON_VALUES)
            elif op == "delete":
                del parent[last]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
            else:
                parent.insert(last, draw(JSON_VALUES))
        text = json.dumps(doc)
        return kind, lambda d: ((d / "manifest.json").write_text(text), d)[1], extra
    if kind == "manifest-nested":
        depth = draw(st.sampled_from([100, 10_000, 200_000]))
        blob = b"[" * depth + b"]" * depth
        return kind, lambda d: ((d / "manifest.json").write_bytes(blob), d)[1], extra
    if kind == "file-flip":
        pos = draw(st.integers(0, (base_dir / "segments" / "0.so").stat().st_size - 1))
        truncate = draw(st.booleans())

        def flip(d):
            p = d / "segments" / "0.so"
            b = bytearray(p.read_bytes())
            if truncate:
                del b[pos:]
            else:
                b[pos] ^= 0xFF
            p.write_bytes(bytes(b))
            return d

        return kind, flip, extra
    if kind == "file-missing":
        how = draw(st.sampled_from(["unlink", "dir", "rename"]))

        def missing(d):
            p = d / "segments" / "0.so"
            p.unlink()
            if how == "dir":
                p.mkdir()
            elif how == "rename":
                (d / "segments").rename(d / "segs")
            return d

        return kind, missing, extra
    if kind == "extra-file":
        name = draw(st.sampled_from(["evil.so", "segments/1.so", "segments/0.so.bak", ".hidden", "a/b/c"]))

        def extra_file(d):
            p = d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\x7fELF")
            return d

        return kind, extra_file, extra
    if kind == "symlink":
        where = draw(st.sampled_from(["lib", "segments-dir", "manifest"]))

        def link(d):
            if where == "lib":
                real = d.parent / f"{d.name}-real.so"
                os.replace(d / "segments" / "0.so", real)
                os.symlink(real, d / "segments" / "0.so")
            elif where == "segments-dir":
                real = d.parent / f"{d.name}-segs"
                os.replace(d / "segments", real)
                os.symlink(real, d / "segments")
            else:
                real = d.parent / f"{d.name}-manifest.json"
                os.replace(d / "manifest.json", real)
                os.symlink(real, d / "manifest.json")
            return d

        return kind, link, extra
    if kind == "fifo-manifest":

        def fifo(d):
            (d / "manifest.json").unlink()
            os.mkfifo(d / "manifest.json")
            return d

        return kind, fifo, extra
    if kind == "tar-mutated":
        flips = draw(st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=6))
        cut = draw(st.one_of(st.none(), st.integers(0, 4096)))

        def tar_mutated(d):
            tar = d.parent / f"{d.name}.tar"
            with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
                tf.add(d, arcname="art")
            b = bytearray(tar.read_bytes())
            for off, val in flips:  # header bytes of the first members
                b[off % len(b)] = val
            if cut is not None:
                del b[cut:]
            tar.write_bytes(bytes(b))
            return tar

        return kind, tar_mutated, extra
    if kind == "tar-bomb":
        what = draw(st.sampled_from(["huge-member", "many-members", "duplicate", "hardlink", "fifo", "absolute"]))

        def bomb(d):
            tar = d.parent / f"{d.name}.tar"
            with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
                tf.add(d / "manifest.json", arcname="manifest.json")
                if what == "huge-member":
                    info = tarfile.TarInfo("segments/0.so")
                    info.size = 1 << 40  # declared, not stored: the header alone claims a terabyte
                    tf.addfile(info)
                elif what == "many-members":
                    for i in range(10_050):
                        info = tarfile.TarInfo(f"m/{i}")
                        tf.addfile(info, io.BytesIO(b""))
                elif what == "duplicate":
                    tf.add(d / "segments" / "0.so", arcname="segments/0.so")
                    info = tarfile.TarInfo("segments/0.so")
                    info.size = 4
                    tf.addfile(info, io.BytesIO(b"evil"))
                elif what == "hardlink":
                    info = tarfile.TarInfo("segments/0.so")
                    info.type, info.linkname = tarfile.LNKTYPE, "manifest.json"
                    tf.addfile(info)
                elif what == "fifo":
                    info = tarfile.TarInfo("segments/0.so")
                    info.type = tarfile.FIFOTYPE
                    tf.addfile(info)
                else:
                    info = tarfile.TarInfo("/tmp/tvm-hybrid-fuzz-evil.so")
                    info.size = 4
                    tf.addfile(info, io.BytesIO(b"evil"))
            return tar

        return kind, bomb, extra
    # signature: a key is required; the signature is missing, mangled, by another key, or stale.
    what = draw(st.sampled_from(["missing", "other-key", "garbage", "json", "stale", "private-key", "bad-key-file"]))
    key = key_dir / "release.key"
    extra = ["--verify-key", str(key_dir / "release.key.pub")]
    blob = draw(st.binary(max_size=64))
    doc_edit = (draw(st.sampled_from(["key_id", "manifest_sha256", "signature", "schema"])), draw(JSON_VALUES))
    if what == "private-key":
        extra = ["--verify-key", str(key)]
    elif what == "bad-key-file":
        extra = ["--verify-key", str(key_dir / "garbage.pub")]

    def sig(d):
        from tvm_hybrid.signing import sign_artifact

        if what == "missing":
            return d
        sign_artifact(d, key_dir / ("other.key" if what == "other-key" else "release.key"))
        p = d / "manifest.sig"
        if what == "garbage":
            p.write_bytes(blob)
        elif what == "json":
            doc = json.loads(p.read_text())
            doc[doc_edit[0]] = doc_edit[1]
            p.write_text(json.dumps(doc))
        elif what == "stale":
            m = json.loads((d / "manifest.json").read_text())
            m["model"]["name"] = "tampered"
            (d / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        return d

    return f"{kind}:{what}", sig, extra


def run_case(tmp: Path, base_dir: Path, feed: Path, kind: str, mutate, extra: list[str], isolate: bool) -> Outcome:
    work = Path(tempfile.mkdtemp(dir=tmp))
    art = work / "art"
    shutil.copytree(base_dir, art)
    try:
        target = mutate(art)
    except ValueError as e:  # the mutation itself could not be made (e.g. json.dumps of a NaN key)
        shutil.rmtree(work, ignore_errors=True)
        return Outcome(kind, 0, f"skipped: {e}", [], 0.0)
    argv = ["run", str(target), "--input", f"x={feed}", *extra]
    t0 = time.perf_counter()
    code, stderr = run_cli(argv, isolate)
    dt = time.perf_counter() - t0
    prob = problem_with(code, stderr, {0, 2, 4, 5})
    if kind == "tar-bomb" and Path("/tmp/tvm-hybrid-fuzz-evil.so").exists():
        prob = "absolute tar member was written outside the artifact"
    shutil.rmtree(work, ignore_errors=True)
    return Outcome(kind, code, stderr, argv, dt, prob)


# ---------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------


class Fuzzer:
    """Seeds (model bytes, a compiled artifact, keys, an input file) in a scratch directory."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.base = base_model().SerializeToString()
        self.outcomes: list[Outcome] = []
        seed_model = tmp / "base.onnx"
        seed_model.write_bytes(self.base)
        code, stderr = run_cli(["compile", str(seed_model), "-t", "x86-64-avx2", *BASE_INPUT, "-o", str(tmp / "base")])
        if code != 0:
            raise RuntimeError(f"cannot compile the seed model: {stderr}")
        self.artifact = tmp / "base" / "x86-64-avx2"
        self.feed = tmp / "x.npy"
        np.save(self.feed, np.random.RandomState(0).randn(1, 2, 4, 4).astype(np.float32))
        self.keys = tmp / "keys"
        from tvm_hybrid.signing import generate_key

        generate_key(self.keys / "release.key")
        generate_key(self.keys / "other.key")
        (self.keys / "garbage.pub").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")

    def onnx_cases(self, n: int, isolate: bool = False, seed: int | None = None, raise_on_problem: bool = False,
                   kinds=ONNX_KINDS):
        """Run n malformed-model cases, spread evenly over the kinds."""
        for kind, k in _spread(n, kinds):
            self._run(onnx_case(self.base, (kind,)), k, seed, raise_on_problem,
                      lambda case: compile_case(self.tmp, *case, isolate))  # fmt: skip

    def artifact_cases(self, n: int, isolate: bool = False, seed: int | None = None, raise_on_problem: bool = False,
                       kinds=ARTIFACT_KINDS):
        """Run n malformed-artifact cases, spread evenly over the kinds."""
        for kind, k in _spread(n, kinds):
            self._run(artifact_case(self.artifact, self.keys, (kind,)), k, seed, raise_on_problem,
                      lambda case: run_case(self.tmp, self.artifact, self.feed, *case, isolate))  # fmt: skip

    def _run(self, strategy, n: int, seed: int | None, raise_on_problem: bool, one) -> None:
        @settings(max_examples=n, deadline=None, database=None, derandomize=seed is None,
                  suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
        @given(case=strategy)
        def body(case):
            o = one(case)
            self.outcomes.append(o)
            if raise_on_problem and o.problem:
                raise AssertionError(f"{o.kind}: {o.problem}\nargv: {o.argv}\nstderr: {o.stderr[-2000:]}")

        _seeded(body, seed)()

    def table(self) -> str:
        by = collections.defaultdict(collections.Counter)
        for o in self.outcomes:
            by[o.kind.split(":")[0]]["bad" if o.problem else o.code] += 1
        codes = sorted({c for cnt in by.values() for c in cnt}, key=str)
        rows = [["case kind", *map(str, codes), "total"]]
        for kind in sorted(by):
            rows.append([kind, *(str(by[kind].get(c, "")) for c in codes), str(sum(by[kind].values()))])
        total = collections.Counter(o.code if not o.problem else "bad" for o in self.outcomes)
        rows.append(["all", *(str(total.get(c, "")) for c in codes), str(len(self.outcomes))])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def _spread(n: int, kinds) -> list[tuple[str, int]]:
    """n cases over the kinds, as evenly as whole numbers allow (every kind gets one when n allows)."""
    q, r = divmod(n, len(kinds))
    return [(k, q + (i < r)) for i, k in enumerate(kinds) if q + (i < r) > 0]


def _seeded(fn, seed: int | None):
    if seed is None:
        return fn
    from hypothesis import seed as hseed

    return hseed(seed)(fn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200, help="cases per family (default 200)")
    ap.add_argument("--family", choices=["onnx", "artifact", "both"], default="both")
    ap.add_argument("--kind", action="append", help="only these case kinds (repeatable): "
                    + ", ".join(ONNX_KINDS + ARTIFACT_KINDS))
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: hypothesis' derandomized run)")
    ap.add_argument("--subprocess", action="store_true", help="run each case in a child process (isolates crashes)")
    ap.add_argument("--keep-failures", type=Path, help="write each failing case's argv and stderr here")
    ap.add_argument("--examples", action="store_true", help="print one error message per case kind and exit code")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tvm-hybrid-fuzz-") as d:
        fz = Fuzzer(Path(d))
        t0 = time.perf_counter()
        onnx_kinds = tuple(k for k in ONNX_KINDS if not args.kind or k in args.kind)
        art_kinds = tuple(k for k in ARTIFACT_KINDS if not args.kind or k in args.kind)
        if args.family in ("onnx", "both") and onnx_kinds:
            fz.onnx_cases(args.cases, args.subprocess, args.seed, kinds=onnx_kinds)
        if args.family in ("artifact", "both") and art_kinds:
            fz.artifact_cases(args.cases, args.subprocess, args.seed, kinds=art_kinds)
        dt = time.perf_counter() - t0
    bad = [o for o in fz.outcomes if o.problem]
    print(fz.table())
    print(f"\n{len(fz.outcomes)} cases in {dt:.0f} s; {len(bad)} with problems")
    if args.examples:
        seen = set()
        for o in fz.outcomes:
            if (o.kind, o.code) not in seen and o.code != 0:
                seen.add((o.kind, o.code))
                print(f"  [{o.kind} → {o.code}] {o.stderr.strip().splitlines()[-1][:220] if o.stderr.strip() else ''}")
    slow = sorted(fz.outcomes, key=lambda o: -o.seconds)[:3]
    print("slowest: " + ", ".join(f"{o.kind} {o.seconds:.1f} s (exit {o.code})" for o in slow))
    for o in bad:
        print(f"\n[{o.kind}] {o.problem}\n  tvm-hybrid {' '.join(o.argv)}\n  " + o.stderr.strip()[-1500:].replace("\n", "\n  "))
    if args.keep_failures and bad:
        args.keep_failures.mkdir(parents=True, exist_ok=True)
        for i, o in enumerate(bad):
            (args.keep_failures / f"{i}.json").write_text(json.dumps(dataclasses.asdict(o), indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
