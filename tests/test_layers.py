"""The code's shape, checked: the import contracts in pyproject.toml (import-linter), no first-party import hidden in a
function, no function longer than a screen or two without a reason next to it."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import PROJECT_DIR

PACKAGES = ("sweep", "common", "trainer", "evaluation")
FIRST_PARTY = (*PACKAGES, "hydra_plugins")
MAX_LINES = 80
# first-party imports that stay inside a function, each with its reason
LAZY_ON_PURPOSE = {
    ("sweep/__main__.py", "main"): "a misspelt key is refused before torch and diffusers load",
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    return subprocess.run([exe, "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root)})


def test_the_import_contracts_hold():
    r = lint_imports(PROJECT_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "sweep/: entry points > orchestrators > services > base KEPT" in r.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("sweep/selection.py", "from . import job", "sweep/: entry points > orchestrators > services > base"),  # climbs
    ("sweep/report/__init__.py", "from .. import tracking", "sweep/: entry points"),  # a service uses a sibling
    ("trainer/data.py", "import mlflow", "trainer and evaluation know nothing of sweeps"),
    ("evaluation/grid.py", "from trainer import lora", "trainer and evaluation never import each other"),
    ("common/device.py", "from evaluation import grid", "common imports no other first-party package"),
])
def test_a_climbing_import_breaks_a_contract(tmp_path, module, line, broken):
    for name in (*FIRST_PARTY, "pyproject.toml"):
        src = PROJECT_DIR / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert f"{broken}" in r.stdout and "BROKEN" in r.stdout


def _functions(package: str):
    for path in sorted((PROJECT_DIR / package).rglob("*.py")):
        rel = str(path.relative_to(PROJECT_DIR))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, path, node


def test_no_first_party_import_inside_a_function():
    hidden = []
    for package in PACKAGES:
        for rel, _, fn in _functions(package):
            for node in ast.walk(fn):
                first_party = (isinstance(node, ast.ImportFrom) and (node.level or
                                                                      (node.module or "").split(".")[0] in FIRST_PARTY)) \
                    or (isinstance(node, ast.Import) and any(a.name.split(".")[0] in FIRST_PARTY for a in node.names))
                if first_party and (rel, fn.name) not in LAZY_ON_PURPOSE:
                    hidden.append(f"{rel}:{node.lineno} in {fn.name}")
    assert not hidden, f"first-party imports inside functions (a cycle being dodged?): {hidden}"


def test_no_function_is_longer_than_a_screen_or_two_without_saying_why():
    long = []
    for package in PACKAGES:
        for rel, path, fn in _functions(package):
            lines = fn.end_lineno - fn.lineno + 1
            source = path.read_text().splitlines()
            said = any("long on purpose" in source[i] for i in range(max(0, fn.lineno - 3), fn.lineno + 1))
            if lines > MAX_LINES and not said:
                long.append(f"{rel}:{fn.lineno} {fn.name} ({lines} lines)")
    assert not long, f"functions over {MAX_LINES} lines (split them, or say why next to the def: 'long on purpose'): {long}"
