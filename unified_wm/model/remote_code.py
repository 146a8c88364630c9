"""The model's code inside an exported folder, so that it loads without this package:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

as Hugging Face custom models ship: ``config.json`` names the classes in ``auto_map`` and the
folder holds ``modeling_uwm.py`` (configuration and model) with the files it imports.

transformers' loader copies the module that ``auto_map`` names, and every file it reaches by
relative imports of the form ``from .name import ...`` (found by a regular expression, then
looked up as ``name.py`` beside it), into its module cache, and rewrites nothing. So the model
files import each other only that way (never ``from unified_wm...``, never ``from . import
name``, which the loader does not follow), and the list below is derived with the loader's own
function: the folder carries exactly what the loader will copy. Files other than ``.py`` are
never copied: without ``moc_cpu.cpp`` the ``gather`` backend uses its torch path (same results).
"""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
MODELING_FILE = "modeling_uwm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_uwm.UnifiedWMConfig",
    "AutoModelForCausalLM": "modeling_uwm.UnifiedWMForCausalLM",
}


def remote_code_files() -> list[Path]:
    """The files an exported folder carries: the modeling module and, recursively, what it imports
    relatively. Raises when an import the loader would follow names no file (e.g. a package)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    main = MODEL_DIR / MODELING_FILE
    files = [main] + [Path(f) for f in get_relative_import_files(str(main))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"the exported model code imports {', '.join(f.name for f in missing)} relatively, but "
                           f"no such file is in {MODEL_DIR}: transformers' loader needs flat '.py' modules")
    return sorted(set(files), key=lambda f: (f != main, f.name))


def package_imports(path: Path) -> list[str]:
    """Imports of this package in ``path`` that run unguarded (not inside ``try``): each would fail
    in a folder loaded without the package."""
    bad: list[str] = []

    def walk(node):
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "unified_wm":
            bad.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            bad.extend(f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "unified_wm")
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(ast.parse(path.read_text(encoding="utf-8")))
    return bad


def unfollowed_imports(files: list[Path]) -> list[str]:
    """Relative imports in ``files`` of modules that are not among them: transformers' loader only
    follows ``from .name import ...``, so a module reached only by ``from . import name`` (or
    ``from ..name import ...``) would be missing from the loaded folder."""
    have = {f.stem for f in files}
    bad: list[str] = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            if node.level > 1:
                bad.append(f"{f.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
            elif node.module is None:
                bad.extend(f"{f.name}:{node.lineno}: from . import {a.name}" for a in node.names if a.name not in have)
    return bad


def write_remote_code(folder: str | Path) -> list[str]:
    """Copy the model code into ``folder`` (a ``save_pretrained`` output) and add ``auto_map`` to
    its ``config.json``. Returns the names of the files written."""
    folder = Path(folder)
    files = remote_code_files()
    names = []
    for f in files:
        shutil.copyfile(f, folder / f.name)
        names.append(f.name)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = dict(AUTO_MAP)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return names
