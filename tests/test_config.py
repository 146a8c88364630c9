"""Config loading: the usual float notation (1e-3, 1E5, .5) everywhere configs are read, and
errors about a --set value name --set."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unified_wm.utils import ConfigError, load_config, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_reads_exponent_and_leading_dot_floats():
    got = load_yaml("a: 1e-3\nb: 1E5\nc: .5\nd: -2.5e-2\ne: 3\nf: 1.2.3\ng: 2e\nh: '1e-3'\n")
    assert got == {"a": 0.001, "b": 100000.0, "c": 0.5, "d": -0.025, "e": 3, "f": "1.2.3", "g": "2e", "h": "1e-3"}
    assert isinstance(got["e"], int)


def test_recipe_with_exponent_lr_loads(tiny_recipe):
    from unified_wm.train import load_recipe, parse_override

    text = tiny_recipe.read_text().replace("lr: 0.003", "lr: 1e-3")
    assert "lr: 1e-3" in text
    tiny_recipe.write_text(text)
    assert load_recipe(tiny_recipe).train.lr == 0.001
    r = load_recipe(tiny_recipe, parse_override("train.lr=2E-4"))
    assert r.train.lr == 0.0002


def test_bad_set_value_names_set_not_the_recipe(tiny_recipe, capsys):
    from unified_wm.train import load_recipe, main, parse_override

    with pytest.raises(ConfigError) as e:
        load_recipe(tiny_recipe, parse_override("train.lr=fast"))
    assert str(e.value).startswith("--set train.lr='fast': 'train.lr' must be a number")
    with pytest.raises(ConfigError, match=r"^--set train.lrr=0.1: unknown key 'train.lrr'"):
        load_recipe(tiny_recipe, parse_override("train.lrr=.1"))
    # an error of the file itself still names the file
    tiny_recipe.write_text(tiny_recipe.read_text().replace("lr: 0.003", "lr: fast"))
    with pytest.raises(ConfigError, match=rf"^{tiny_recipe}: 'train.lr' must be a number"):
        load_recipe(tiny_recipe, parse_override("train.max_steps=3"))
    assert main(["--recipe", str(tiny_recipe), "--set", "train.lr=1e-3", "--set", "train.warmup_steps=x"]) == 2
    assert "--set train.warmup_steps='x'" in capsys.readouterr().err


def test_eval_suite_and_world_and_tokenizer_configs_take_exponent_floats(tmp_path):
    from unified_wm.data.world import WorldConfig
    from unified_wm.eval.runner import Suite
    from unified_wm.tokenization.video import VideoTokenizerConfig

    suite = yaml.safe_load((ROOT / "eval/quick.yaml").read_text())
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(suite).replace("offscreen_threshold_px: 8.0", "offscreen_threshold_px: 8e0"))
    assert load_config(Suite, p).offscreen_threshold_px == 8.0
    w = tmp_path / "world.yaml"
    w.write_text((ROOT / "recipes/data/world_tiny.yaml").read_text().replace("min_speed: 0.5", "min_speed: .5"))
    assert load_config(WorldConfig, w).min_speed == 0.5
    v = tmp_path / "vt.yaml"
    v.write_text((ROOT / "tokenizers/video_fsq_tiny.yaml").read_text().replace("lr: 0.002", "lr: 2e-3"))
    assert load_config(VideoTokenizerConfig, v).train.lr == 0.002
