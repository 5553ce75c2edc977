"""The code's shape, kept as the README's layout describes it: no import cycles between the project's
modules, nothing in utils/ that imports the trainer, no entry point that edits `sys.path` (the project
installs as a package), and no function too branchy to read (ruff's C901 at the complexity
pyproject.toml sets)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGES = ("step2_reward_model", "utils", "benchmarks")
OUTSIDE_TESTS = [path for path in REPO_ROOT.rglob("*.py")
                 if path.relative_to(REPO_ROOT).parts[0] in (*PACKAGES, "training_scripts", "rw_eval.py")]


# Folders that install under another name (pyproject.toml's package-dir).
INSTALLED_AS = {"utils": "rlhf_reward.utils", "benchmarks": "rlhf_reward.benchmarks"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    parts[0] = INSTALLED_AS.get(parts[0], parts[0])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`, each as the path from a module back to itself."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_no_module_imports_one_that_imports_it_back():
    paths = [path for path in OUTSIDE_TESTS if path.relative_to(REPO_ROOT).parts[0] in (*PACKAGES, "rw_eval.py")]
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): project_imports(path, modules) - {module_name(path)} for path in paths}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the scan sees the real imports
    assert cycles(graph) == []


def test_utils_imports_nothing_from_the_trainer():
    """utils/ is the library the trainer, scoring and benchmarks build on: an import back from it
    (even one inside a function) would tie it to the trainer and invite cycles."""
    modules = {module_name(path) for path in OUTSIDE_TESTS}
    utils = [path for path in OUTSIDE_TESTS if path.relative_to(REPO_ROOT).parts[0] == "utils"]
    offenders = {module_name(path): sorted(name for name in project_imports(path, modules)
                                           if name.split(".")[0] == "step2_reward_model") for path in utils}
    assert len(utils) > 20 and {name: found for name, found in offenders.items() if found} == {}


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_file_outside_the_tests_changes_sys_path():
    offenders = [str(path.relative_to(REPO_ROOT)) for path in OUTSIDE_TESTS
                 if any(isinstance(node, ast.Attribute) and node.attr == "path"
                        and isinstance(node.value, ast.Name) and node.value.id == "sys"
                        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))]
    assert len(OUTSIDE_TESTS) > 40 and offenders == []


def test_no_function_is_too_complex():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (requirements-dev.txt)")
    result = subprocess.run([ruff, "check", "--select", "C901", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_install_claims_no_generic_top_level_name(tmp_path):
    """`pip install -e .` puts step2_reward_model, rw_eval and rlhf_reward on the path, and nothing named
    `utils` or `benchmarks` (PyPI has a `utils` project; any checkout has such folders): from another
    folder, without this checkout on the path, those names are not ours, and rlhf_reward.* is."""
    import tomllib

    setup = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in setup["packages"]} | set(setup["py-modules"]) == {
        "step2_reward_model", "rlhf_reward", "rw_eval"}
    found = [folder.relative_to(REPO_ROOT).as_posix() for folder in REPO_ROOT.glob("*/**/__init__.py")
             if folder.parts[len(REPO_ROOT.parts)] in ("step2_reward_model", *INSTALLED_AS)]
    listed = {module_name(REPO_ROOT / path) for path in found}
    assert listed == set(setup["packages"])  # every package folder installs
    probe = ("import importlib.util, json; print(json.dumps({name: getattr(importlib.util.find_spec(name), 'origin', "
             "None) for name in ('utils', 'benchmarks', 'rlhf_reward.utils', 'rlhf_reward.benchmarks')}))")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)
    origins = json.loads(result.stdout)
    assert origins["utils"] is None and origins["benchmarks"] is None
    assert origins["rlhf_reward.utils"] == str(REPO_ROOT / "utils" / "__init__.py")
    assert origins["rlhf_reward.benchmarks"] == str(REPO_ROOT / "benchmarks" / "__init__.py")
