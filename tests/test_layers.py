"""Dependencies point one way: api, gc, replication -> engine -> backends.

import-linter cannot follow the package-dir mapping of this project (its graph builder
only takes top-level packages), so the contract is checked here by reading the imports
of every module with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"backends": "backends", "engine": "engine", "api": "api", "gc": "gc", "replication": "replication"}

# folder -> module prefixes it must never import
FORBIDDEN = {
    "backends": [
        "cargohold.engine",
        "cargohold.api",
        "cargohold.gc",
        "cargohold.replication",
        "cargohold.config",
        "sqlite3",
        "sqlite_utils",
        "starlette",
    ],
    "engine": ["cargohold.api", "cargohold.gc", "cargohold.replication", "starlette", "apscheduler"],
    "gc": ["cargohold.api", "cargohold.backends", "starlette"],
    "replication": ["cargohold.api", "cargohold.backends", "starlette"],
    "api": ["cargohold.backends", "sqlite3", "sqlite_utils", "apscheduler"],
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(folder: str) -> None:
    violations = []
    for path in sorted((ROOT / FOLDERS[folder]).rglob("*.py")):
        for module in imported_modules(path):
            for banned in FORBIDDEN[folder]:
                if module == banned or module.startswith(banned + "."):
                    violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert violations == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from cargohold.engine.registry import Registry\nimport sqlite3\n")
    assert {"cargohold.engine.registry", "sqlite3"} <= imported_modules(module)
