"""The package map holds: import-linter's contracts (pyproject ``[tool.importlinter]``) and
no import of another package's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aeventor

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(aeventor.__file__).resolve().parent


def test_import_contracts() -> None:
    # The venv's own script, beside the interpreter running the tests (README: .venv/bin/python).
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: pip install -e '.[dev]'"
    proc = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (
        "import-linter contracts broken (pyproject [tool.importlinter]):\n"
        + proc.stdout
        + proc.stderr
    )


def _module_name(path: Path) -> tuple[str, bool]:
    """The dotted name of a source file, and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _is_package(dotted: str) -> bool:
    return (PACKAGE_DIR.parent.joinpath(*dotted.split(".")) / "__init__.py").is_file()


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _owner(target: str) -> str | None:
    """The package a private name in ``target`` belongs to, or None if all of it is public.

    ``aeventor.x._y`` and ``aeventor.x._y.z`` belong to ``aeventor.x``; ``aeventor.x.m._f``
    (a private name of module ``m``) belongs to ``m``'s package, ``aeventor.x``.
    """
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            prefix = ".".join(parts[:i])
            return prefix if _is_package(prefix) else prefix.rpartition(".")[0]
    return None


def _imported(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, full dotted target) of each ``aeventor`` import, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}" if alias.name != "*" else source


def _private_import_violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module, is_package = _module_name(path)
        own_package = module if is_package else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target in _imported(tree, module, is_package):
            if target.split(".")[0] != "aeventor":
                continue
            owner = _owner(target)
            if owner is not None and owner != own_package:
                rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{rel}:{line}: imports {target}, private to {owner}")
    return found


def test_no_private_imports_across_packages() -> None:
    """A module may import ``aeventor.x._y`` or ``from aeventor.x import _name`` only from its
    own package ``aeventor.x``: anything used elsewhere gets a public name."""
    violations = _private_import_violations()
    assert not violations, (
        "imports of another package's private names (make the name public, or re-export it "
        "from its package):\n  " + "\n  ".join(violations)
    )


def test_private_import_rule() -> None:
    """The checker itself: relative imports resolved, private modules and names both seen."""
    assert _owner("aeventor.dispatch._state.Graph") == "aeventor.dispatch"
    assert _owner("aeventor.context._current") == "aeventor"
    assert _owner("aeventor._eventor") == "aeventor"
    assert _owner("aeventor.dispatch.logs.step_log_path") is None
    assert _owner("aeventor.__version__") is None
    tree = ast.parse("from ..dispatch import _state\nfrom . import local\n")
    assert list(_imported(tree, "aeventor.backends.executors", is_package=True)) == [
        (1, "aeventor.backends.dispatch._state"),
        (2, "aeventor.backends.executors.local"),
    ]
    tree = ast.parse("from ..dispatch import _state\n")
    assert list(_imported(tree, "aeventor.cli.main", is_package=False)) == [
        (1, "aeventor.dispatch._state"),
    ]
