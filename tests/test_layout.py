"""The layout the README draws: one test file and one benchmark per op of kernels/, imports that run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPERS = {"loss_options"}  # public, but no op: the loss's options object, shared by grpo_loss and linear_grpo_loss
OPS = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if not p.stem.startswith("_") and p.stem not in HELPERS)


def test_kernels_has_the_ops():
    assert OPS == ["advantages", "grpo_loss", "linear_grpo_loss", "logprob", "prefix_attention"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_test_and_benchmark(op):
    assert (REPO / "tests" / f"test_{op}.py").is_file()
    assert (REPO / "benchmarks" / f"bench_{op}.py").is_file()


def _module_imports() -> dict[str, set[str]]:
    """Module name → the grpo_fast modules it imports (at top level or inside functions)."""
    files = {}
    for folder, package in (("grpo_fast", "grpo_fast"), ("kernels", "grpo_fast.kernels")):
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            files[name] = (path, path.name == "__init__.py")
    imports = {}
    for name, (path, is_package) in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        imports[name] = {m for m in found if m in files and m != name}
    return imports


def test_no_module_imports_a_module_that_imports_it_back():
    imports = _module_imports()
    assert "grpo_fast.shared_prefix" in imports["grpo_fast.forward"]  # the scan sees imports
    cycles = sorted((a, b) for a, deps in imports.items() for b in deps if a < b and a in imports[b])
    assert cycles == []
