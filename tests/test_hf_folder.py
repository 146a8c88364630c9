"""An exported folder is a self-contained Hugging Face custom model: with ``trust_remote_code=True``
it loads where ``unified_wm`` cannot be imported at all, and gives the same logits as the model
loaded through the package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Run in a fresh interpreter, away from the repository, with every import of unified_wm refused.
BLOCKED = r'''
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "unified_wm" or name.startswith("unified_wm."):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Refuse())
sys.path = [p for p in sys.path if p not in ("", ".")]
try:
    import unified_wm  # noqa: F401
    raise SystemExit("unified_wm is importable: the test proves nothing")
except ImportError:
    pass

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

folder, ids_file, out = sys.argv[1:4]
cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.tensor([json.loads(open(ids_file).read())])
with torch.no_grad():
    logits = model(input_ids=ids).logits
save_file({"logits": logits.contiguous()}, out)
assert not any(m == "unified_wm" or m.startswith("unified_wm.") for m in sys.modules), "unified_wm was imported"
print(json.dumps({"config": type(cfg).__module__, "model": type(model).__module__,
                  "backend": cfg.attention["backend"]}))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokens_dir, processor_dir):
    """`uwm train` (one process, MoC attention) for 2 steps, then `uwm export`."""
    d = tmp_path_factory.mktemp("hfdir")
    rp = write_tiny_recipe(d, tokens_dir, processor_dir, max_steps=2, save_every=2, keep_checkpoints=0)
    recipe = yaml.safe_load(rp.read_text())
    recipe["attention"] = {"backend": "moc", "top_k": 2}
    rp.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["train", "--recipe", str(rp), "--no-progress"],
                 ["export", "--checkpoint", str(d / "run" / "checkpoints"), "--out", str(d / "hf")]):
        r = subprocess.run([PY, "-m", "unified_wm.cli", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d / "hf"


def test_exported_folder_carries_its_code(exported):
    from unified_wm.model.remote_code import AUTO_MAP, package_imports, remote_code_files, unfollowed_imports

    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["auto_map"] == AUTO_MAP
    files = remote_code_files()
    names = [f.name for f in files]
    assert unfollowed_imports(files) == []  # each would name a module the loader does not copy
    assert names[0] == "modeling_uwm.py" and "attention.py" in names
    for name in names:
        f = exported / name
        assert f.is_file(), name
        assert package_imports(f) == [], package_imports(f)  # each would fail without the package


def test_exported_folder_loads_without_the_package(exported, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import unified_wm  # noqa: F401  (registers the model: the package's own classes)
    from unified_wm.data.tokenize import load_token_documents

    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["attention"]["backend"] == "moc"
    recipe_tokens = json.loads((exported / "training_seeds.json").read_text())["data"]
    ids = list(load_token_documents(recipe_tokens)["input_ids"][0][:400])
    (tmp_path / "ids.json").write_text(json.dumps([int(i) for i in ids]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    r = subprocess.run([PY, "-c", BLOCKED, str(exported), str(tmp_path / "ids.json"), str(tmp_path / "logits.st")],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["model"].startswith("transformers_modules.") and info["config"].startswith("transformers_modules.")
    assert "Traceback" not in r.stderr and "could not be built" not in r.stderr, r.stderr[-2000:]
    remote = load_file(tmp_path / "logits.st")["logits"]

    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(model).__module__ == "unified_wm.model.modeling_uwm"
    with torch.no_grad():
        local = model(input_ids=torch.tensor([ids])).logits
    assert remote.shape == local.shape == (1, len(ids), cfg["vocab_size"])
    assert torch.allclose(remote, local, rtol=0, atol=1e-5), (remote - local).abs().max()
