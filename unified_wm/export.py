"""Export a DeepSpeed checkpoint into a Hugging Face folder.

``uwm export --checkpoint runs/x/checkpoints[/stepN] --out runs/x/hf [--eval-results runs/x/eval/results.json]``

Consolidates the checkpoint into fp32 weights (ZeRO 1-3 with DeepSpeed's ``zero_to_fp32``; ZeRO-0 from its module states file)
(ZeRO-3 shards of every rank are gathered), saves them as safetensors with
``save_pretrained``, copies the processor beside them, and writes a model card (recipe,
data, final training metrics, and the eval results when given) and the training data's
seeds (eval suites refuse held-out sets that overlap them). Only complete checkpoints are
exported (``complete.json`` written by ``unified_wm.train``, or the one ``latest`` names).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from unified_wm.utils import OVERWRITE_HELP, atomic_dir, write_json


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) of the checkpoint to export, by the rules of ``--resume``: a
    checkpoints folder means the one its ``latest`` names if that verifies, else the newest that
    does; a ``stepN`` folder means itself, if it verifies (:func:`unified_wm.checkpoint.resolve_resume`)."""
    from unified_wm.checkpoint import resolve_resume

    p = Path(path)
    ckpt = resolve_resume(str(p), p, flag="--checkpoint")
    return ckpt.parent, ckpt.name


def _flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar leaves of a nested results dict as (dotted key, formatted value); lists of numbers inline."""
    rows: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}{k}.")
    elif isinstance(d, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d):
        rows.append((prefix[:-1], " ".join(f"{x:.4g}" for x in d)))
    elif isinstance(d, float):
        rows.append((prefix[:-1], f"{d:.4f}"))
    elif isinstance(d, (int, str, bool)) or d is None:
        rows.append((prefix[:-1], str(d)))
    return rows


def eval_section(results_path: str | Path | None) -> list[str]:
    if results_path is None:
        return ["Run `uwm eval --model THIS_FOLDER --suite eval/quick.yaml` (or re-export with `--eval-results`).", ""]
    p = Path(results_path)
    if not p.is_file():
        raise FileNotFoundError(f"--eval-results '{p}' does not exist (expected the results.json written by `uwm eval`)")
    try:
        res = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--eval-results '{p}': not valid JSON: {e}") from None
    lines = [f"From `{p}`:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _flatten(res)]
    return lines + [""]


def zero0_state_dict(tag_dir: Path) -> dict:
    """The model weights of a ZeRO-0 save: ``mp_rank_00_model_states.pt``'s ``module`` (fp32 upcast).
    Read with ``weights_only=True`` only; a file that would need full unpickling is refused."""
    import pickle

    import torch

    f = Path(tag_dir) / "mp_rank_00_model_states.pt"
    if not f.is_file():
        raise FileNotFoundError(f"'{f}' is missing (a ZeRO-0 checkpoint keeps the whole model there)")
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"'{f}' cannot be read with weights_only=True ({str(e).splitlines()[0]}); "
                         f"weights are never loaded as a full pickle") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"'{f}' is not a readable PyTorch file ({e})") from None
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict):
        raise ValueError(f"'{f}' has no 'module' state dict (not a DeepSpeed model states file)")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def export(checkpoint: str | Path, out: str | Path, recipe_path: str | None = None, eval_results: str | Path | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.recipe import build_model, load_recipe

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    eval_lines = eval_section(eval_results)  # bad input fails before the (slow) consolidation
    run_dir = ckpt_dir.parent
    run_info = run_dir / "recipe.json"
    overrides: dict = {}
    ds_cfg: dict = {}
    if recipe_path is None:
        if not run_info.is_file():
            raise FileNotFoundError(f"'{run_info}' is missing; pass --recipe to say which recipe trained '{checkpoint}'")
        info = json.loads(run_info.read_text())
        recipe_path, overrides, ds_cfg = info["recipe_file"], info.get("overrides", {}), info.get("deepspeed", {})
    recipe = load_recipe(recipe_path, {**overrides, "output_dir": str(run_dir)})
    processor = UnifiedProcessor.from_pretrained(recipe.data.processor)
    from unified_wm.fingerprint import KEY as TOKEN_SPACE, check_checkpoint, token_space

    check_checkpoint(ckpt_dir / tag, processor, f"processor '{recipe.data.processor}' (the recipe's data.processor)")
    model = build_model(recipe, processor)
    setattr(model.config, TOKEN_SPACE, token_space(processor))  # config.json records it: rollout/eval/play check it
    zero = ds_cfg.get("zero_optimization", {}).get("stage")
    from unified_wm.checkpoint import checkpoint_zero_stage

    saved_stage = checkpoint_zero_stage(ckpt_dir / tag)
    zero = saved_stage if saved_stage is not None else zero
    if zero == 0 or (zero is None and not list((ckpt_dir / tag).glob("*optim_states.pt"))):
        # ZeRO-0 (one process, or no partitioning): the module states file holds the whole model
        state = zero0_state_dict(ckpt_dir / tag)
        zero = 0
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{ckpt_dir}/{tag}' does not fit the recipe's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    metrics = []
    mfile = run_dir / "metrics.jsonl"
    if mfile.is_file():
        metrics = [json.loads(ln) for ln in mfile.read_text().splitlines() if ln.strip()]
    docs = load_token_documents(recipe.data.tokens)
    seeds = sorted({int(s) for s in docs["seed"]})
    templates = {}
    for name in docs["template"]:
        templates[name] = templates.get(name, 0) + 1
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        from unified_wm.model.remote_code import write_remote_code

        write_remote_code(tmp)  # the model's code too: loads with trust_remote_code=True without this package
        processor.save_pretrained(tmp)
        write_json(tmp / "training_seeds.json", {"data": recipe.data.tokens, "seeds": seeds})
        last = metrics[-1] if metrics else {}
        n_params = sum(p.numel() for p in model.parameters())
        zero = "?" if zero is None else zero
        card = [
            "---", "library_name: transformers", "tags: [unified_wm, world-model, video, mixture-of-contexts]", "---", "",
            "# unified_wm world model", "",
            f"Exported from `{ckpt_dir}/{tag}` (DeepSpeed ZeRO stage {zero}, "
            + ("the module states file" if zero == 0 else "consolidated with `zero_to_fp32`") + ") by `uwm export`. "
            f"{n_params / 1e6:.2f}M parameters, attention "
            f"`{model.config.attention['backend']}`, vocabulary {model.config.vocab_size} (text {processor.action_offset - processor.text_offset}, "
            f"actions {len(processor.action_names)}, video codes {processor.video.codebook_size}).", "",
            "```python", "import unified_wm", "from unified_wm.rollout import WorldModel",
            f"wm = WorldModel.from_pretrained('{out}')",
            "frames = wm.rollout(text='a red car drives right', actions=['right'] * 8, frames=8)", "```", "",
            "## Recipe", "", f"`{recipe_path}`" + (f" with overrides `{json.dumps(overrides)}`" if overrides else ""), "",
            "```json", json.dumps(dataclasses.asdict(recipe), indent=1), "```", "",
            "## Data", "",
            f"Token documents `{recipe.data.tokens}`: {len(docs)} documents "
            f"({', '.join(f'{k} {v}' for k, v in sorted(templates.items()))}), {len(seeds)} episode seeds; "
            f"processor `{recipe.data.processor}`." + (f" Held-out: `{recipe.data.val_tokens}`." if recipe.data.val_tokens else ""), "",
            "## Final training metrics", "", "```json", json.dumps(last, indent=1), "```", "",
            "## Evaluation", "", *eval_lines,
        ]
        (tmp / "README.md").write_text("\n".join(card))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm export", description="DeepSpeed checkpoint -> Hugging Face folder (safetensors).")
    ap.add_argument("--checkpoint", required=True, help="checkpoints folder (uses 'latest') or one stepN folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default=None, help="recipe that trained it (default: the one recorded in the run)")
    ap.add_argument("--eval-results", default=None, help="results.json from `uwm eval`, listed in the model card")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = ap.parse_args(argv)
    from unified_wm.utils import guarded_out

    try:
        with guarded_out(a.out, "export", a.overwrite):
            out = export(a.checkpoint, a.out, a.recipe, a.eval_results)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0
