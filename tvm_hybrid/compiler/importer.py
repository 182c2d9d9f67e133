"""ONNX import: check, fix dynamic shapes, fold constants, convert to Relax."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..errors import UnsupportedError, UsageError, one_line
from ..manifest import DTYPES, TensorSpec
from . import narrow
from .controlflow import static_control_flow
from .expand import expand_functions
from .legalize import legalize
from .onnx_graph import attr as _attr
from .onnx_graph import opset as _opset
from .onnx_graph import static_shapes as _static_shapes

log = logging.getLogger(__name__)

_DTYPES = DTYPES
_SHAPE_RE = re.compile(r"^\d+(x\d+)*$")
# Folding stops at outputs this large: weights-sized constants are fine, but a folded
# ConstantOfShape the size of an activation would only bloat the artifact.
_FOLD_MAX_ELEMENTS = 1 << 22
# TVM 0.27 indexes tensors with int32 in places (RewriteDataflowReshape fails on a literal of
# 2**32), and its size arithmetic overflows further up (a ConstantOfShape of 2**60 elements
# crashed its constant folder with heap corruption): bigger tensors are refused before TVM sees them.
MAX_TENSOR_ELEMENTS = (1 << 31) - 1
# What is left computable at compile time after our folding (outputs past _FOLD_MAX_ELEMENTS) is
# folded by Relax's FoldConstant, in compile-time memory, into the artifact: capped too.
MAX_CONSTANT_BYTES = 1 << 30
# Nodes whose value is not a function of their inputs.
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


@dataclasses.dataclass(frozen=True)
class InputOverride:
    """A user's ``--input NAME:1x3x224x224[:float32]``, or ``--input NAME=VALUE``: the input's
    value fixed at compile time (JSON: ``axes=[0,2]``, ``k=3``), for inputs the output's shape
    depends on (axes, shapes, sizes, counts). The artifact still takes the input and refuses
    any other value."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None = None
    value: Any = None  # JSON: a number or nested lists of numbers

    @classmethod
    def parse(cls, text: str) -> InputOverride:
        """Parse ``NAME:DIMS[:DTYPE]`` (NAME may itself hold colons: ``input:0``) or ``NAME=VALUE``."""
        name, eq, value = text.partition("=")
        if eq and name and value.endswith(".npy"):  # as `run --input NAME=FILE.npy` takes it
            try:
                arr = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UsageError(f"bad --input {text!r}: cannot read {value}: {one_line(e)}") from None
            return cls(name, tuple(arr.shape), None, arr.tolist())
        if eq and name and value.strip()[:1] in set("[-.0123456789tf"):
            try:
                v = json.loads(value)
            except ValueError:
                raise UsageError(f"bad --input {text!r}: the value after '=' must be JSON, e.g. {name}=[0,2] or {name}=3") from None
            if not _numeric(v):
                raise UsageError(f"bad --input {text!r}: the value must be a number or nested lists of numbers")
            try:
                shape = np.asarray(v).shape
            except ValueError:
                raise UsageError(f"bad --input {text!r}: the nested lists are ragged") from None
            return cls(name, tuple(shape), None, v)
        parts = text.rsplit(":", 2)
        if len(parts) == 3 and parts[2] in _DTYPES and _SHAPE_RE.match(parts[1]):
            return cls(parts[0], _dims(parts[1]), parts[2])
        parts = text.rsplit(":", 1)
        if len(parts) == 2 and parts[0] and _SHAPE_RE.match(parts[1]):
            return cls(parts[0], _dims(parts[1]))
        raise UsageError(
            f"bad --input {text!r}: expected NAME:DIMS[:DTYPE], e.g. x:1x3x320x320 or x:1x3x320x320:float32"
        )


def _numeric(v) -> bool:
    if isinstance(v, list):
        return all(_numeric(x) for x in v)
    return isinstance(v, (int, float, bool))


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


@dataclasses.dataclass
class ImportedModel:
    """An ONNX model with every shape fixed and constants folded, ready for Relax."""

    name: str
    sha256: str
    model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    #: Outputs that are constants (folded at compile time), with their values: no kernel makes
    #: them; the manifest lists them among the outputs, in the model's order (``all_outputs``).
    constant_outputs: tuple[TensorSpec, ...] = ()
    output_order: tuple[str, ...] = ()

    @property
    def all_outputs(self) -> list[TensorSpec]:
        """Every output of the model in its order, the constant ones (with a value) included."""
        if not self.constant_outputs:
            return list(self.outputs)
        by_name = {s.name: s for s in [*self.outputs, *self.constant_outputs]}
        return [by_name[n] for n in self.output_order]

    @property
    def op_types(self) -> list[str]:
        return sorted({n.op_type for n in self.model.graph.node})


def load(path: str | Path, overrides: list[InputOverride] | tuple = ()) -> ImportedModel:
    """Read, check, fix shapes and fold an ONNX file; raises UsageError on bad input."""
    path = Path(path)
    model, sha256 = read(path)
    imported = prepare(model, overrides)
    imported.name = path.stem
    imported.sha256 = sha256
    return imported


def read(path: Path) -> tuple[onnx.ModelProto, str]:
    """(checked model, sha256 of the file and its external data) of an ONNX file; UsageError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read model {path}: {e.strerror or e}") from e
    digest = hashlib.sha256(data)
    model = parse(data, str(path), base_dir=path.parent, digest=digest)
    return model, digest.hexdigest()


def parse(data: bytes, where: str = "model", base_dir: Path | None = None, digest=None) -> onnx.ModelProto:
    """Decode and check ONNX bytes; anything malformed becomes one UsageError line. Tensors kept
    in external data files (models over protobuf's 2 GB, or saved that way) are read from
    ``base_dir``, and only from inside it; ``digest`` (a hashlib object) takes their bytes too."""
    if not data:
        raise UsageError(f"{where} is empty, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises DecodeError or RuntimeWarning-ish errors
        raise UsageError(f"{where} is not an ONNX model (protobuf decode failed: {one_line(e)})") from e
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{where} is not an ONNX model (it has no graph)")
    if not model.graph.output:
        raise UsageError(f"{where} has no graph outputs; nothing to compile")
    _load_external(model, where, base_dir, digest)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise UsageError(f"{where} is not a valid ONNX model: {one_line(e)}") from e
    return model


def _load_external(model: onnx.ModelProto, where: str, base_dir: Path | None, digest=None) -> None:
    from onnx import external_data_helper as ext

    tensors = [t for t in ext._get_all_tensors(model) if ext.uses_external_data(t)]
    if not tensors:
        return
    if base_dir is None:
        raise UsageError(f"{where} keeps tensors in external data files; give the model as a file path")
    base = base_dir.resolve()
    files = []
    for t in tensors:
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        f = (base / loc).resolve()
        if base not in f.parents:
            raise UsageError(f"{where}: tensor {t.name!r} names external data {loc[:100]!r} outside the model's folder")
        if not f.is_file():
            raise UsageError(f"{where}: tensor {t.name!r} needs {loc[:100]!r} beside the model, which is missing")
        if f not in files:
            files.append(f)
    if digest is not None:
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    try:
        ext.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise UsageError(f"{where}: cannot read its external data: {one_line(e)}") from e


def prepare(model: onnx.ModelProto, overrides: list[InputOverride] | tuple = ()) -> ImportedModel:
    """Fix input shapes, infer shapes, fold constants; returns a new model."""
    model = _copy(model)
    graph = model.graph
    _check_domains(model)
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    by_name = {o.name: o for o in overrides}
    unknown = set(by_name) - {i.name for i in real_inputs}
    if unknown:
        raise UsageError(
            f"--input names {', '.join(sorted(unknown))}, which the model does not have; "
            f"its inputs are {', '.join(i.name for i in real_inputs)}"
        )
    missing = []
    for vi in real_inputs:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedError(f"input {vi.name!r} is not a tensor; only tensor inputs are supported")
        ov = by_name.get(vi.name)
        if ov is not None:
            if tt.HasField("shape") and len(tt.shape.dim) != len(ov.shape):
                raise UsageError(
                    f"--input {vi.name}: the model's input has rank {len(tt.shape.dim)}, "
                    f"got {len(ov.shape)} dims ({'x'.join(map(str, ov.shape))})"
                )
            for d, (dim, want) in enumerate(zip(tt.shape.dim, ov.shape)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != want:
                    raise UsageError(
                        f"--input {vi.name}: dim {d} is fixed to {dim.dim_value} in the model, got {want}"
                    )
            del tt.shape.dim[:]
            for v in ov.shape:
                tt.shape.dim.add().dim_value = v
            if ov.dtype:
                tt.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(ov.dtype))
        else:
            if not tt.HasField("shape"):
                missing.append(f"{vi.name} (unknown rank)")
                continue
            dyn = [
                (d, dim.dim_param or "?")
                for d, dim in enumerate(tt.shape.dim)
                if not dim.HasField("dim_value") or dim.dim_value < 0  # 0 is a size (an empty tensor)
            ]
            if dyn:
                shown = "x".join(
                    str(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value >= 0 else (dim.dim_param or "?")
                    for dim in tt.shape.dim
                )
                missing.append(f"{vi.name} [{shown}]")
    if missing:
        raise UsageError(
            "dynamic input dims must be fixed: " + ", ".join(missing)
            + "; give each with --input NAME:DIMS, e.g. --input "
            + _example(real_inputs, by_name)
        )
    values = _bind_values(graph, [o for o in overrides if o.value is not None])
    # Shapes of intermediates recorded by the exporter may hold the old dynamic dims.
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    model = _infer(model)
    narrow_io = narrow.lower(model)  # float8, float4, int4… tensors as bytes; blocked Q/DQ
    if narrow_io is not None:
        model = _infer(model)
    model = settle(expand_functions(model, supported_op_types(), _infer))
    _cast_mul_as_dequantize(model)
    check_sizes(model)
    inputs = [_spec(vi, narrow_io) for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
    inputs = [dataclasses.replace(s, value=values[s.name]) if s.name in values else s for s in inputs]
    consts = {t.name for t in model.graph.initializer}
    runtime_axes = sorted({(n.op_type, n.input[k]) for n in model.graph.node for k in _CONST_OPERANDS.get(n.op_type, ())
                           if k < len(n.input) and n.input[k] and n.input[k] not in consts})  # fmt: skip
    if runtime_axes:
        needed = shape_inputs(model)
        op, name = runtime_axes[0]
        raise _needs_values(f"{op} reads {name!r} as a constant (TVM's kernel fixes it at compile time), but it is "
                            f"computed at run time", needed)  # fmt: skip
    outputs, constant_outputs = [], []
    order = tuple(vi.name for vi in model.graph.output)
    for vi in model.graph.output:
        if vi.name in consts:
            constant_outputs.append(_constant_output(model, vi, narrow_io))
            continue
        spec = _spec(vi, narrow_io)
        if spec.shape is None or any(d < 0 for d in spec.shape):
            needed = shape_inputs(model)
            if needed:
                raise _needs_values(f"output {vi.name!r} has a shape that depends on the value of input(s) "
                                    f"{', '.join(needed)}; tvm-hybrid compiles static shapes", needed)  # fmt: skip
            raise UnsupportedError(
                f"output {vi.name!r} has a data-dependent shape that cannot be fixed at compile time "
                "(ops like NonZero or NonMaxSuppression); tvm-hybrid compiles static shapes only"
            )
        outputs.append(spec)
    if constant_outputs:  # the graph keeps what kernels compute
        kept = [vi for vi in model.graph.output if vi.name not in consts]
        del model.graph.output[:]
        model.graph.output.extend(kept)
        _prune(model)
    return ImportedModel(
        name=model.graph.name or "model",
        sha256=hashlib.sha256(model.SerializeToString()).hexdigest(),
        model=model,
        inputs=inputs,
        outputs=outputs,
        opset=_opset(model),
        constant_outputs=tuple(constant_outputs),
        output_order=order if constant_outputs else (),
    )


def _constant_output(model: onnx.ModelProto, vi: onnx.ValueInfoProto, narrow_io) -> TensorSpec:
    """An output folded to a constant (a Shape of static dims, an EyeLike): its spec and value."""
    t = next(t for t in model.graph.initializer if t.name == vi.name)
    value = numpy_helper.to_array(t)
    name = str(value.dtype)
    if name not in _DTYPES or (narrow_io or {}).get(vi.name) or value.size > _CONSTANT_OUTPUT_MAX:
        raise UnsupportedError(
            f"output {vi.name!r} is a constant (folded at compile time) that the artifact cannot carry as a value "
            f"({name}, {value.size} elements); tvm-hybrid carries constant outputs of up to "
            f"{_CONSTANT_OUTPUT_MAX} numeric elements"
        )
    return TensorSpec(vi.name, tuple(value.shape), name, value.tolist())


#: The largest constant output an artifact carries in its manifest (elements).
_CONSTANT_OUTPUT_MAX = 1 << 16


def settle(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constants folded, ``legalize``'s rules and static control flow applied, until nothing
    changes: what import does after expanding functions (and a backend after expanding more)."""
    model = fold_constants(model)
    for _ in range(16):  # what one pass writes may need the other (an unrolled body holds more control flow)
        if legalize(model):
            model = fold_constants(_infer(model))
        if not static_control_flow(model):
            break
        model = fold_constants(_infer(model))
    return model


def _needs_values(what: str, needed: list[str]) -> UnsupportedError:
    """The error for a model that compiles once ``needed`` inputs' values are fixed; it names
    them, and carries them as ``shape_inputs`` (scripts/conformance.py fixes them from its data)."""
    err = UnsupportedError(
        what + (f": fix the value at compile time with {' '.join(f'--input {n}=VALUE' for n in needed)} "
                "(JSON, e.g. [0,2]); the artifact then refuses other values" if needed else "")
    )
    err.shape_inputs = needed
    return err


def _bind_values(graph: onnx.GraphProto, overrides: list[InputOverride]) -> dict[str, Any]:
    """Fixed input values: each becomes a constant ``NAME__value`` that every node reads instead
    of the input (which stays, unread, in the signature). Returns the values as nested lists."""
    out = {}
    renames = {}
    for ov in overrides:
        vi = next(i for i in graph.input if i.name == ov.name)
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                arr = np.asarray(ov.value, dtype=dtype)
                exact = np.array_equal(arr, np.asarray(ov.value), equal_nan=arr.dtype.kind == "f")
            except (TypeError, ValueError, OverflowError):
                exact = False
        if not exact:
            raise UsageError(f"--input {ov.name}={json.dumps(ov.value)[:60]}: not a value of the input's dtype {dtype}")
        const = f"{ov.name}__value"
        graph.initializer.append(numpy_helper.from_array(arr, const))
        renames[ov.name] = const
        out[ov.name] = arr.tolist()
    if renames:
        _rename_reads(graph, renames)
    return out


def _rename_reads(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _rename_reads(sub, renames)


#: Most elements an input may have to be taken for a shape-like input (axes, sizes, counts).
_SHAPE_INPUT_MAX = 64
#: Operands TVM's frontend needs as constants although shapes do not depend on them (axes).
_CONST_OPERANDS = {"CumSum": (1,), "CumProd": (1,), "ReverseSequence": (1,), "OneHot": (1,), "Trilu": (1,),
                   "LSTM": (4,), "GRU": (4,), "RNN": (4,), "Dropout": (1, 2)}  # fmt: skip
#: Ops whose every operand shapes the output (start/limit/delta, a shape, sizes).
_ALL_OPERANDS_SHAPE = {"ConstantOfShape", "Range", "EyeLike", "HannWindow", "HammingWindow", "BlackmanWindow",
                       "MelWeightMatrix"}  # fmt: skip


def shape_inputs(model: onnx.ModelProto) -> list[str]:
    """The small model inputs whose values some tensor's shape depends on: operands (after the
    first, or any operand of ops like Range) of the nodes where static shapes end, traced back to
    the model inputs they come from. What ``--input NAME=VALUE`` should fix."""
    g = model.graph
    shapes = _static_shapes(model)
    inits = {t.name for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    inputs = {vi.name: vi for vi in g.input if vi.name not in inits}

    def small_input(name: str) -> bool:
        s = shapes.get(name)
        return name in inputs and s is not None and int(np.prod(s)) <= _SHAPE_INPUT_MAX

    def sources(name: str, seen: set) -> set[str]:
        if name in seen:
            return set()
        seen.add(name)
        if name in inputs:
            return {name} if small_input(name) else set()
        node = producers.get(name)
        if node is None:
            return set()
        return set().union(*(sources(i, seen) for i in node.input if i)) if node.input else set()

    found: set[str] = set()
    for node in g.node:
        for k in _CONST_OPERANDS.get(node.op_type, ()):
            if k < len(node.input) and node.input[k] and node.input[k] not in inits:
                found |= sources(node.input[k], set())
        ins = [i for i in node.input if i]
        outs = [o for o in node.output if o]
        if not outs or all(o in shapes for o in outs):
            continue
        if not all(i in shapes or i in inits for i in ins):
            continue  # static shapes ended further up
        operands = node.input if node.op_type in _ALL_OPERANDS_SHAPE else \
            node.input[:2] if node.op_type == "Loop" else node.input[1:]  # fmt: skip
        for i in operands:
            if i and i not in inits:
                found |= sources(i, set())
    return sorted(found)


def _example(inputs: list[onnx.ValueInfoProto], given: dict) -> str:
    parts = []
    for vi in inputs:
        if vi.name in given:
            continue
        dims = [
            str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else "1"
            for d in vi.type.tensor_type.shape.dim
        ]
        parts.append(f"{vi.name}:{'x'.join(dims)}")
    return " --input ".join(parts)


def _check_domains(model: onnx.ModelProto) -> None:
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise UnsupportedError(
            f"unsupported ops (custom domains): {', '.join(foreign)}; export the model with standard ONNX ops"
        )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, strict first; where strict mode finds a node it cannot check (a
    function body's broadcast it cannot prove, a subgraph's unknown outer types) it runs again
    leniently, as onnxruntime does, keeping every shape it could infer."""
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        strict = e
    try:
        lenient = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        raise UsageError(f"ONNX shape inference failed: {one_line(e)}") from e
    log.debug("strict shape inference failed (%s); continuing with the lenient one", one_line(strict))
    return lenient


def _spec(vi: onnx.ValueInfoProto, narrow_io: dict[str, str] | None = None) -> TensorSpec:
    """The tensor as callers see it: a narrow type (carried in bytes inside) under its own name."""
    tt = vi.type.tensor_type
    dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else "float32"
    dtype = (narrow_io or {}).get(vi.name, dtype)
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    return TensorSpec(vi.name, tuple(shape) if shape is not None else None, dtype)


def check_sizes(model: onnx.ModelProto) -> None:
    """Refuse tensors no target could hold, and compile-time constants too big to fold, by name.

    Shapes come from ONNX shape inference, so this runs before TVM allocates anything.
    """
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    shapes = _static_shapes(model)

    def elements(name: str) -> int | None:
        shape = shapes.get(name)
        if shape is None:
            return None
        n = 1
        for d in shape:
            n *= d
        return n

    def nbytes(name: str) -> int | None:
        n = elements(name)
        return None if n is None else n * _itemsize(types.get(name, 0))

    def show(name: str) -> str:
        return f"{name[:100]!r} ({'x'.join(map(str, shapes[name]))})"

    for name in shapes:
        n = elements(name)
        if n > MAX_TENSOR_ELEMENTS:
            raise UnsupportedError(
                f"tensor {show(name)} has {n:.3g} elements; TVM compiles tensors of at most 2**31-1 elements "
                "(it indexes them with int32); check the model's shapes and the --input dims"
            )
    consts = {t.name for t in g.initializer}
    for node in g.node:
        ins = [i for i in node.input if i]
        if ins and all(i in consts for i in ins) and node.op_type not in _NONDETERMINISTIC:
            for o in node.output:
                consts.add(o)
                size = nbytes(o)
                if size is not None and size > MAX_CONSTANT_BYTES:
                    raise UnsupportedError(
                        f"{node.op_type} node {node.name[:100]!r} computes a constant {show(o)} of "
                        f"{size / 2**30:.3g} GiB at compile time, over the {MAX_CONSTANT_BYTES >> 30} GiB tvm-hybrid folds "
                        "into an artifact; compute it from an input instead"
                    )


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:  # undefined, string or exotic types: count elements
        return 1


def fold_constants(model: onnx.ModelProto, max_rounds: int = 20) -> onnx.ModelProto:
    """Evaluate every node whose inputs are known at compile time, and Shape/Size of static tensors.

    Exporters (PyTorch, Paddle) emit shape arithmetic (Shape → Gather → Concat → Reshape) that
    TVM's importer can only take as constants. Once input shapes are fixed it is all constant;
    onnx's reference evaluator computes it with ONNX's own semantics.
    """
    for _ in range(max_rounds):
        changed = _fold_round(model)
        if not changed:
            break
        model = _infer(model)
    return model


def _fold_round(model: onnx.ModelProto) -> bool:
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    consts: dict[str, np.ndarray] = {t.name: None for t in g.initializer}  # values loaded lazily
    init_by_name = {t.name: t for t in g.initializer}
    shapes = _static_shapes(model)
    graph_outputs = {o.name for o in g.output}
    opsets = list(model.opset_import)
    new_inits: list[onnx.TensorProto] = []
    keep: list[onnx.NodeProto] = []
    changed = False

    def value(name: str) -> np.ndarray:
        if consts[name] is None:
            consts[name] = numpy_helper.to_array(init_by_name[name])
        return consts[name]

    for node in g.node:
        outs: list[np.ndarray] | None = None
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            # As an initializer, later nodes can fold through it.
            try:
                outs = [numpy_helper.to_array(_constant_value(node))]
            except ValueError:
                outs = None
        elif node.op_type == "Shape" and ins and ins[0] in shapes:
            rank = len(shapes[ins[0]])
            start = _attr(node, "start", 0)
            end = _attr(node, "end", rank)
            outs = [np.array(shapes[ins[0]], dtype=np.int64)[slice(start, end)]]
        elif node.op_type == "Size" and ins and ins[0] in shapes:
            outs = [np.array(int(np.prod(shapes[ins[0]])), dtype=np.int64)]
        elif _dequantizes_weight(node, init_by_name):
            outs = None  # the backend keeps the weight int8 (rewrites.int8_weights) or folds it itself
        elif (
            ins
            and node.op_type not in _NONDETERMINISTIC
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            and all(i in consts for i in ins)
            and all(o not in graph_outputs for o in node.output)
        ):
            out_shapes = [shapes.get(o) for o in node.output]
            if all(s is not None and int(np.prod(s)) <= _FOLD_MAX_ELEMENTS for s in out_shapes):
                try:
                    sess = ReferenceEvaluator(_single_node_model(node, g, opsets, init_by_name, new_inits))
                    outs = sess.run(None, {})
                except Exception as e:  # an op the reference cannot run stays in the graph
                    log.debug("not folding %s (%s): %s", node.name, node.op_type, e)
                    outs = None
        if outs is None:
            keep.append(node)
            continue
        for name, arr in zip(node.output, outs):
            if not name:
                continue
            arr = np.asarray(arr)
            t = numpy_helper.from_array(arr, name)
            new_inits.append(t)
            init_by_name[name] = t
            consts[name] = arr
        changed = True
    if not changed:
        return False
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    _prune(model)
    return True


def _cast_mul_as_dequantize(model: onnx.ModelProto) -> None:
    """Weights stored int8 and dequantized as ``Mul(Cast(q), scale)`` (exporters of int8-weight
    models do this) become a ``DequantizeLinear(q, scale, axis)``, which TVM's importer keeps as a
    Relax ``dequantize`` (it folds a Cast of a constant on the spot) and rewrites.int8_weights
    then keeps int8. Applies where the scale varies along at most one axis of the weight."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    casts = {n.output[0]: n for n in g.node if _dequantizes_weight(n, inits) and n.op_type == "Cast"}
    if not casts:
        return
    opset = _opset(model)
    changed = False
    for i, node in enumerate(g.node):
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        a, b = node.input
        cast, scale = (a, b) if a in casts else (b, a) if b in casts else (None, None)
        if cast is None or scale not in inits or inits[scale].data_type != onnx.TensorProto.FLOAT:
            continue
        q = inits[casts[cast].input[0]]
        qshape, sv = tuple(q.dims), numpy_helper.to_array(inits[scale])
        if sv.ndim > len(qshape):
            continue
        sshape = (1,) * (len(qshape) - sv.ndim) + sv.shape
        varying = [d for d, n in enumerate(sshape) if n != 1]
        if any(sshape[d] != qshape[d] for d in varying) or len(varying) > 1 or (varying and opset < 13):
            continue
        new_scale = numpy_helper.from_array(sv.reshape(-1) if varying else sv.reshape(()), f"{node.output[0]}__scale")
        g.initializer.append(new_scale)
        attrs = {"axis": varying[0]} if varying else {}
        g.node[i].CopyFrom(helper.make_node("DequantizeLinear", [q.name, new_scale.name], list(node.output),
                                            name=node.name or f"dequantize_{i}", **attrs))  # fmt: skip
        changed = True
    if changed:
        _prune(model)


def _dequantizes_weight(node: onnx.NodeProto, inits: dict) -> bool:
    """A DequantizeLinear, or a Cast to float, of a large int8/uint8 initializer: a quantized
    weight, which folding here would store as fp32, four times its size."""
    if node.op_type not in ("DequantizeLinear", "Cast") or not node.input or node.input[0] not in inits:
        return False
    t = inits[node.input[0]]
    if t.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or int(np.prod(t.dims)) < 1024:
        return False
    return node.op_type == "DequantizeLinear" or _attr(node, "to", 0) == onnx.TensorProto.FLOAT


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
        if a.name == "value_int":
            return numpy_helper.from_array(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
    raise ValueError("constant without a dense value")


def _single_node_model(node, graph, opsets, init_by_name, new_inits) -> onnx.ModelProto:
    ins = [i for i in node.input if i]
    inits = [init_by_name[i] for i in dict.fromkeys(ins)]
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    sub = helper.make_graph([node], "fold", [], outs, initializer=inits)
    return helper.make_model(sub, opset_imports=opsets)


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing needs any more."""
    g = model.graph
    needed = {o.name for o in g.output}
    live = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    old_inits = {t.name for t in g.initializer}
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    # Old-IR models list initializers among the inputs too; those go with their initializer.
    ins = [i for i in g.input if i.name not in old_inits or i.name in needed]
    del g.input[:]
    g.input.extend(ins)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names the node's subgraphs (If branches, Loop and Scan bodies) read, at any
    depth: inputs of the node as much as its own inputs are."""
    out: dict[str, None] = {}
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            own = {vi.name for vi in sub.input} | {t.name for t in sub.initializer} | \
                {o for n in sub.node for o in n.output}  # fmt: skip
            for n in sub.node:
                for i in [*n.input, *subgraph_reads(n)]:
                    if i and i not in own:
                        out[i] = None
    return list(out)


def node_name(node: onnx.NodeProto, index: int) -> str:
    """A node's name in plans and manifests: its own, or OPTYPE_INDEX when it has none."""
    return node.name or f"{node.op_type}_{index}"


def tensor_dtypes(imported: ImportedModel) -> dict[str, str]:
    """Every typed tensor's numpy dtype name (inputs, intermediates, outputs, initializers);
    "unknown" for an ONNX type numpy has no name for."""
    g = imported.model.graph
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]
            if vi.type.HasField("tensor_type")}  # fmt: skip
    elem.update((t.name, t.data_type) for t in g.initializer)
    out = {}
    for name, e in elem.items():
        try:
            out[name] = str(np.dtype(helper.tensor_dtype_to_np_dtype(e)))
        except Exception:
            out[name] = "unknown"
    return out


def supported_op_types() -> set[str]:
    """ONNX op types TVM's Relax frontend converts."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from .converters import install

    install()
    return set(onnx_frontend._get_convert_map()) | {"Constant", "If"}


def unsupported_ops(imported: ImportedModel, extra_unsupported: tuple | list = ()) -> list[str]:
    """Every op type in the model that the frontend or the target cannot take."""
    supported = supported_op_types()
    return sorted({t for t in imported.op_types if t not in supported or t in extra_unsupported})


def to_relax(imported: ImportedModel):
    """Convert to a Relax IRModule with the weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    bad = unsupported_ops(imported)  # (installs our converters in the frontend's map first)
    if bad:
        raise UnsupportedError(f"unsupported ops: {', '.join(bad)} (TVM's ONNX frontend cannot convert them)")
    shapes = {s.name: list(s.shape) for s in imported.inputs}
    dtypes = {s.name: s.dtype for s in imported.inputs}
    sink = io.StringIO()
    failure = None
    # The frontend prints the failing node to stdout (keep stdout clean for --json), and when it
    # fails TVM's native side warns on stderr as its half-built IR is freed; the CLI promises one
    # error line, so native stderr goes to the debug log while the frontend runs and is released.
    with _native_stderr_to_log():
        try:
            # It also warns about renaming inputs to identifiers; the VM takes them by position.
            with contextlib.redirect_stdout(sink), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mod = from_onnx(imported.model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
        except Exception as e:
            log.debug("TVM's ONNX frontend failed", exc_info=True)
            detail = sink.getvalue().strip().splitlines()
            where = f" ({detail[0][:200]})" if detail else ""
            failure = f"TVM's ONNX frontend failed: {one_line(e)}{where}"
        if failure is not None:
            import gc

            gc.collect()  # the failed frontend's frames are gone with `e`; free its IR here
    if failure is not None:
        raise UnsupportedError(failure)
    return mod


@contextlib.contextmanager
def _native_stderr_to_log():
    """Send what native code writes to fd 2 into the debug log instead of the terminal."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(1 << 16).decode("utf-8", "replace").strip()
            if text:
                log.debug("TVM (native): %s", text)


def unroll_recurrences(imported):
    """``imported`` with the recurrences left whole at import (fused on CPUs) unrolled: for
    backends without the fused kernel."""
    from . import recurrent

    if not any(n.op_type in recurrent.OPS for n in imported.model.graph.node):
        return imported
    model = _copy(imported.model)
    if not static_control_flow(model, recurrences=True):
        return imported
    return dataclasses.replace(imported, model=settle(_infer(model)))
