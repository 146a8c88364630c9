"""The ``uwm`` command line: one entry point, one sub-command per stage of the data flow.

  uwm demo                                  the whole path on the embedded default
  uwm pipeline                              a recipe's whole path (data .. eval), resumable
  uwm data gen-world | gen-atari | tokenize
  uwm tokenizer train-text | train-video | eval-video | build-processor
  uwm train                                 one process (multi-rank: deepspeed --module unified_wm.train)
  uwm export                                DeepSpeed checkpoint -> Hugging Face folder
  uwm rollout                               text + actions -> video, GIF, contact sheet
  uwm play                                  play the model in the browser (a local page)
  uwm eval                                  run an evaluation suite
  uwm bench attention | rollout             Mixture-of-Contexts vs dense: attention, decoding
  uwm bench train | data | memory           training throughput, data pipeline, checkpointing memory
  uwm bench gpu                             the GPU check (Triton MoC vs oracle and SDPA, deepspeed; needs CUDA)
  uwm bench routing                         tiles a trained model's MoC routing makes a tiled kernel visit
"""
from __future__ import annotations

import importlib
import sys

# (group, command) -> "module:function"; each function takes argv and returns an exit code.
COMMANDS: dict[tuple[str, ...], str] = {
    ("demo",): "unified_wm.demo:main",
    ("pipeline",): "unified_wm.pipeline:main",
    ("data", "gen-world"): "unified_wm.data.world:main",
    ("data", "gen-atari"): "unified_wm.data.atari:main",
    ("data", "gen-doom"): "unified_wm.data.doom:main",
    ("data", "tokenize"): "unified_wm.data.tokenize:main",
    ("tokenizer", "train-text"): "unified_wm.tokenization.text:main_train",
    ("tokenizer", "train-video"): "unified_wm.tokenization.video_train:main_train",
    ("tokenizer", "eval-video"): "unified_wm.tokenization.video_train:main_eval",
    ("tokenizer", "build-processor"): "unified_wm.tokenization.processor:main_build",
    ("train",): "unified_wm.train:main",
    ("export",): "unified_wm.export:main",
    ("rollout",): "unified_wm.rollout:main",
    ("play",): "unified_wm.play:main",
    ("eval",): "unified_wm.eval.runner:main",
    ("bench", "attention"): "unified_wm.bench.attention:main",
    ("bench", "rollout"): "unified_wm.bench.rollout:main",
    ("bench", "train"): "unified_wm.bench.train:main",
    ("bench", "data"): "unified_wm.bench.data:main",
    ("bench", "memory"): "unified_wm.bench.memory:main",
    ("bench", "gpu"): "unified_wm.bench.gpu:main",
    ("bench", "routing"): "unified_wm.bench.routing:main",
}


def usage() -> str:
    lines = ["usage: uwm COMMAND [options]   (uwm COMMAND --help for its options)", "", "commands:"]
    lines += [f"  uwm {' '.join(k)}" for k in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            mod, fn = COMMANDS[key].split(":")
            from unified_wm.utils import ConfigError

            try:
                return int(getattr(importlib.import_module(mod), fn)(argv[n:]) or 0)
            except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
                # bad input: one clear line, no traceback
                print(f"uwm {' '.join(key)}: error: {e}", file=sys.stderr)
                return 2
    group = [" ".join(k) for k in COMMANDS if k[0] == argv[0]]
    if group:
        print(f"uwm {argv[0]}: unknown sub-command {argv[1:2] or '(none)'}; valid: {', '.join(group)}", file=sys.stderr)
    else:
        print(f"uwm: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
