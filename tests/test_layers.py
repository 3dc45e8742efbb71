"""The code's shape, checked: the import contracts in pyproject.toml (import-linter), no first-party import hidden in a
function, no function longer than a screen or two without a reason next to it."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import PROJECT_DIR

PACKAGES = ("sweep", "common", "families", "trainer", "evaluation")
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
    ("common/device.py", "import families", "common imports no other first-party package"),
    ("families/sdxl.py", "from trainer import lora", "families (one module per base model) imports only common"),
    ("families/base.py", "import mlflow", "families (one module per base model) imports only common"),
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


# ---- families/: the only place that knows a base model's classes -------------------------------------------------
# import-linter sees only the top-level `diffusers` package, so the finer rule is checked here: outside families/, no
# first-party module imports a diffusers model, pipeline, scheduler or LoRA-loader class, nor those subpackages;
# diffusers' generic helpers (training_utils, optimization, utils, its logging) stay allowed everywhere.
OUTSIDE_FAMILIES = ("sweep", "common", "trainer", "evaluation", "hydra_plugins", "bench")
FAMILY_SUBPACKAGES = ("diffusers.models", "diffusers.pipelines", "diffusers.schedulers", "diffusers.loaders")
FAMILY_CLASS = re.compile(r"(Pipeline|Model|Model2D|ModelWithProjection|Scheduler|LoraLoaderMixin)$"
                          r"|^(UNet|Autoencoder|VQModel|ControlNet|StableDiffusion|Flux|SD3|Kandinsky)|Transformer")


def _diffusers_classes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each diffusers model/pipeline/scheduler class a module imports or reaches as diffusers.X."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffusers" and not node.level:
            if node.module.startswith(FAMILY_SUBPACKAGES):
                found.append((node.lineno, f"from {node.module} import ..."))
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if FAMILY_CLASS.search(a.name)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith(FAMILY_SUBPACKAGES)]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "diffusers"
              and FAMILY_CLASS.search(node.attr)):
            found.append((node.lineno, f"diffusers.{node.attr}"))
    return found


def _modules_outside_families():
    for package in OUTSIDE_FAMILIES:
        for path in sorted((PROJECT_DIR / package).rglob("*.py")):
            yield str(path.relative_to(PROJECT_DIR)), ast.parse(path.read_text())


def test_only_families_import_diffusers_model_and_pipeline_classes():
    leaks = [f"{rel}:{line} {what}" for rel, tree in _modules_outside_families() for line, what in
             _diffusers_classes(tree)]
    assert not leaks, ("diffusers model/pipeline/scheduler classes outside families/ (ask the model's family "
                       f"instead: families.get(cfg.model.family), families.of_pipeline(pipe)): {leaks}")


@pytest.mark.parametrize("line", [
    "from diffusers import StableDiffusionXLPipeline",
    "from diffusers import FluxTransformer2DModel",
    "from diffusers.schedulers import EulerDiscreteScheduler",
    "import diffusers.pipelines.flux",
    "x = diffusers.AutoencoderKL",
])
def test_the_diffusers_rule_sees_each_way_in(line):
    assert _diffusers_classes(ast.parse(f"import diffusers\n{line}\n")), line


def test_generic_diffusers_helpers_stay_allowed():
    source = ("from diffusers.training_utils import compute_snr, free_memory, offload_models\n"
              "from diffusers.optimization import get_scheduler\nimport diffusers.utils.logging\n"
              "from diffusers.utils import convert_unet_state_dict_to_peft\n")
    assert _diffusers_classes(ast.parse(source)) == []


# no `if family == "sdxl"`: trainer/, evaluation/ and sweep/ call the family's methods, whatever the family
# (membership in the registry, `model.family in families.FAMILIES`, is validation, not a branch)
FAMILY_BRANCH = re.compile(r"family(?:\.name)?\s*(?:==|!=)|family(?:\.name)?\s+(?:not\s+)?in\s*[(\[{\"']"
                           r"|\bisinstance\([^)]*\b(?:SDXL|Flux|FLUX)\w*|\.name\s*(?:==|!=)\s*[\"'](?:sdxl|flux)")


def test_no_family_branching_outside_families():
    hits = []
    for package in ("trainer", "evaluation", "sweep"):
        for path in sorted((PROJECT_DIR / package).rglob("*.py")):
            for n, text in enumerate(path.read_text().splitlines(), 1):
                if FAMILY_BRANCH.search(text):
                    hits.append(f"{path.relative_to(PROJECT_DIR)}:{n}: {text.strip()}")
    assert not hits, f"family branches outside families/ (put the difference behind the family's interface): {hits}"


@pytest.mark.parametrize("text", ['if cfg.model.family == "flux":', "if family in (\"sdxl\",):", "if model.family not in {'flux'}:",
                                  "isinstance(fam, SDXL)", 'if f.name == "sdxl":'])
def test_the_branch_grep_sees_each_form(text):
    assert FAMILY_BRANCH.search(text)
