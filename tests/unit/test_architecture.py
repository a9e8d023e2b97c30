"""The layout's rules, checked on the source: the import contract between the core's layers and the
stages, the installed namespace, and the rank entry point from any working directory."""
import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Where each package's files are (setup.cfg's package_dir): the stages are top-level folders.
FOLDERS = {"medsapiens": "medsapiens", "medsapiens.shards": "shards", "medsapiens.pretrain": "pretrain",
           "medsapiens.finetune": "finetune", "medsapiens.evaluate": "evaluate", "medsapiens.launch": "launch"}
STAGES = ("medsapiens.shards", "medsapiens.pretrain", "medsapiens.finetune", "medsapiens.evaluate",
          "medsapiens.launch")
# The core bottom-up: a module may import its own layer and the ones below, never one above.
# Layers on one line (evaluation, deploy) are independent of each other.
CORE_LAYERS = (
    ("medsapiens", "medsapiens.errors", "medsapiens.config", "medsapiens.distributed"),
    ("medsapiens.io",),
    ("medsapiens.data",),
    ("medsapiens.model",),
    ("medsapiens.evaluation", "medsapiens.deploy"),
    ("medsapiens.training",),
    ("medsapiens.cli",),
)
# What each stage may import besides the core: the flow runs shards -> pretrain -> finetune, and
# fine-tuning ends in an evaluation; launch assembles them all.
STAGE_IMPORTS = {"medsapiens.shards": (), "medsapiens.pretrain": (), "medsapiens.evaluate": (),
                 "medsapiens.finetune": ("medsapiens.evaluate",), "medsapiens.launch": STAGES}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def owner(module: str) -> str:
    """The stage or core layer a module belongs to: the longest prefix named in the rules."""
    names = [*STAGES, *(name for layer in CORE_LAYERS for name in layer)]
    return max((n for n in names if within(module, n)), key=len)


def core_layer(name: str) -> int:
    return next(i for i, layer in enumerate(CORE_LAYERS) if name in layer)


def allowed(importer: str, imported: str) -> bool:
    src, dst = owner(importer), owner(imported)
    if src == dst:
        return True
    if src in STAGES:
        return dst not in STAGES or dst in STAGE_IMPORTS[src]
    if dst in STAGES:
        return False  # the core imports no stage
    if core_layer(src) == core_layer(dst):
        return core_layer(src) == 0  # the base modules use each other; peers (evaluation, deploy) stay apart
    return core_layer(dst) < core_layer(src)


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO)
    package = next(p for p, folder in FOLDERS.items() if relative.parts[0] == folder)
    parts = [*package.split("."), *relative.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, known: set[str]) -> list[tuple[int, str]]:
    """Every medsapiens module a source imports (at top level or inside a function), with its line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                       else node.module) for alias in node.names]
    return [(line, name) for line, name in found if within(name, "medsapiens")]


def sources() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS.values() for p in (REPO / folder).rglob("*.py")}


def violations(modules: dict[str, str]) -> list[str]:
    """'importer:line -> imported' for each import the rules forbid; `modules` maps name -> source."""
    known = set(modules)
    return [f"{name}:{line} -> {target}" for name, text in modules.items()
            for line, target in imports(text, known) if not allowed(name, target)]


def test_the_core_imports_no_stage_and_each_layer_only_those_below():
    modules = {name: path.read_text() for name, path in sources().items()}
    assert len(modules) > 80 and "medsapiens.pretrain.train" in modules and "medsapiens.io.record" in modules
    found = violations(modules)
    assert not found, "imports the layering forbids:\n" + "\n".join(found)


@pytest.mark.parametrize("importer, line, broken_rule", [
    ("medsapiens.io.record", "from medsapiens.pretrain.config import PretrainConfig", "the core imports a stage"),
    ("medsapiens.model.bundle", "from medsapiens.training import checkpoints", "a layer imports one above"),
    ("medsapiens.evaluation.metrics", "import medsapiens.deploy.export", "peer layers import each other"),
    ("medsapiens.shards.plan", "from medsapiens.finetune import cli", "a stage imports a later stage"),
    ("medsapiens.pretrain.train", "def f():\n    from medsapiens.evaluate.report import build_report",
     "a lazy import inside a function"),
])
def test_an_added_forbidden_import_breaks_the_contract(importer, line, broken_rule):
    modules = {name: path.read_text() for name, path in sources().items()}
    modules[importer] += f"\n{line}\n"
    assert len(violations(modules)) == 1, broken_rule


def test_setup_cfg_installs_every_package_under_the_one_namespace():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {module_name(init) for folder in FOLDERS.values() for init in (REPO / folder).rglob("__init__.py")}
    assert listed == on_disk
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert mapping == {package: folder for package, folder in FOLDERS.items() if package != "medsapiens"}


def test_the_rank_entry_point_runs_from_a_folder_that_shadows_the_stage_names(tmp_path):
    """A user's own pretrain.py and launch/ in the working directory change nothing of ours, and no
    top-level stage package is installed."""
    (tmp_path / "pretrain.py").write_text("raise SystemExit('the shadow ran')\n")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "__init__.py").write_text("raise SystemExit('the shadow ran')\n")
    probe = ("import importlib.util, sys; sys.path.remove(''); "
             "print([n for n in ('pretrain', 'finetune', 'shards', 'launch', 'evaluate') if importlib.util.find_spec(n)])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "medsapiens.pretrain", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "python -m medsapiens.pretrain" in proc.stdout, proc.stderr


def test_the_converter_answers_at_its_old_module_path_too():
    for module in ("medsapiens.checkpoints", "medsapiens.training.checkpoints"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--input_folder" in proc.stdout and "--inject_missing_state" in proc.stdout, \
            proc.stderr
