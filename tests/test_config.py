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
    from unified_wm.recipe import load_recipe
    from unified_wm.train import parse_override

    text = tiny_recipe.read_text().replace("lr: 0.003", "lr: 1e-3")
    assert "lr: 1e-3" in text
    tiny_recipe.write_text(text)
    assert load_recipe(tiny_recipe).train.lr == 0.001
    r = load_recipe(tiny_recipe, parse_override("train.lr=2E-4"))
    assert r.train.lr == 0.0002


def test_bad_set_value_names_set_not_the_recipe(tiny_recipe, capsys):
    from unified_wm.recipe import load_recipe
    from unified_wm.train import main, parse_override

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
    from unified_wm.eval.suite import Suite
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


# ----------------------------------------------------------------------------- value checks (key and file named)


@pytest.mark.parametrize("override,key", [
    ({"train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio"),
    ({"train": {"min_lr_ratio": -0.1}}, "train.min_lr_ratio"),
    ({"train": {"grad_clip": -1.0}}, "train.grad_clip"),
    ({"train": {"scheduled_sampling": 1.5}}, "train.scheduled_sampling"),
    ({"train": {"scheduled_sampling": 0.3, "sequence_parallel": 2}}, "train.scheduled_sampling"),
    ({"train": {"scheduled_sampling_ramp": -1}}, "train.scheduled_sampling_ramp"),
    ({"train": {"scheduled_sampling_passes": 0}}, "train.scheduled_sampling_passes"),
    ({"train": {"changed_code_weight": -1.0}}, "train.changed_code_weight"),
    ({"tasks": {"interleaved": {"weight": 1.0, "loss": {"video": -1.0}}}}, "tasks.interleaved.loss.video"),
    ({"tasks": {"interleaved": {"weight": -1.0}, "caption": {"weight": 2.0}}}, "tasks.interleaved.weight"),
])
def test_recipe_values_out_of_range_name_the_key_and_file(tiny_recipe, override, key):
    from unified_wm.recipe import load_recipe

    data = yaml.safe_load(tiny_recipe.read_text())
    for section, values in override.items():
        data[section].update(values)
    tiny_recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_recipe(tiny_recipe)
    assert str(e.value).startswith(f"{tiny_recipe}: ") and f"'{key}'" in str(e.value)


def test_video_tokenizer_values_out_of_range(tmp_path):
    from unified_wm.tokenization.video import VideoTokenizerConfig

    base = (ROOT / "tokenizers/video_fsq_tiny.yaml").read_text()
    p = tmp_path / "vt.yaml"
    for old, new, key in (("min_lr_ratio: 0.05", "min_lr_ratio: 2", "train.min_lr_ratio"),
                          ("grad_loss_weight: 0.0", "grad_loss_weight: -1", "train.grad_loss_weight"),
                          ("threads: 1", "threads: 1\n  grad_clip: -2", "train.grad_clip")):
        p.write_text(base.replace(old, new))
        with pytest.raises(ConfigError, match=rf"^{p}: {key} = "):
            load_config(VideoTokenizerConfig, p)


@pytest.mark.parametrize("key", ["n_landmarks", "max_offscreen"])
def test_world_counts_must_not_be_negative(tmp_path, key):
    from unified_wm.data.world import WorldConfig

    p = tmp_path / "w.yaml"
    p.write_text(f"{key}: -1\n")
    with pytest.raises(ConfigError, match=rf"^{p}: {key} must be >= 0, got -1"):
        load_config(WorldConfig, p)


@pytest.mark.parametrize("edit,key", [({"n_episodes": 0}, "n_episodes"), ({"n_probes": 0}, "n_probes")])
def test_suite_with_nothing_to_evaluate_is_refused(tmp_path, edit, key):
    from unified_wm.eval.suite import Suite

    suite = yaml.safe_load((ROOT / "eval/quick.yaml").read_text())
    assert "offscreen" in suite["tasks"]
    suite.update(edit)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=rf"^{p}: {key} = 0"):
        load_config(Suite, p)


def test_misspelled_deepspeed_key_is_named_with_the_file(tiny_recipe):
    import json

    from unified_wm.recipe import fill_ds_config, load_recipe

    recipe = load_recipe(tiny_recipe)
    for f in sorted((ROOT / "ds_configs").glob("*.json")):  # every shipped config passes
        fill_ds_config(json.loads(f.read_text()), recipe, 2, str(f))
    with pytest.raises(ConfigError, match=r"^my_ds.json: unknown DeepSpeed config key 'train_batch_sze' "
                                          r"\(did you mean 'train_batch_size'\?\)"):
        fill_ds_config({"train_batch_sze": 2, "zero_optimization": {"stage": 0}}, recipe, 2, "my_ds.json")
    # keys DeepSpeed reads but the shipped configs do not use still pass
    fill_ds_config({"wall_clock_breakdown": False, "tensorboard": {"enabled": False}, "flops_profiler": {"enabled": False},
                    "activation_checkpointing": {}, "communication_data_type": None, "compile": {}}, recipe, 2, "x.json")


# ----------------------------------------------------------------------------- eval: held-out status


def test_eval_without_training_seeds_says_not_checked(tmp_path):
    import datasets

    from unified_wm.eval.report import markdown_table
    from unified_wm.eval.suite import check_held_out

    ds = datasets.Dataset.from_dict({"seed": [5, 6]})
    assert check_held_out(tmp_path, ds, "s.yaml") == "not checked"
    (tmp_path / "training_seeds.json").write_text('{"seeds": [1, 2]}')
    assert check_held_out(tmp_path, ds, "s.yaml") == "checked"
    (tmp_path / "training_seeds.json").write_text('{"seeds": [5]}')
    with pytest.raises(ConfigError, match="shares 1 episode seeds"):
        check_held_out(tmp_path, ds, "s.yaml")
    table = markdown_table({"suite": "quick", "n_episodes": 2, "held_out": "not checked"})
    assert "held-out: not checked" in table.splitlines()[0]
    assert "on 2 held-out episodes" in markdown_table({"suite": "quick", "n_episodes": 2, "held_out": "checked"})


def test_recipe_model_and_attention_defaults_are_the_configs():
    """One set of defaults: a recipe that leaves a model or attention key out gets the value the
    model config (and the attention settings) would give."""
    import dataclasses
    import inspect

    from unified_wm.model.attention import AttentionSettings
    from unified_wm.model.modeling_uwm import UnifiedWMConfig
    from unified_wm.recipe import AttentionRecipe, ModelRecipe

    cfg = inspect.signature(UnifiedWMConfig.__init__).parameters
    for f in dataclasses.fields(ModelRecipe):
        assert f.default == cfg[f.name].default, f"model.{f.name}: recipe {f.default} vs config {cfg[f.name].default}"
    # the attention keys have one home (CONFIG_KEYS, AttentionSettings' defaults): recipe, config.json
    # and settings name the same keys with the same defaults
    from unified_wm.model.attention import CONFIG_KEYS

    st = {f.name: f.default for f in dataclasses.fields(AttentionSettings)}
    assert [f.name for f in dataclasses.fields(AttentionRecipe)] == list(CONFIG_KEYS)
    assert {f.name: f.default for f in dataclasses.fields(AttentionRecipe)} == {k: st[k] for k in CONFIG_KEYS}
    assert UnifiedWMConfig().attention == {k: st[k] for k in CONFIG_KEYS}


def test_unknown_attention_backend_is_refused_when_the_recipe_loads(tiny_recipe):
    from unified_wm.recipe import load_recipe
    from unified_wm.train import parse_override

    with pytest.raises(ConfigError, match=r"attention backend 'mocc' is unknown") as e:
        load_recipe(tiny_recipe, parse_override("attention.backend=mocc"))
    assert "attention" in str(e.value)


def test_config_attention_is_the_recipes_section_and_old_configs_still_load(tmp_path, tiny_recipe, processor):
    """One vocabulary: the recipe's `attention:` keys are the config's `attention` keys (and
    AttentionSettings' names); a config.json written with the older flat keys loads the same."""
    import dataclasses
    import json

    from unified_wm.model.modeling_uwm import UnifiedWMConfig
    from unified_wm.recipe import build_model, load_recipe
    from unified_wm.train import parse_override
    from unified_wm.utils import deep_update

    over = deep_update(parse_override("attention.top_k=3"), parse_override("attention.dense_text_queries=true"))
    recipe = load_recipe(tiny_recipe, over)
    model = build_model(recipe, processor)
    assert model.config.attention == dataclasses.asdict(recipe.attention)
    assert model.config.attention_settings().top_k == 3 and model.config.attention_settings().dense_text_queries
    model.config.save_pretrained(tmp_path / "new")
    d = json.loads((tmp_path / "new" / "config.json").read_text())
    old = {k: v for k, v in d.items() if k != "attention"}
    old.update(attn_backend=d["attention"]["backend"], moc_top_k=3, moc_n_sink=d["attention"]["n_sink"], moc_drop_off=0.0,
               moc_drop_in=0.0)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert UnifiedWMConfig.from_pretrained(tmp_path / "old").attention == {**model.config.attention, "dense_text_queries": False}
    with pytest.raises(ValueError, match="unknown key 'topk'"):
        UnifiedWMConfig(attention={"topk": 2})


def test_benchmarks_find_the_checkouts_configs():
    """The benchmarks read recipes and tokenizer configs from the checkout they live in."""
    from unified_wm.bench import data, gpu

    assert (data.ROOT / "recipes" / "tiny_cpu.yaml").is_file() and (data.ROOT / "tokenizers" / "video_fsq_tiny.yaml").is_file()
    assert gpu.ROOT == data.ROOT and (gpu.ROOT / "ds_configs" / "zero2_bf16.json").is_file()
