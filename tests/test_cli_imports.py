"""`uwm --help` and the help of the light commands answer without importing torch or
transformers (each costs seconds); the model still registers with the Auto classes whenever it
is used."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, sys
from unified_wm.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # argparse's --help
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "deepspeed") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
'''


def _probe(*args: str) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_uwm_help_imports_neither_torch_nor_transformers():
    info, out = _probe("--help")
    assert info["code"] == 0 and "uwm rollout" in out
    assert "torch" not in info["heavy"] and "transformers" not in info["heavy"], info


@pytest.mark.parametrize("command", [("play",), ("export",), ("pipeline",), ("demo",), ("data", "tokenize"),
                                     ("tokenizer", "build-processor"), ("tokenizer", "train-text")])
def test_light_command_help_does_not_import_torch(command):
    info, out = _probe(*command, "--help")
    assert info["code"] == 0 and f"uwm {' '.join(command)}" in out
    assert "torch" not in info["heavy"] and "transformers" not in info["heavy"], info


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the import order under test is its own)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_model_registers_after_import_unified_wm_then_transformers():
    code = ("import sys, unified_wm\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "cfg = AutoConfig.for_model('unified_wm', hidden_size=32, num_attention_heads=4)\n"
            "print(type(cfg).__module__, 'unified_wm' in CONFIG_MAPPING)\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["unified_wm.model.modeling_uwm", "True"]
    # and the package's names still resolve (lazily)
    import unified_wm
    from unified_wm.model.modeling_uwm import UnifiedWMConfig

    assert unified_wm.UnifiedWMConfig is UnifiedWMConfig


def test_model_registers_when_transformers_is_first_imported_inside_the_package():
    """`from unified_wm.model.cache import UWMCache` first: transformers is imported from inside
    a half-made module; the model registers once that import is done, without a warning."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from unified_wm.model.cache import UWMCache\n"
            "from transformers import AutoConfig\n"
            "cfg = AutoConfig.for_model('unified_wm', hidden_size=32, num_attention_heads=4)\n"
            "print(type(cfg).__module__)\n")
    r = _python(code)
    assert r.returncode == 0 and "could not register" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.split() == ["unified_wm.model.modeling_uwm"]
