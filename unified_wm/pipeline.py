"""``uwm pipeline --config recipes/pipelines/world_cpu.yaml``: a recipe's whole path, resumable.

data (the procedural world: train, val and probe splits; or Atari: train and val) -> text + video
tokenizers -> processor
-> token documents -> training (the ``deepspeed`` launcher) -> Hugging Face folder -> eval
suites. Each stage is the command a user would type, printed before it runs. A stage whose
output is complete is skipped (``pipeline_state.json`` in the work folder records the
finished ones, with the command that made each), so the same command continues an
interrupted pipeline: training resumes from its newest complete checkpoint
(``--resume latest``) and the video tokenizer from its own. Nothing a stage finished is
rebuilt unless ``--redo STAGE`` names it (that stage and every later one run again). A
finished stage whose command or input files (``--config``, ``--recipe``, ``--deepspeed``,
``--suite``; their SHA-256 is recorded) differ from today's stops the pipeline with the
difference and the ``--redo`` that rebuilds it: outputs made from other settings are
neither kept silently nor replaced unasked.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from unified_wm.utils import ConfigError, load_config, usable_cpus, write_json
from unified_wm.distributed import free_port

STAGES = ("data", "text_tokenizer", "video_tokenizer", "processor", "tokens", "train", "export", "eval")


@dataclass
class EpisodeCounts:
    train: int = 2000
    val: int = 64
    probe_offscreen: int = 64
    probe_revisit: int = 32


@dataclass
class Pipeline:
    workdir: str
    recipe: str  # training recipe (recipes/*.yaml); its data paths are set to this pipeline's
    world: str = ""  # the data: a procedural-world config (recipes/data/world*.yaml) ...
    atari: str = ""  # ... or an Atari config (recipes/data/atari_*.yaml); exactly one of the two
    episodes: EpisodeCounts = field(default_factory=EpisodeCounts)
    world_overrides: dict = field(default_factory=dict)  # data-config knobs changed for this pipeline (e.g. texture)
    text_tokenizer: str = "tokenizers/text_captions.yaml"
    video_tokenizer: str = "tokenizers/video_fsq_tiny.yaml"
    processor: str = "tokenizers/processor.yaml"
    clip_frames: int = 32
    templates: list[str] = field(default_factory=lambda: ["interleaved", "dynamics", "caption", "inverse"])
    deepspeed: str = "ds_configs/zero2.json"
    ranks: int = 2
    tokenize_workers: int = 0  # processes for the token documents (0: one per CPU core this process may use); the documents do not depend on it
    eval: list[str] = field(default_factory=list)  # suites (eval/*.yaml), run on this pipeline's splits
    description: str = ""

    @property
    def source(self) -> str:
        return "atari" if self.atari else "world"

    def validate(self) -> None:
        from unified_wm.sequence import TEMPLATES

        for t in self.templates:
            if t not in TEMPLATES:
                raise ValueError(f"templates: unknown template '{t}'; valid templates: {', '.join(TEMPLATES)}")
        if bool(self.world) == bool(self.atari):
            raise ValueError("give exactly one data source: 'world' (a procedural-world config) or 'atari' (an Atari config)")
        if self.atari and (self.episodes.probe_offscreen or self.episodes.probe_revisit):
            raise ValueError("episodes.probe_offscreen / probe_revisit: the probe splits are made by the procedural world "
                             "only; set both to 0 for an 'atari' pipeline")
        files = [(k, getattr(self, k)) for k in (self.source, "recipe", "text_tokenizer", "video_tokenizer", "processor", "deepspeed")]
        for key, path in files + [("eval", s) for s in self.eval]:
            if not Path(path).is_file():
                raise ValueError(f"{key}: file '{path}' does not exist")
        if self.ranks < 1 or self.clip_frames < 2:
            raise ValueError("ranks must be >= 1 and clip_frames >= 2")
        if self.tokenize_workers < 0:
            raise ValueError(f"tokenize_workers must be >= 0 (0: one per CPU core), got {self.tokenize_workers}")
        from unified_wm.recipe import load_recipe

        missing = [t for t, tr in load_recipe(self.recipe).tasks.items() if tr.weight > 0 and t not in self.templates]
        if missing:  # found now, not after the data and tokenizers are made
            raise ValueError(f"templates: recipe '{self.recipe}' trains on '{missing[0]}', which this pipeline does not "
                             f"tokenize (templates: {', '.join(self.templates)})")


def _data_config(p: Pipeline, w: Path) -> str:
    """The data config (world or Atari) with this pipeline's overrides, written beside the data
    (so the data's recipe is on disk with it)."""
    src = getattr(p, p.source)
    if not p.world_overrides:
        return src
    import yaml

    cfg = yaml.safe_load(Path(src).read_text())
    unknown = [k for k in p.world_overrides if k not in cfg]
    if unknown:
        raise ConfigError(f"world_overrides: '{unknown[0]}' is not a key of '{src}'")
    cfg.update(p.world_overrides)
    out = w / f"{p.source}.yaml"
    w.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


def stage_commands(p: Pipeline, config_path: str) -> dict[str, list[list[str]]]:
    """The commands of every stage, in order."""
    w = Path(p.workdir)
    py = sys.executable
    uwm = [py, "-m", "unified_wm.cli"]
    data_config = _data_config(p, w)
    e = p.episodes
    gen = uwm + ["data", f"gen-{p.source}", "--config", data_config]
    data = [gen + ["--out", str(w / "data"), "--episodes", str(e.train), "--no-progress"],
            gen + ["--out", str(w / "data_val"), "--episodes", str(e.val),
                   "--split", "val", "--no-progress"]]
    for split, n in (("probe_offscreen", e.probe_offscreen), ("probe_revisit", e.probe_revisit)):
        if n:
            data.append(gen + ["--out", str(w / split), "--episodes", str(n), "--split", split, "--no-progress"])
    video = uwm + ["tokenizer", "train-video", "--config", p.video_tokenizer, "--data", str(w / "data"),
                   "--out", str(w / "tokenizers" / "video"), "--no-progress"]
    if (w / "tokenizers" / "video" / "checkpoints").is_dir():
        video.append("--resume")
    templates = ",".join(p.templates)
    workers = str(p.tokenize_workers or usable_cpus())
    tokens = [uwm + ["data", "tokenize", "--data", str(w / d), "--processor", str(w / "processor"), "--out", str(w / out),
                     "--clip-frames", str(p.clip_frames), "--templates", templates, "--workers", workers,
                     "--resume", "--no-progress"]
              for d, out in (("data", "tokens"), ("data_val", "val_tokens"))]
    launcher = str(Path(py).parent / "deepspeed") if (Path(py).parent / "deepspeed").exists() else "deepspeed"
    train = [launcher, "--num_gpus", str(p.ranks), "--master_port", str(free_port()), "--module", "unified_wm.train",
             "--recipe", p.recipe, "--deepspeed", p.deepspeed, "--output-dir", str(w / "train"),
             "--set", f"data.tokens={w / 'tokens'}", "--set", f"data.processor={w / 'processor'}",
             "--set", f"data.val_tokens={w / 'val_tokens'}", "--no-progress"]
    if (w / "train" / "checkpoints").is_dir():
        train += ["--resume", "latest"]
    evals = []
    for suite in p.eval:
        name = Path(suite).stem
        cmd = uwm + ["eval", "--model", str(w / "hf"), "--suite", suite, "--out", str(w / f"eval_{name}"),
                     "--data", str(w / "data_val"), "--train-data", str(w / "data")]
        if e.probe_offscreen:
            cmd += ["--offscreen-data", str(w / "probe_offscreen")]
        if e.probe_revisit:
            cmd += ["--revisit-data", str(w / "probe_revisit")]
        evals.append(cmd)
    return {
        "data": data,
        "text_tokenizer": [uwm + ["tokenizer", "train-text", "--config", p.text_tokenizer, "--data", str(w / "data"),
                                  "--out", str(w / "tokenizers" / "text.model")]],
        "video_tokenizer": [video],
        "processor": [uwm + ["tokenizer", "build-processor", "--config", p.processor, "--text", str(w / "tokenizers" / "text.model"),
                             "--video", str(w / "tokenizers" / "video"), "--out", str(w / "processor")]],
        "tokens": tokens,
        "train": [train],
        "export": [uwm + ["export", "--checkpoint", str(w / "train" / "checkpoints"), "--out", str(w / "hf")]],
        "eval": evals,
    }


# arguments that change from run to run without changing what a stage makes
_VOLATILE = {"--master_port": 1, "--workers": 1}
_INPUT_FLAGS = ("--config", "--recipe", "--deepspeed", "--suite")  # files whose contents a stage's output depends on


def _normalize(cmd: list[str]) -> list[str]:
    """A stage command without the interpreter or launcher path, the port, the worker count and
    ``--resume`` (a resumed stage makes the same output)."""
    out, i = [], 1
    while i < len(cmd):
        a = cmd[i]
        if a in _VOLATILE:
            i += 1 + _VOLATILE[a]
            continue
        if a == "--resume":
            i += 2 if i + 1 < len(cmd) and cmd[i + 1] == "latest" else 1
            continue
        out.append(a)
        i += 1
    return out


def _input_hashes(cmds: list[list[str]]) -> dict[str, str]:
    import hashlib

    out = {}
    for cmd in cmds:
        for i, a in enumerate(cmd[:-1]):
            if a in _INPUT_FLAGS and Path(cmd[i + 1]).is_file():
                out[cmd[i + 1]] = hashlib.sha256(Path(cmd[i + 1]).read_bytes()).hexdigest()
    return out


def _stale(stage: str, done: dict, cmds: list[list[str]]) -> str | None:
    """How the stage's current commands or input files differ from those that made its finished
    output (None: they do not). A state written before inputs were recorded compares commands only."""
    import difflib

    old = [_normalize(shlex.split(c)) for c in done.get("commands", [])]
    new = [_normalize(c) for c in cmds]
    if old != new:
        if len(old) != len(new):
            return f"it ran {len(old)} command(s) and now has {len(new)}"
        a, b = next((x, y) for x, y in zip(old, new) if x != y)
        op = next(o for o in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if o[0] != "equal")
        return (f"its command changed: '{shlex.join(a[op[1]:op[2]]) or '(nothing)'}' is now "
                f"'{shlex.join(b[op[3]:op[4]]) or '(nothing)'}'")
    current = _input_hashes(cmds)
    for path, digest in done.get("inputs", {}).items():
        now = current.get(path)
        if now != digest:
            return f"the file '{path}' it read has changed" if now else f"the file '{path}' it read is gone"
    return None


def run_pipeline(config_path: str, *, only: list[str] | None = None, redo: str | None = None, dry_run: bool = False) -> dict:
    p = load_config(Pipeline, config_path)
    w = Path(p.workdir)
    state_file = w / "pipeline_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"done": {}}
    if redo is not None:
        if redo not in STAGES:
            raise ConfigError(f"--redo: unknown stage '{redo}'; stages: {', '.join(STAGES)}")
        for s in STAGES[STAGES.index(redo):]:
            state["done"].pop(s, None)
    for s in only or []:
        if s not in STAGES:
            raise ConfigError(f"--only: unknown stage '{s}'; stages: {', '.join(STAGES)}")
    commands = stage_commands(p, config_path)
    for stage in STAGES:  # a finished stage made from other settings than today's is not silently kept
        why = _stale(stage, state["done"][stage], commands[stage]) if stage in state["done"] else None
        if why:
            raise ConfigError(f"pipeline '{config_path}': stage '{stage}' in '{w}' was finished with other settings ({why}). "
                              f"Run with --redo {stage} to make it and every later stage again, or restore the settings it was made with")
    for stage in STAGES:
        if only and stage not in only:
            continue
        if stage in state["done"]:
            print(f"[pipeline] {stage}: done ({state['done'][stage]['seconds']:.0f} s), skipped", flush=True)
            continue
        t0 = time.time()
        for cmd in commands[stage]:
            print(f"\n[pipeline] {stage}\n$ {shlex.join(cmd)}", flush=True)
            if dry_run:
                continue
            if stage in ("data", "processor", "tokens", "text_tokenizer", "export"):
                _clear_partial(cmd)
            r = subprocess.run(cmd)
            if r.returncode != 0:
                raise SystemExit(f"pipeline: stage '{stage}' failed (exit {r.returncode}): {shlex.join(cmd)}\n"
                                 f"run the same command again to continue from here")
        if not dry_run:
            state["done"][stage] = {"seconds": round(time.time() - t0, 1), "commands": [shlex.join(c) for c in commands[stage]],
                                    "inputs": _input_hashes(commands[stage])}
            w.mkdir(parents=True, exist_ok=True)
            write_json(state_file, state)
    return state


def _clear_partial(cmd: list[str]) -> None:
    """A stage that did not finish may have left its output: remove only what this pipeline
    writes (inside its work folder), so the stage's command starts clean."""
    import shutil

    if "--out" not in cmd or "--resume" in cmd:
        return
    out = Path(cmd[cmd.index("--out") + 1])
    if out.is_dir():
        shutil.rmtree(out)
    elif out.is_file():
        out.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="pipeline YAML (recipes/pipelines/)")
    ap.add_argument("--only", default="", help=f"comma-separated stages to run (of {', '.join(STAGES)})")
    ap.add_argument("--redo", default=None, help="run this stage and every later one again")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    state = run_pipeline(a.config, only=[s for s in a.only.split(",") if s], redo=a.redo, dry_run=a.dry_run)
    print(f"\n[pipeline] finished stages: {', '.join(state['done']) or 'none'}")
    return 0
