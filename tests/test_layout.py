"""The package's plan, checked: no import cycles, no backend branching outside compiler/backends/,
every profile has a backend (a typo gets a did-you-mean), one error-line helper."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest
from conftest import cli

import tvm_hybrid
from tvm_hybrid.compiler import backends
from tvm_hybrid.errors import UsageError, one_line
from tvm_hybrid.targets import all_profiles

ROOT = pathlib.Path(tvm_hybrid.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: pathlib.Path, modules) -> set[str]:
    """The package's modules that ``mod`` imports anywhere (module level or inside functions)."""
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - (node.level - 1)] if node.level else []
            m = ".".join(base + ([node.module] if node.module else []))
            names = [m] + [f"{m}.{a.name}" for a in node.names]
        else:
            continue
        deps.update(n for n in names if n in modules and n != mod)
    return deps


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_backend_branching_outside_the_backends():
    """Analysis, package, build and tune ask the backend; only compiler/backends/ knows the kinds."""
    kinds = re.compile(r"""is_cuda|is_webgpu|kind\.name|\.get\(["']kind["']\)|["'](llvm|cuda|webgpu)["']""")
    for path in (ROOT / "compiler").glob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not kinds.search(code), f"{path.name}:{i} branches on the target kind: {line.strip()}"


def test_every_profile_has_a_backend_and_a_typo_gets_a_suggestion(tmp_path, monkeypatch):
    for name, prof in all_profiles().items():
        b = backends.for_profile(prof)
        assert b.name == prof.backend, name
        assert b.name == backends.BY_TVM_KIND[prof.tvm_target["kind"]], name  # the TOML agrees with its kind
    with pytest.raises(UsageError, match="did you mean 'cpu'"):
        backends.get("cpy")
    src = (ROOT.parent / "targets" / "x86-64.toml").read_text()
    (tmp_path / "typo.toml").write_text(src.replace('name = "x86-64"', 'name = "typo"').replace('backend = "cpu"', 'backend = "cpy"'))
    monkeypatch.setenv("TVM_HYBRID_TARGETS_PATH", str(tmp_path))
    proc = cli("compile", str(ROOT.parent / "tests/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"), "--input",
               "x:1x3x48x192", "-t", "typo", "-o", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "did you mean 'cpu'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_one_error_line_helper():
    """errors.one_line is the only "first line of an error" helper."""
    helpers = re.compile(r"def _(first|last|one)_line\b")
    for path in ROOT.rglob("*.py"):
        assert not helpers.search(path.read_text()), f"{path} defines its own error-line helper"
    assert one_line(ValueError("bad input\n  at line 3")) == "bad input"
    assert one_line(RuntimeError("")) == "RuntimeError"
    assert one_line("Error:\n  the reason\nmore") == "Error: the reason"
    assert one_line("a\n\nlast one\n", last=True) == "last one"
    assert one_line(None, empty="no output") == "no output"


def test_emulate_subcommand_reports_the_sysroot(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_HYBRID_AARCH64_SYSROOT", str(tmp_path / "none"))
    proc = cli("emulate", "path")
    assert proc.returncode == 1 and proc.stderr.startswith("Error: no aarch64 emulation sysroot"), proc.stderr
    assert "tvm-hybrid emulate setup" in proc.stderr
    proc = cli("emulate", "setup", "--arch", "riscv64")
    assert proc.returncode == 2, proc.stderr


def test_manifest_round_trips_through_its_types(artifacts):
    """Manifest.from_dict(d).to_dict() == d for a compiled artifact (the format is the JSON's)."""
    from conftest import CLS

    from tvm_hybrid.manifest import Manifest

    art = artifacts.get(CLS, {"x": (1, 3, 48, 192)})
    d = json.loads((art / "manifest.json").read_text())
    assert Manifest.from_dict(d).to_dict() == d
