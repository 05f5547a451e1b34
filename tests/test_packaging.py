"""The install files agree with each other, and CI runs exactly the README's test command."""
import os
import re
import shutil
import tomllib

import pytest
import yaml

from tests.conftest import ROOT, chromium_path


def test_environment_yml_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(deps)
    assert "python=3.11" in env["dependencies"]


def test_constraints_agree_with_pyproject():
    deps = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    constraints = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert set(constraints) <= deps


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"```sh\n(?:.*\n)*?(make test)\n", readme).group(1)
    assert command in ci.splitlines()


def test_a_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must open the pages"):
        chromium_path()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium_path()


# The stages, in the order data flows through them: a package may import only those before it.
FLOW = ["common", "render", "dataset", "model", "optimize3d", "pipelines"]


def test_imports_follow_the_flow_of_the_stages():
    """render -> dataset -> model -> optimize3d -> pipelines, every import at any depth of a module (lazy
    ones inside functions too): a stage never reaches forward into one that consumes its output."""
    import ast
    backward = []
    for stage, package in enumerate(FLOW):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top in FLOW and FLOW.index(top) > stage:
                        backward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not backward, backward


def test_every_entry_point_imports_common_before_torch():
    """common/__init__.py sets torch's OpenMP spin (GOMP_SPINCOUNT) only if it runs before torch loads: in
    every script (pipelines/, bench/, optimize3d/preprocess.py) the first import of torch or of a project
    package is `common`'s. And it takes effect: a fresh process that imports common then torch has it set."""
    import ast
    import subprocess
    import sys
    project = {"common", "torch", "model", "optimize3d", "dataset", "render", "pipelines"}
    scripts = sorted((ROOT / "pipelines").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")) + [ROOT / "optimize3d" / "preprocess.py"]
    wrong = []
    for path in scripts:
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            tops = {n.split(".")[0] for n in names} & project
            if tops:
                if tops != {"common"}:
                    wrong.append(f"{path.relative_to(ROOT)}: {sorted(tops)}")
                break
    assert not wrong, wrong
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", "import common, torch, os; print(os.environ['GOMP_SPINCOUNT'])"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out == "10000"
