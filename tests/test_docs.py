"""The launcher commands the README, BENCHMARKS, recipes and docstrings give a user parse with
the `deepspeed` launcher's own argument parser (a `-m` it does not know once slipped into all
of them)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "recipes").rglob("*.yaml")),
        *sorted((ROOT / "unified_wm").rglob("*.py"))]
# "deepspeed", its launcher flags, then the module it runs
COMMAND = re.compile(r"\bdeepspeed((?:[ \t]+-[^\s`]*(?:[ \t]+[^-\s`][^\s`]*)?)*)[ \t]+(\S*unified_wm\.train)\b")


def documented_launches() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # shell line continuations
        text = re.sub(r"(?m)^#\s*", "", text)              # commands quoted in YAML comments
        for m in COMMAND.finditer(text):
            found.append((str(path.relative_to(ROOT)), m.group(0)))
    return found


def test_the_docs_give_launcher_commands():
    where = {p for p, _ in documented_launches()}
    assert {"README.md", "recipes/tiny_cpu.yaml", "unified_wm/train.py"} <= where, where


@pytest.mark.parametrize("where,command", documented_launches())
def test_documented_launcher_command_parses(where, command):
    from deepspeed.launcher.runner import parse_args
    argv = ["8" if t == "N" else t for t in shlex.split(command)[1:]]  # N: a placeholder for a count
    try:
        args = parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: the deepspeed launcher refuses `{command}` (exit {e.code})")
    assert args.user_script.endswith("unified_wm.train") and args.module, (where, command)
