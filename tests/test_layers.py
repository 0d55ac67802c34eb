"""The layers of DESIGN.md section 2, read from the source: no import runs back up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package (folder) -> module prefixes it must never import (absolute names, relative ones resolved)
FORBIDDEN = {
    "protocol": ("backend", "blender_addon", "torch", "bpy"),
    "blender_addon": ("backend", "torch"),
    "backend": ("bpy", "blender_addon"),
    "backend/stages": ("backend.loop", "backend.service", "backend.cli", "backend.evaluate"),
    "backend/estimators": ("backend.stages", "backend.loop", "backend.generators", "backend.service"),
    "backend/generators": ("backend.loop", "backend.service", "backend.cli"),
    "backend/rasterizers": ("backend.stages", "backend.loop", "backend.generators", "backend.service"),
    "backend/types.py": ("backend.stages", "backend.estimators", "backend.generators", "backend.loop"),
    "backend/camera_paths.py": ("backend.stages", "backend.loop", "torch"),
}
# exceptions to FORBIDDEN: the torch-free part of backend that the extension bundles (scripts/build_extension.py,
# FORMAT_FILES and backend/formats), so that Blender imports datasets through the same code as the CLI
ALLOWED = {"blender_addon": ("backend.formats", "backend.scene")}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports at run time (at any depth of the file), relative imports made absolute."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for block in ast.walk(tree):  # imports for type checkers only do not run
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_import_runs_back_up_a_layer(where: str) -> None:
    root = REPO / where
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    assert files, f"{where}: nothing to check"
    bad = []
    for f in files:
        for name in imported_modules(f):
            allowed = any(name == p or name.startswith(p + ".") for p in ALLOWED.get(where, ()))
            if not allowed and any(name == p or name.startswith(p + ".") for p in FORBIDDEN[where]):
                bad.append(f"{f.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


UNIX_ONLY = {"fcntl", "resource", "termios", "pwd", "grp"}  # Python's docs: Availability: Unix


@pytest.mark.parametrize("package", ["backend", "protocol", "blender_addon"])
def test_no_module_imports_a_unix_only_module_where_windows_would_fail(package: str) -> None:
    """The service and the extension run on Windows too: a module-level import of a Unix-only module must sit
    under ``try``/``except ImportError`` (``import resource`` in backend/outputs.py failed every job there)."""
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only: an import in a function is lazy
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in UNIX_ONLY]
    assert not bad, bad
