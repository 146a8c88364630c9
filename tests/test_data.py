"""The data engine: the procedural world (episodes, captions, state, probes) and Atari."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from unified_wm.data import world as W
from unified_wm.data.episodes import (SPLIT_SEED_OFFSETS, SPLIT_SEED_SPAN, episode_seeds, get_episode, iter_episodes, load_episodes,
                                     save_episodes, seeds_of, stream_episodes)
from unified_wm.utils import ConfigError, OutputError

PAN = W.ACTION_SPACES["pan5"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "data"


def cfg_small(**kw) -> W.WorldConfig:
    base = dict(episode_length=16, n_episodes=6, occluder_density=0.8, max_objects=3, probe_frames=32)
    base.update(kw)
    return W.from_dict(W.WorldConfig, base)


def state(ep) -> dict:
    return json.loads(ep["state"])


def test_action_space_is_pan5():
    assert PAN == ["stay", "left", "right", "up", "down"]


def test_generation_is_deterministic_by_seed():
    cfg = cfg_small()
    a, b, c = W.generate_episode(cfg, 11), W.generate_episode(cfg, 11), W.generate_episode(cfg, 12)
    assert np.array_equal(a["frames"], b["frames"])
    assert a["actions"] == b["actions"] and a["captions"] == b["captions"] and a["state"] == b["state"]
    assert not np.array_equal(a["frames"], c["frames"])


def test_texture_changes_only_the_surface_noise():
    """`texture` scales the per-pixel surface noise; 0 gives smooth surfaces and the same
    scene, objects, camera path and captions (the noise is drawn either way)."""
    import dataclasses

    cfg = cfg_small()
    rough = W.generate_episode(cfg, 5)
    smooth = W.generate_episode(dataclasses.replace(cfg, texture=0.0), 5)
    assert rough["actions"] == smooth["actions"] and rough["captions"] == smooth["captions"]
    assert rough["state"] == smooth["state"]
    a, b = np.asarray(rough["frames"], np.float32), np.asarray(smooth["frames"], np.float32)
    assert not np.array_equal(a, b)
    # neighbouring-pixel differences (high-frequency energy) drop without the noise
    hf = lambda x: float(np.abs(np.diff(x, axis=2)).mean())  # noqa: E731
    assert hf(b) < 0.6 * hf(a)
    with pytest.raises(ValueError, match="texture"):
        dataclasses.replace(cfg, texture=-1.0).validate()


def test_frames_actions_rewards_shapes():
    cfg = cfg_small()
    for seed in range(5):
        ep = W.generate_episode(cfg, seed)
        T = cfg.episode_length
        assert ep["frames"].dtype == np.uint8 and ep["frames"].shape == (T, 64, 64, 3)
        assert len(ep["actions"]) == T - 1 and set(ep["actions"]) <= set(PAN)
        assert ep["rewards"] == [0.0] * (T - 1)
        assert ep["action_space"] == "pan5" and ep["source"] == "world" and ep["seed"] == seed
        st = state(ep)
        assert len(st["frames"]) == T and st["world_size"] == [192, 128] and st["view"] == [64, 64]
        # frames are not flat: a textured background
        assert ep["frames"][0].std() > 10


def test_camera_moves_according_to_actions():
    cfg = cfg_small(episode_length=32)
    moved_right = 0
    for seed in range(10):
        ep = W.generate_episode(cfg, seed)
        cams = [f["camera"] for f in state(ep)["frames"]]
        for t, a in enumerate(ep["actions"]):
            dx, dy = W.ACTION_DELTAS[a]
            want = [
                min(max(cams[t][0] + dx * cfg.pan_step, 0), cfg.world_width - cfg.view_width),
                min(max(cams[t][1] + dy * cfg.pan_step, 0), cfg.world_height - cfg.view_height),
            ]
            assert cams[t + 1] == want, (seed, t, a)
            if a == "right" and cams[t][0] < cfg.world_width - cfg.view_width:
                assert cams[t + 1][0] > cams[t][0]
                moved_right += 1
            # the pixels move with the camera: a pan shifts the background
            if cams[t + 1] != cams[t]:
                assert not np.array_equal(ep["frames"][t], ep["frames"][t + 1])
    assert moved_right > 0


def _side_ok(side: str, bbox, cam, vw=64, vh=64) -> bool:
    x0, y0, x1, y1 = bbox
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return {
        "left": cx < cam[0] + vw / 2,
        "right": cx > cam[0] + vw / 2,
        "top": cy < cam[1] + vh / 2,
        "bottom": cy > cam[1] + vh / 2,
    }[side]


def test_captions_are_consistent_with_state():
    cfg = cfg_small(episode_length=32, occluder_density=1.5)
    counts = {"enters": 0, "leaves": 0, "pans": 0, "hidden": 0}
    for seed in range(30):
        ep = W.generate_episode(cfg, seed)
        st = state(ep)
        fr = st["frames"]
        caps = {c["t"]: c["text"] for c in ep["captions"]}
        assert 0 in caps
        names = {o["id"]: f"{o['color']} {o['kind']}" for o in fr[0]["objects"]}
        for n in names.values():
            assert n in caps[0], (caps[0], n)
        assert "the camera looks at the" in caps[0]
        for t in range(1, len(fr)):
            events = caps.get(t, "").split("; ") if t in caps else []
            for i, name in names.items():
                a, b = fr[t - 1]["objects"][i], fr[t]["objects"][i]
                entered = [e for e in events if e.startswith(f"the {name} enters from the ")]
                left = [e for e in events if e.startswith(f"the {name} leaves to the ")]
                # an enter/leave caption exactly when in_view flips
                assert bool(entered) == (b["in_view"] and not a["in_view"]), (seed, t, name, events)
                assert bool(left) == (a["in_view"] and not b["in_view"]), (seed, t, name, events)
                if entered:
                    side = entered[0].rsplit(" ", 1)[1]
                    assert _side_ok(side, a["bbox"], fr[t - 1]["camera"]), (seed, t, entered, a, fr[t - 1]["camera"])
                    counts["enters"] += 1
                if left:
                    side = left[0].rsplit(" ", 1)[1]
                    assert _side_ok(side, b["bbox"], fr[t]["camera"]), (seed, t, left)
                    counts["leaves"] += 1
                for e in events:
                    if e.startswith(f"the {name} is hidden behind a "):
                        assert b["occluded"] and b["in_view"] and not b["visible"] and not a["occluded"]
                        counts["hidden"] += 1
            for e in events:
                m = re.fullmatch(r"the camera pans (left|right|up|down)", e)
                if m:
                    dx, dy = W.ACTION_DELTAS[m.group(1)]
                    d = np.sign(np.subtract(fr[t]["camera"], fr[t - 1]["camera"])).tolist()
                    assert d == [dx, dy], (seed, t, e, d)
                    counts["pans"] += 1
                if e == "the camera stops":
                    assert fr[t]["camera"] == fr[t - 1]["camera"]
    assert counts["enters"] > 0 and counts["leaves"] > 0 and counts["pans"] > 0 and counts["hidden"] > 0, counts


def test_rendered_objects_match_state():
    cfg = cfg_small(occluder_density=0.0)
    checked = 0
    for seed in range(10):
        ep = W.generate_episode(cfg, seed)
        for t, f in enumerate(state(ep)["frames"]):
            cam = f["camera"]
            for o in f["objects"]:
                x0, y0, x1, y1 = o["bbox"]
                region = ep["frames"][t][max(0, y0 - cam[1]) : max(0, y1 - cam[1]), max(0, x0 - cam[0]) : max(0, x1 - cam[0])]
                colour = np.array(W.PALETTE[o["color"]], np.uint8)
                present = bool(region.size) and bool((region.reshape(-1, 3) == colour).all(1).any())
                others = [p for p in f["objects"] if p["id"] != o["id"]]
                overlapped = any(not (p["bbox"][2] <= x0 or p["bbox"][0] >= x1 or p["bbox"][3] <= y0 or p["bbox"][1] >= y1) for p in others)
                if o["visible"] and not overlapped and (x1 - x0) <= region.shape[1] + 0 and (y1 - y0) <= region.shape[0]:
                    assert present, (seed, t, o)  # fully in view: its colour is drawn
                    checked += 1
                if not o["in_view"]:
                    assert not present or overlapped or region.size == 0
    assert checked > 20


def test_objects_leave_and_reenter_view():
    cfg = cfg_small(episode_length=32)
    found = 0
    for seed in range(20):
        fr = state(W.generate_episode(cfg, seed))["frames"]
        for i in range(len(fr[0]["objects"])):
            seq = [f["objects"][i]["in_view"] for f in fr]
            s = "".join("1" if v else "0" for v in seq)
            if re.search("10+1", s):
                found += 1
    assert found >= 3


def test_probe_offscreen_episodes():
    cfg = cfg_small()
    for seed in episode_seeds("probe_offscreen", 0, 6):
        ep = W.generate_episode(cfg, seed, "probe_offscreen")
        st = state(ep)
        p = st["probe"]
        assert p["kind"] == "offscreen" and p["N"] in cfg.probe_offscreen_N
        assert p["return_t"] - p["away_start"] == p["N"] and p["return_t"] < cfg.probe_frames
        seq = [f["objects"][p["object_id"]] for f in st["frames"]]
        assert all(o["in_view"] for o in seq[: p["away_start"]])
        assert not any(o["in_view"] for o in seq[p["away_start"] : p["return_t"]])
        assert seq[p["return_t"]]["visible"]
        # the camera is what looked away: it moved, and it came back where it started
        cams = [f["camera"] for f in st["frames"]]
        assert cams[p["away_start"]] != cams[0] and cams[-1] == cams[0]
        assert ep["split"] == "probe_offscreen" and ep["seed"] >= SPLIT_SEED_OFFSETS["probe_offscreen"]


def test_probe_revisit_episodes():
    cfg = cfg_small()
    for seed in episode_seeds("probe_revisit", 0, 4):
        ep = W.generate_episode(cfg, seed, "probe_revisit")
        st = state(ep)
        p = st["probe"]
        assert p["kind"] == "revisit" and p["first_visit_t"] < p["leave_t"] < p["return_t"]
        cams = [f["camera"] for f in st["frames"]]
        assert cams[p["return_t"]] == cams[p["first_visit_t"]] and cams[p["leave_t"]] != cams[p["first_visit_t"]]
        # the camera looked fully away at some point between
        away = [max(abs(c[0] - cams[0][0]) - cfg.view_width, abs(c[1] - cams[0][1]) - cfg.view_height) for c in cams[p["leave_t"] : p["return_t"]]]
        assert max(away) >= 0
        # static scene: the revisited frame is the same, pixel for pixel
        assert np.array_equal(ep["frames"][p["return_t"]], ep["frames"][p["first_visit_t"]])
        assert all(o["vel"] == [0.0, 0.0] for f in st["frames"] for o in f["objects"])


def test_datasets_round_trip_and_seeds_are_disjoint(tmp_path):
    cfg = cfg_small(n_episodes=4, probe_episodes=3)
    train = W.generate_world(cfg, tmp_path / "train", progress=False)
    probes = W.generate_world(cfg, tmp_path / "probe", split="probe_offscreen", progress=False)
    revisit = W.generate_world(cfg, tmp_path / "revisit", split="probe_revisit", n_episodes=2, seed=0, progress=False)
    ds = load_episodes(train)
    assert len(ds) == 4
    assert seeds_of(train) == {0, 1, 2, 3}
    assert seeds_of(ds) == {0, 1, 2, 3}
    assert not (seeds_of(train) & seeds_of(probes)) and not (seeds_of(train) & seeds_of(revisit))
    assert set(load_episodes(probes)["split"]) == {"probe_offscreen"}
    ep = get_episode(ds, 2)
    ref = W.generate_episode(cfg, 2)
    assert np.array_equal(ep["frames"], ref["frames"])
    assert ep["actions"] == ref["actions"] and ep["captions"] == ref["captions"] and ep["state"] == ref["state"]
    assert json.loads(get_episode(load_episodes(revisit), 0)["state"])["probe"]["kind"] == "revisit"
    # and through save_episodes directly, with a plain list
    out = save_episodes([ref], tmp_path / "one", 64, 64)
    assert np.array_equal(get_episode(load_episodes(out), 0)["frames"], ref["frames"])


def test_seed_ranges_cannot_collide():
    with pytest.raises(ValueError, match="seed range"):
        episode_seeds("train", SPLIT_SEED_SPAN - 2, 5)
    assert episode_seeds("val", 0, 2) == [500_000, 500_001]


def test_bad_config_errors(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("episode_length: 8\nnum_cars: 3\n")
    with pytest.raises(ConfigError, match=r"num_cars") as e:
        W.as_config(p)
    assert str(p) in str(e.value)
    p.write_text("world_width: 48\n")
    with pytest.raises(ConfigError, match=r"world_width=48.*view_width=64"):
        W.as_config(p)
    p.write_text("colors: [red, mauve]\n")
    with pytest.raises(ConfigError, match="mauve"):
        W.as_config(p)


def test_recipes_load_and_cli_main(tmp_path, capsys):
    for name in ("world_tiny", "world"):
        cfg = W.as_config(RECIPES / f"{name}.yaml")
        assert cfg.view_width == 64 and cfg.n_episodes >= 300
    assert W.as_config(RECIPES / "world.yaml").occluder_density > 0
    assert W.main(["--config", str(RECIPES / "world_tiny.yaml"), "--out", str(tmp_path / "d"), "--episodes", "3",
                   "--seed", "7", "--no-progress"]) == 0
    assert seeds_of(tmp_path / "d") == {7, 8, 9}
    assert get_episode(load_episodes(tmp_path / "d"), 0)["frames"].shape[0] == 16


# ----------------------------------------------------------------------------- Atari


def test_atari_missing_dependency_is_a_clear_error(monkeypatch):
    from unified_wm.data import atari

    monkeypatch.setitem(sys.modules, "ale_py", None)  # makes `import ale_py` raise ImportError
    with pytest.raises(atari.AtariUnavailable, match=r"pip install unified_wm\[atari\]"):
        atari.make_env(atari.AtariConfig())


def test_atari_episode():
    try:
        import ale_py  # noqa: F401
        import gymnasium  # noqa: F401
    except Exception as e:
        pytest.skip(f"gymnasium/ale-py not importable ({e}); install unified_wm[atari]")
    from unified_wm.data import atari

    cfg = atari.AtariConfig(frames=12, warmup_steps=5, n_episodes=1)
    ep = atari.generate_episode(cfg, 3)
    st = json.loads(ep["state"])
    assert ep["frames"].shape == (12, 64, 64, 3) and ep["frames"].dtype == np.uint8
    assert len(ep["actions"]) == 11 and set(ep["actions"]) <= set(st["action_meanings"])
    assert "noop" in st["action_meanings"] and ep["action_space"] == "atari:Pong"
    assert len(ep["rewards"]) == 11 and all(isinstance(r, float) for r in ep["rewards"])
    assert ep["captions"][0] == {"t": 0, "text": "pong"}
    assert ep["frames"].std() > 1  # a real picture, not a blank
    again = atari.generate_episode(cfg, 3)
    assert np.array_equal(ep["frames"], again["frames"]) and ep["actions"] == again["actions"]


def test_atari_unknown_game_is_named_with_the_valid_ones(tmp_path):
    try:
        import ale_py  # noqa: F401
        import gymnasium  # noqa: F401
    except Exception as e:
        pytest.skip(f"gymnasium/ale-py not importable ({e}); install unified_wm[atari]")
    from unified_wm.data import atari

    with pytest.raises(ValueError, match=r"unknown Atari game 'Pongg' \(config key 'game'\)\. Did you mean 'Pong'\?"
                       r".*Valid games \(\d+\): .*Breakout"):
        atari.make_env(atari.AtariConfig(game="Pongg"))
    p = tmp_path / "a.yaml"
    p.write_text("game: NotAGame\nframes: 4\n")
    with pytest.raises(ValueError, match="unknown Atari game 'NotAGame'"):
        atari.main(["--config", str(p), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()
    assert "Pong" in atari.atari_games()


# ----------------------------------------------------------------------------- storage


def _tiny_episodes(n: int, T: int = 5, hw: int = 8, prefix: str = "e") -> list[dict]:
    rng = np.random.default_rng(n)
    return [{"episode_id": f"{prefix}{i}", "source": "synthetic", "seed": i, "split": "train", "action_space": "pan5",
             "frames": rng.integers(0, 256, (T + i % 3, hw, hw, 3), dtype=np.uint8), "actions": ["left"] * (T + i % 3 - 1),
             "rewards": [0.5] * (T + i % 3 - 1), "captions": [{"t": 0, "text": f"episode {i}"}, {"t": 1, "text": "then"}],
             "state": {"frames": [], "i": i}} for i in range(n)]


def _same(a: dict, b: dict) -> None:
    assert np.array_equal(a["frames"], b["frames"]) and a["frames"].dtype == np.uint8
    assert a["episode_id"] == b["episode_id"] and a["actions"] == b["actions"] and a["captions"] == b["captions"]
    assert json.loads(a["state"]) == (b["state"] if isinstance(b["state"], dict) else json.loads(b["state"]))
    assert a["rewards"] == pytest.approx(b["rewards"])


def test_save_episodes_takes_a_plain_generator_and_writes_shards(tmp_path):
    eps = _tiny_episodes(7)
    out = save_episodes((e for e in eps), tmp_path / "d", 8, 8, max_shard_size=2000)
    shards = sorted(p.name for p in out.glob("data-*.arrow"))
    assert len(shards) >= 3 and shards[0] == f"data-00000-of-{len(shards):05d}.arrow"
    ds = load_episodes(out)
    assert len(ds) == 7 and ds["episode_id"] == [e["episode_id"] for e in eps]
    for a, b in zip(iter_episodes(ds), eps):
        _same(a, b)
    _same(get_episode(ds, 4), eps[4])
    out2 = save_episodes(eps, tmp_path / "n", 8, 8, num_shards=2)
    assert len(list(out2.glob("data-*.arrow"))) == 2 and len(load_episodes(out2)) == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_stream_episodes_reads_one_at_a_time(tmp_path):
    eps = _tiny_episodes(6)
    out = save_episodes(eps, tmp_path / "d", 8, 8, max_shard_size=3000)
    got = list(stream_episodes(out))
    assert [g["episode_id"] for g in got] == [e["episode_id"] for e in eps]
    for a, b in zip(got, eps):
        _same(a, b)
    light = next(iter(stream_episodes(out, columns=["episode_id", "captions"])))
    assert set(light) == {"episode_id", "captions"} and light["captions"][0] == {"t": 0, "text": "episode 0"}
    parts = [[g["episode_id"] for g in stream_episodes(out, columns=["episode_id"], rank=r, world_size=2)] for r in range(2)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(e["episode_id"] for e in eps)
    with pytest.raises(ValueError, match=r"unknown episode column\(s\) \['pixels'\]"):
        next(stream_episodes(out, columns=["pixels"]))


def test_storage_is_close_to_the_raw_frame_bytes(tmp_path):
    eps = _tiny_episodes(4, T=16, hw=32)
    out = save_episodes(eps, tmp_path / "d", 32, 32)
    raw = sum(e["frames"].nbytes for e in eps)
    on_disk = sum(p.stat().st_size for p in out.glob("data-*.arrow"))
    assert raw <= on_disk < 1.1 * raw


def test_the_older_array4d_layout_still_reads(tmp_path):
    import datasets

    eps = _tiny_episodes(3)
    feats = datasets.Features({
        "episode_id": datasets.Value("string"), "source": datasets.Value("string"), "seed": datasets.Value("int64"),
        "split": datasets.Value("string"), "action_space": datasets.Value("string"),
        "frames": datasets.Array4D(shape=(None, 8, 8, 3), dtype="uint8"),
        "actions": datasets.Sequence(datasets.Value("string")), "rewards": datasets.Sequence(datasets.Value("float32")),
        "captions": datasets.Sequence({"t": datasets.Value("int32"), "text": datasets.Value("string")}),
        "state": datasets.Value("string")})
    rows = {k: [] for k in feats}
    for e in eps:
        for k in feats:
            v = e[k]
            if k == "captions":
                v = {"t": [c["t"] for c in v], "text": [c["text"] for c in v]}
            elif k == "state":
                v = json.dumps(v)
            rows[k].append(v)
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "old"))
    ds = load_episodes(tmp_path / "old")
    _same(get_episode(ds, 1), eps[1])
    for a, b in zip(iter_episodes(ds), eps):
        _same(a, b)
    for a, b in zip(stream_episodes(tmp_path / "old"), eps):
        _same(a, b)


def test_save_episodes_bad_input_leaves_nothing(tmp_path):
    eps = _tiny_episodes(3)
    with pytest.raises(ValueError, match=r"episode e0: frames are 8x8 \(HxW\), the dataset's are 16x16"):
        save_episodes(eps, tmp_path / "a", 16, 16)
    with pytest.raises(ValueError, match="episode id 'e1' occurs twice"):
        save_episodes(eps + [eps[1]], tmp_path / "b", 8, 8)
    with pytest.raises(ValueError, match="the iterable was empty"):
        save_episodes(iter([]), tmp_path / "c", 8, 8)
    with pytest.raises(ValueError, match="num_shards needs an iterable with a length"):
        save_episodes((e for e in eps), tmp_path / "d", 8, 8, num_shards=2)
    with pytest.raises(ValueError, match="max_shard_size must be"):
        save_episodes(eps, tmp_path / "e", 8, 8, max_shard_size="lots")

    def broken():
        yield eps[0]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        save_episodes(broken(), tmp_path / "f", 8, 8)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Doom (ViZDoom)


def _vizdoom_or_skip():
    try:
        import vizdoom  # noqa: F401
    except Exception as e:
        pytest.skip(f"vizdoom not importable ({type(e).__name__}: {e}); install unified_wm[3d]")
    from unified_wm.data import doom

    return doom


@pytest.fixture(scope="module")
def doom_game():
    doom = _vizdoom_or_skip()
    cfg = doom.as_config(RECIPES / "doom.yaml")
    game = doom.make_game(cfg)
    yield cfg, game
    game.close()


def test_doom_missing_dependency_is_a_clear_error(monkeypatch):
    from unified_wm.data import doom

    monkeypatch.setitem(sys.modules, "vizdoom", None)
    with pytest.raises(doom.DoomUnavailable, match=r"pip install unified_wm\[3d\]"):
        doom.make_game(doom.DoomConfig())


def test_doom_episode_columns_pose_and_determinism(doom_game):
    doom = _vizdoom_or_skip()
    cfg, game = doom_game
    cfg = doom.as_config({**vars(cfg), "frames": 24})
    ep = doom.generate_episode(cfg, 4, game=game)
    st = json.loads(ep["state"])
    T = len(ep["frames"])
    assert ep["frames"].shape == (T, 64, 64, 3) and T == 24 and ep["frames"].dtype == np.uint8
    assert ep["frames"].std() > 5  # a real rendered picture
    assert len(ep["actions"]) == T - 1 and set(ep["actions"]) <= {"stay", "left", "right", "up", "down"}
    from unified_wm.tokenization.actions import ACTION_SETS

    assert set(ep["actions"]) <= set(ACTION_SETS["pan5"]) and st["action_set"] == "pan5"
    assert ep["source"] == ep["action_space"] == "doom:my_way_home" and len(ep["rewards"]) == T - 1
    assert len(st["frames"]) == T and {"pos", "angle", "vel", "health", "objects"} <= set(st["frames"][0])
    # the pose follows the actions: turns change the angle by turn_degrees, nothing else does
    for t, a in enumerate(ep["actions"]):
        d = (st["frames"][t + 1]["angle"] - st["frames"][t]["angle"] + 180) % 360 - 180
        want = {"left": cfg.turn_degrees, "right": -cfg.turn_degrees}.get(a, 0.0)
        assert d == pytest.approx(want, abs=1e-6), (t, a, d)
    caps = {c["t"]: c["text"] for c in ep["captions"]}
    assert caps[0].startswith("doom, my way home: the player faces ")
    for t, text in caps.items():
        if t and "the player turns left" in text.split("; "):
            assert ep["actions"][t - 1] == "left"
    again = doom.generate_episode(cfg, 4, game=game)
    assert np.array_equal(ep["frames"], again["frames"]) and ep["actions"] == again["actions"] and ep["state"] == again["state"]
    assert not np.array_equal(ep["frames"], doom.generate_episode(cfg, 6, game=game)["frames"])
    assert not st["game_over"] and st["final_step"] is None


def test_doom_goal_ends_the_episode_and_things_in_view_are_captioned(doom_game):
    doom = _vizdoom_or_skip()
    cfg, game = doom_game
    cfg = doom.as_config({**vars(cfg), "frames": 24})
    ep = doom.generate_episode(cfg, 5, game=game)  # this seed walks to the armor of my_way_home
    st = json.loads(ep["state"])
    assert st["game_over"] and st["final_step"]["reward"] > 0.5 and len(ep["frames"]) < 24
    assert len(ep["actions"]) == len(ep["frames"]) - 1 == len(st["frames"]) - 1
    caps = {c["t"]: c["text"].split("; ") for c in ep["captions"]}
    seen = [{o["name"] for o in f["objects"]} for f in st["frames"]]
    entered = [t for t, ev in caps.items() if "a green armor comes into view" in ev]
    assert entered and all("GreenArmor" in seen[t] and "GreenArmor" not in seen[t - 1] for t in entered)
    armor = next(o for o in st["frames"][entered[0]]["objects"] if o["name"] == "GreenArmor")
    x0, y0, x1, y1 = armor["bbox"]
    assert 0 <= x0 < x1 and 0 <= y0 < y1 and len(armor["pos"]) == 3


def test_doom_revisit_probe_returns_to_the_first_view(doom_game):
    doom = _vizdoom_or_skip()
    cfg, game = doom_game

    for seed in episode_seeds("probe_revisit", 0, 6):
        ep = doom.generate_episode(cfg, seed, "probe_revisit", game=game)
        st = json.loads(ep["state"])
        p, fr = st["probe"], st["frames"]
        assert p["kind"] == "revisit" and p["first_visit_t"] < p["leave_t"] < p["return_t"] < cfg.probe_frames
        assert p["N"] == p["return_t"] - p["leave_t"] and ep["split"] == "probe_revisit" and len(ep["frames"]) == cfg.probe_frames
        first, back = fr[p["first_visit_t"]], fr[p["return_t"]]
        assert first["pos"] == back["pos"] and first["angle"] == back["angle"]  # the same pose, exactly
        assert all(fr[t]["angle"] != first["angle"] for t in range(p["leave_t"], p["return_t"]))  # it really looked away
        assert p["degrees"] >= 90
        f0, f1 = ep["frames"][p["first_visit_t"]].astype(int), ep["frames"][p["return_t"]].astype(int)
        assert np.abs(f0 - f1).mean() < 1.0  # the real return frame is the first view again
        away = ep["frames"][p["leave_t"] + p["N"] // 2].astype(int)
        assert np.abs(f0 - away).mean() > 3.0


def test_doom_config_errors(tmp_path):
    doom = _vizdoom_or_skip()
    p = tmp_path / "d.yaml"
    p.write_text("scenario: my_way_home\nnum_monsters: 3\n")
    with pytest.raises(ConfigError, match="num_monsters") as e:
        doom.as_config(p)
    assert str(p) in str(e.value)
    p.write_text("turn_degrees: 20\n")
    with pytest.raises(ConfigError, match=r"turn_degrees=20 .* not a whole number of Doom angle units"):
        doom.as_config(p)
    with pytest.raises(ValueError, match=r"unknown ViZDoom scenario 'my_way_hom' \(config key 'scenario'\); valid: .*my_way_home"):
        doom.make_game(doom.DoomConfig(scenario="my_way_hom"))
    with pytest.raises(ValueError, match=r"ViZDoom scenario 'cig' .* is not supported: a multiplayer scenario.*supported: .*my_way_home"):
        doom.make_game(doom.DoomConfig(scenario="cig"))  # refused before the engine starts (it would crash)


def test_doom_cli_writes_a_dataset(tmp_path):
    doom = _vizdoom_or_skip()
    p = tmp_path / "d.yaml"
    p.write_text(re.sub(r"^frames: 32$", "frames: 8", (RECIPES / "doom.yaml").read_text(), flags=re.M))
    assert doom.main(["--config", str(p), "--out", str(tmp_path / "d"), "--episodes", "2", "--seed", "3", "--no-progress"]) == 0
    ds = load_episodes(tmp_path / "d")
    assert seeds_of(ds) == {3, 4} and get_episode(ds, 0)["frames"].shape == (8, 64, 64, 3)
    assert doom.main(["--config", str(p), "--out", str(tmp_path / "r"), "--episodes", "1", "--split", "probe_revisit", "--no-progress"]) == 0
    assert json.loads(get_episode(load_episodes(tmp_path / "r"), 0)["state"])["probe"]["kind"] == "revisit"


def test_every_source_refuses_an_out_folder_it_did_not_write(tmp_path):
    """One generator command for every source: gen-atari and gen-doom keep a user's folder as
    gen-world does (refused, nothing deleted), before any emulator starts."""
    from unified_wm.data import atari, doom
    from unified_wm.data.sources import EpisodeSource

    for mod, src, cfg in ((W, W.WORLD, RECIPES / "world_tiny.yaml"), (atari, atari.ATARI, RECIPES / "atari_pong.yaml"),
                          (doom, doom.DOOM, RECIPES / "doom.yaml")):
        assert isinstance(src, EpisodeSource)
        mine = tmp_path / src.name
        mine.mkdir()
        (mine / "notes.txt").write_text("keep")
        with pytest.raises(OutputError, match=src.name):
            mod.main(["--config", str(cfg), "--out", str(mine), "--episodes", "1", "--no-progress"])
        assert (mine / "notes.txt").read_text() == "keep"
