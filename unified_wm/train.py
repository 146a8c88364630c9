"""Training through DeepSpeed: ``deepspeed --num_gpus N --module unified_wm.train --recipe R --deepspeed C``.

``uwm train`` runs the same loop in one process (DeepSpeed with world size 1). Several nodes:
a hostfile (``node1 slots=8`` per line) and ``deepspeed --hostfile hostfile --module unified_wm.train
--recipe R --deepspeed C`` from a checkout on a filesystem every node shares.

We use the DeepSpeed engine directly (not the HF Trainer): the loss is ours (per-task,
per-modality weights over one packed stream), and the engine already gives ZeRO 0-3 and
offload, checkpoint/resume of optimizer + scheduler and gradient clipping; the Trainer
would add a second config layer and its own data/resume logic around the same engine.

Each step: packed rows of token documents -> weighted next-token loss -> finite check on
every rank -> engine.backward -> engine.step(). Rank 0 shows a progress bar and writes
``metrics.jsonl`` and TensorBoard events (``<output_dir>/tensorboard``): loss, loss per
modality and per task, lr, grad norm, tokens/s, routing statistics, validation loss.

The recipe and its DeepSpeed config: ``unified_wm.recipe``. Packed batches and token weights:
``unified_wm.data.packing``. Checkpoints (atomic, verified, rotated; exact resume):
``unified_wm.checkpoint``.

Test-only hooks (environment variables, read by the loop; never set them in real runs):
  UWM_DEBUG_NAN_AT_STEP=N[:R]   the loss of step N on rank R (default 0) becomes NaN.
  UWM_DEBUG_STEP_SLEEP=S        sleep S seconds after every step (so a test can kill the
                                run at a known point).
  UWM_DEBUG_DUMP_STEP=DIR       after the backward of the first step's first micro-batch, rank 0
                                writes the loss, the per-modality losses and every parameter's
                                full gradient to DIR (grads.safetensors, loss.json).

Long sequences (``train.sequence_parallel``, ``train.tiled_mlp`` / ``train.tiled_loss``):
``unified_wm.parallel``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from unified_wm.checkpoint import (checkpoint_zero_stage, load_for_resume, read_latest, resolve_resume,
                                   save_checkpoint)
from unified_wm.data.packing import PackedBatches, prepare_batch
from unified_wm.distributed import all_reduce_sum, barrier, setup_distributed
from unified_wm.fingerprint import KEY as TOKEN_SPACE
from unified_wm.fingerprint import check_training_inputs, token_space
from unified_wm.model.attention_routing import summarize_routing
from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM
from unified_wm.recipe import Recipe, build_model, check_recipe_inputs, fill_ds_config, load_recipe, lr_lambda, read_ds_config
from unified_wm.parallel import check_sequence_parallel, check_zero_config, init_sequence_parallel, zero_grad_scale
from unified_wm.parallel import enable as enable_long_sequence
from unified_wm.parallel import per_task_ce as sharded_task_ce
from unified_wm.sequence import MODALITY_KEYS
from unified_wm.utils import ConfigError, MetricsWriter, atomic_file, deep_update, load_yaml, write_json


# ----------------------------------------------------------------------------- logging
class TensorBoard:
    """TensorBoard event files on rank 0 (``<output_dir>/tensorboard``); a one-line notice and
    nothing else when the ``tensorboard`` package is missing."""

    GROUPS = (("val_", "val/"), ("loss_task_", "loss_task/"), ("loss_", "loss_modality/"), ("moc_", "routing/"))

    def __init__(self, log_dir: Path | None):
        self.w = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("note: the 'tensorboard' package is not installed; no TensorBoard events (metrics.jsonl has everything)",
                  flush=True)
            return
        self.w = SummaryWriter(str(log_dir))

    @classmethod
    def tag(cls, key: str) -> str:
        if key == "loss":
            return "loss/total"
        for prefix, group in cls.GROUPS:
            if key.startswith(prefix):
                return group + key[len(prefix):]
        return "train/" + key

    def write(self, record: dict, step: int) -> None:
        if self.w is None:
            return
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.w.add_scalar(self.tag(k), v, step)
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or inf; raised on every rank at the same step."""


def _dump_step(d: str, engine, out, rank: int) -> None:
    from deepspeed.utils import safe_get_full_grad
    from safetensors.torch import save_file

    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}  # a collective under ZeRO-3
    if rank == 0:
        Path(d).mkdir(parents=True, exist_ok=True)
        save_file({n: g.detach().float().cpu().contiguous() for n, g in grads.items() if g is not None}, str(Path(d) / "grads.safetensors"))
        write_json(Path(d) / "loss.json", {"loss": float(out.loss), **{k: float(v) for k, v in out.modality_losses.items()}})


def _debug_nan_at() -> tuple[int, int] | None:
    v = os.environ.get("UWM_DEBUG_NAN_AT_STEP")
    if not v:
        return None
    step, _, r = v.partition(":")
    return int(step), int(r or 0)


# ----------------------------------------------------------------------------- the loop
def enable_checkpointing(model) -> None:
    """``model.gradient_checkpointing_enable()`` (non-reentrant), under transformers' newer
    name where it has one (the old name is a deprecated alias there)."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        fn({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def per_task_ce(logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """``[2 * n_tasks]``: (sum, count) of the unweighted next-token CE over each task's loss tokens.

    The task of a target is the template of the document the target token belongs to."""
    with torch.no_grad():
        V = logits.shape[-1]
        lb = labels[:, 1:].to(logits.device)
        tk = task[:, 1:].to(logits.device)
        valid = lb != -100
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), lb.clamp(min=0).reshape(-1), reduction="none").view_as(lb)
        sums = UnifiedWMForCausalLM.ce_sums(ce, tk, valid, n_tasks)
    return torch.tensor([x for pair in sums for x in pair], dtype=torch.float64)


def scheduled_sampling(model, ids: torch.Tensor, labels: torch.Tensor, rate: float, generator: torch.Generator,
                       passes: int = 1):
    """Parallel scheduled sampling (Bengio et al. 2015; Duckworth et al. 2019): the batch's inputs
    with a share ``rate`` of its generated video codes replaced by the model's own greedy guess.

    One forward without gradients (eval mode, as in a rollout) predicts every token from the
    true inputs; each video code that is a loss target and has a previous frame in its document
    (so not the first frame, which a rollout is given) is then, with probability ``rate``,
    swapped for the code the model ranked first there. The labels stay the true codes: the
    model learns to predict the next frame from inputs that hold its own mistakes, as in a
    rollout, where each frame is conditioned on generated ones. ``model``: the DeepSpeed engine
    or the bare model.

    ``passes`` > 1 repeats the forward on the mixed inputs, the same codes being replaced each
    time by the newest guess: pass k guesses from inputs that hold pass k-1's guesses, so a
    replaced code carries mistakes up to k frames deep, as in a rollout (at rate 1 the passes
    are Jacobi iterations of the model's greedy decoding of every generated frame). Returns
    (new ids, [candidates, replaced, replaced codes that differ from the truth]) as counts, so
    that shares over several rows are weighted by their codes."""
    from unified_wm.model.modeling_uwm import stream_layout_continue

    cfg = getattr(model, "module", model).config
    v_lo, v_hi = cfg.video_range
    _, _, _, (_, k_coords, _) = stream_layout_continue(ids, cfg, None)
    nxt = ids[:, 1:]
    candidate = (nxt >= v_lo) & (nxt < v_hi) & (labels[:, 1:] != -100) & (k_coords[:, 1:, 1] >= 2)
    pick = candidate & (torch.rand(nxt.shape, generator=generator) < rate)
    out = ids.clone()
    # every rank runs the same forwards, also one with nothing to replace (ZeRO-3 gathers weights in them)
    was_training = model.training
    model.eval()
    guess = nxt
    for _ in range(passes):
        with torch.no_grad():
            logits = model(input_ids=out.to(getattr(model, "device", ids.device))).logits
        guess = (logits[:, :-1, v_lo:v_hi].argmax(-1) + v_lo).to(ids.device)  # the guess for token t + 1
        out[:, 1:] = torch.where(pick, guess, nxt)
    model.train(was_training)
    counts = [int(candidate.sum()), int(pick.sum()), int((pick & (guess != nxt)).sum())]
    return out, counts


def changed_code_weights(ids: torch.Tensor, labels: torch.Tensor, cfg, weight: float) -> tuple[torch.Tensor, list[int]]:
    """``[B, N]`` loss-weight factors: ``1 + weight`` where the target is a video code (a loss
    target) that differs from the code at the same cell one frame back in its document, else 1.
    Copying the last frame gets most codes right (static background, a camera at rest); the
    codes that change carry the world's motion. Aligned like ``loss_weights`` (position j
    weighs target ``ids[j]``). Returns (factors, [video targets with a previous frame, changed])."""
    from unified_wm.model.modeling_uwm import stream_layout_continue

    v_lo, v_hi = cfg.video_range
    _, _, _, (_, _, prev) = stream_layout_continue(ids, cfg, None, offsets=((0, 0),))
    src = prev[:, :-1, 0]  # the position that predicts ids[j] is j - 1
    nxt = ids[:, 1:]
    has_prev = (src >= 0) & (nxt >= v_lo) & (nxt < v_hi) & (labels[:, 1:] != -100)
    before = torch.gather(ids, 1, src.clamp(min=0))
    changed = has_prev & (before != nxt)
    out = torch.ones(ids.shape, dtype=torch.float32)
    out[:, 1:] += weight * changed.float()
    return out, [int(has_prev.sum()), int(changed.sum())]


class _Step:
    """Per-step accumulators: loss, per-modality means and per-task (sum, count)."""

    def __init__(self, n_tasks: int):
        self.n_tasks = n_tasks
        self.agg = torch.zeros(2 + 2 * len(MODALITY_KEYS), dtype=torch.float64)
        self.tasks = torch.zeros(2 * n_tasks, dtype=torch.float64)

    def add(self, loss: float, modality_losses: dict) -> None:
        self.agg[0] += loss
        self.agg[1] += 1
        for i, m in enumerate(MODALITY_KEYS):
            if m in modality_losses:
                self.agg[2 + 2 * i] += float(modality_losses[m])
                self.agg[3 + 2 * i] += 1

    def reduce(self, world: int, device, with_tasks: bool) -> None:
        self.agg = all_reduce_sum(self.agg, world, device)
        if with_tasks:
            self.tasks = all_reduce_sum(self.tasks, world, device)

    def record(self, prefix: str, task_names: list[str]) -> dict:
        out = {f"{prefix}loss": float(self.agg[0] / max(self.agg[1], 1))}
        for i, m in enumerate(MODALITY_KEYS):
            if self.agg[3 + 2 * i] > 0:
                out[f"{prefix}loss_{m}"] = float(self.agg[2 + 2 * i] / self.agg[3 + 2 * i])
        for i, n in enumerate(task_names):
            if self.tasks[2 * i + 1] > 0:
                out[f"{prefix}loss_task_{n}"] = float(self.tasks[2 * i] / self.tasks[2 * i + 1])
        return out


def evaluate(engine, val: PackedBatches, recipe: Recipe, task_names: list[str], world: int, sp=None) -> dict:
    """Validation loss (total, per modality, per task) over ``eval_batches`` micro-batches per rank."""
    acc = _Step(len(task_names))
    engine.eval()
    with torch.no_grad():
        for i in range(recipe.train.eval_batches):
            ids, labels, weights, task = prepare_batch(val, i, engine.module.config, recipe, task_names)
            out = engine(input_ids=ids.to(engine.device), labels=labels.to(engine.device), loss_weights=weights.to(engine.device))
            acc.add(out.loss.item(), out.modality_losses)
            acc.tasks += _task_ce(out, labels, task, len(task_names), sp)
    engine.train()
    acc.reduce(world, engine.device, with_tasks=True)
    return acc.record("val_", task_names)


def _task_ce(out, labels, task, n_tasks: int, sp) -> torch.Tensor:
    """:func:`per_task_ce`, or its per-shard form after the long-sequence forward (unified_wm.parallel)."""
    if out.token_ce is not None:
        return sharded_task_ce(out, labels, task, n_tasks, sp)
    return per_task_ce(out.logits, labels, task, n_tasks)


def train(recipe_path: str, ds_config_path: str | None = None, *, resume: str | None = None,
          overrides: dict | None = None, progress: bool = True) -> dict:
    import deepspeed
    from tqdm import tqdm

    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.tokenization.processor import UnifiedProcessor

    recipe = load_recipe(recipe_path, overrides)
    check_recipe_inputs(recipe, recipe_path)
    ds_raw, ds_source = read_ds_config(ds_config_path)
    t = recipe.train
    sp_size = t.sequence_parallel
    try:  # every rank checks the same inputs before any collective: all fail alike, none hangs
        check_sequence_parallel(sp_size, seq_len=t.seq_len, heads=recipe.model.num_attention_heads,
                                kv_heads=recipe.model.num_key_value_heads, world=int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ConfigError(f"{recipe_path}: {e}") from None
    pre = fill_ds_config(ds_raw, recipe, int(os.environ.get("WORLD_SIZE", "1")) // sp_size, ds_source)  # bad input: fail before init
    try:
        check_zero_config(sp_size, pre, ds_source, tiled_loss=t.tiled_loss)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = resolve_resume(resume, ckpt_dir) if resume else None  # fail before init too
    if resume_from is not None:
        saved_stage, stage = checkpoint_zero_stage(resume_from), int(pre["zero_optimization"].get("stage", 0))
        if saved_stage is not None and saved_stage != stage:
            raise ConfigError(f"--resume: checkpoint '{resume_from}' was saved under ZeRO stage {saved_stage}, but this run's "
                              f"DeepSpeed config '{ds_source}' uses ZeRO stage {stage}; resume with a stage-{saved_stage} "
                              f"config (or export the checkpoint and start a new run)")
    processor = UnifiedProcessor.from_pretrained(recipe.data.processor)
    check_training_inputs(recipe, processor, resume_from)  # documents and resumed run vs processor: before init too
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    rank, world = setup_distributed()
    sp, mpu = init_sequence_parallel(sp_size, rank, world)
    ds_cfg = fill_ds_config(ds_raw, recipe, sp.dp_world, ds_source)
    zero_stage = int(ds_cfg["zero_optimization"].get("stage", 0))

    torch.manual_seed(t.seed)  # same initial weights on every rank
    model = build_model(recipe, processor)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    enable_long_sequence(model, sp, tiled_mlp=t.tiled_mlp, tiled_loss=t.tiled_loss, tile_tokens=t.tile_tokens,
                         grad_scale=zero_grad_scale(sp, ds_cfg))
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed * 7919 + 1 + rank)  # per-rank stream for the MoC regularisers
    docs = load_token_documents(recipe.data.tokens)
    task_names = list(recipe.tasks)
    batches = PackedBatches(docs, recipe, sp.dp_rank, sp.dp_world)  # the ranks of a sequence group share rows
    val = None
    if recipe.data.val_tokens and t.eval_every:
        val = PackedBatches(load_token_documents(recipe.data.val_tokens), recipe, sp.dp_rank, sp.dp_world,
                            source=recipe.data.val_tokens)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, mpu=mpu)

    start_step = 0
    if resume_from is not None:
        start_step = load_for_resume(engine, resume_from, rank)
        if rank == 0:
            print(f"resumed from step {start_step} ({resume_from})", flush=True)
    metrics = MetricsWriter(out / "metrics.jsonl" if rank == 0 else None)
    tb = TensorBoard(out / "tensorboard" if rank == 0 else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "recipe.json") as f:  # what export needs to rebuild the model
            json.dump({"recipe_file": str(recipe_path), "overrides": overrides or {}, "deepspeed": ds_cfg,
                       TOKEN_SPACE: token_space(processor)}, f, indent=2, default=str)
        n_params = sum(p.numel() for p in model.parameters())
        if zero_stage == 3:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters, attention={recipe.attention.backend}, world size {world}, "
              f"{len(docs)} documents, seq_len {t.seq_len}, ZeRO stage {zero_stage}", flush=True)
    nan_at = _debug_nan_at()
    dump_dir = os.environ.get("UWM_DEBUG_DUMP_STEP")
    step_sleep = float(os.environ.get("UWM_DEBUG_STEP_SLEEP", "0") or 0)
    bar = tqdm(total=t.max_steps, initial=start_step, desc="train", disable=not (progress and rank == 0), dynamic_ncols=True)
    engine.train()
    t0, tokens_since, last, routing = time.time(), 0, {}, {}
    plain_grad_norm = None
    last_good = read_latest(ckpt_dir)
    step = start_step
    try:
        while step < t.max_steps:
            acc = _Step(len(task_names))
            ss_stats = torch.zeros(3, dtype=torch.float64)  # scheduled sampling: candidate, replaced, wrong codes
            cc_stats = torch.zeros(2, dtype=torch.float64)  # changed-code weight: video targets with a previous frame, changed
            log_step = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps or step == start_step
            for micro in range(t.grad_accum):
                ids, labels, weights, task = prepare_batch(batches, step * t.grad_accum + micro, engine.module.config, recipe, task_names)
                if t.changed_code_weight:  # from the true inputs, before scheduled sampling replaces any
                    factors, counts = changed_code_weights(ids, labels, engine.module.config, t.changed_code_weight)
                    weights = weights * factors
                    cc_stats += torch.tensor(counts, dtype=torch.float64)
                rate = t.scheduled_sampling * min(1.0, (step + 1) / t.scheduled_sampling_ramp) if t.scheduled_sampling_ramp else t.scheduled_sampling
                if rate > 0:  # the same draw for a step on a resumed run
                    g = torch.Generator().manual_seed((t.seed * 1_000_003 + step * t.grad_accum + micro) * 4099 + rank)
                    ids, counts = scheduled_sampling(engine, ids, labels, rate, g, t.scheduled_sampling_passes)
                    ss_stats += torch.tensor(counts, dtype=torch.float64)
                want_stats = log_step and micro == 0
                out_ = engine(input_ids=ids.to(engine.device), labels=labels.to(engine.device), loss_weights=weights.to(engine.device),
                              return_routing_stats=want_stats)
                if want_stats and out_.routing_stats:
                    routing = summarize_routing(out_.routing_stats)
                loss = out_.loss
                if nan_at is not None and nan_at == (step + 1, rank):
                    loss = loss * float("nan")  # UWM_DEBUG_NAN_AT_STEP (tests only)
                # every rank learns whether any rank's loss is bad BEFORE backward, so none waits in a collective
                mine = torch.zeros(world, dtype=torch.float64)
                mine[rank] = loss.item()
                losses = all_reduce_sum(mine, world, engine.device)
                if not torch.isfinite(losses).all():
                    bad = [f"rank {r}: {losses[r].item()}" for r in range(world) if not math.isfinite(losses[r].item())]
                    where = f"'{ckpt_dir / last_good}'" if last_good else f"none (no checkpoint was saved in '{ckpt_dir}')"
                    raise TrainingDiverged(
                        f"loss is not finite at step {step + 1} (micro-batch {micro}; {', '.join(bad)}); stopped before "
                        f"updating the weights. Last good checkpoint: {where}. Resume it with --resume latest, "
                        f"e.g. with a lower train.lr or more warmup"
                    )
                if log_step:
                    acc.tasks += _task_ce(out_, labels, task, len(task_names), sp)
                engine.backward(loss)
                if dump_dir and step == start_step and micro == 0:
                    _dump_step(dump_dir, engine, out_, rank)  # UWM_DEBUG_DUMP_STEP (tests only)
                if log_step and zero_stage == 0 and micro == t.grad_accum - 1:
                    # DeepSpeed only tracks the global grad norm under ZeRO; without it, measure it here
                    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                    plain_grad_norm = float(torch.stack(grads).norm()) if grads else None
                engine.step()
                acc.add(loss.item(), out_.modality_losses)
                tokens_since += int((ids != 0).sum()) / sp.size  # a sequence group shares one row
            step += 1
            acc.reduce(world, engine.device, with_tasks=log_step)
            bar.update(1)
            last = {"step": step, **acc.record("", task_names if log_step else [])}
            if log_step:
                dt = time.time() - t0
                tokens_total = all_reduce_sum(torch.tensor([tokens_since], dtype=torch.float64), world, engine.device).item()
                gn = engine.get_global_grad_norm() if zero_stage > 0 else plain_grad_norm
                gn = float(gn) if gn is not None else None
                last.update(lr=float(sched.get_last_lr()[0]), grad_norm=gn, tokens_per_s=tokens_total / max(dt, 1e-9), **routing)
                if t.scheduled_sampling:  # every rank joins the sum, also one whose rows held no candidate
                    ss = all_reduce_sum(ss_stats, world, engine.device)
                    last.update(ss_rate=rate, ss_replaced=float(ss[1] / max(ss[0], 1)), ss_wrong=float(ss[2] / max(ss[1], 1)))
                if t.changed_code_weight:
                    cc = all_reduce_sum(cc_stats, world, engine.device)
                    last.update(changed_code_share=float(cc[1] / max(cc[0], 1)))
            if val is not None and step % t.eval_every == 0:
                last.update(evaluate(engine, val, recipe, task_names, world, sp))
            if log_step or "val_loss" in last:
                if rank == 0:
                    metrics.write(**last)
                    tb.write(last, step)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", video=f"{last.get('loss_video', float('nan')):.3f}")
                    mods = " ".join(f"{m}={last[f'loss_{m}']:.3f}" for m in MODALITY_KEYS if f"loss_{m}" in last)
                    tasks = " ".join(f"{n}={last[f'loss_task_{n}']:.3f}" for n in task_names if f"loss_task_{n}" in last)
                    moc = f" | sparsity {last['moc_sparsity']:.2f}" if "moc_sparsity" in last else ""
                    vl = f" | val {last['val_loss']:.4f}" if "val_loss" in last else ""
                    lr = f" | lr {last['lr']:.2e} | {last['tokens_per_s']:.0f} tok/s" if "lr" in last else ""
                    tqdm.write(f"step {step:5d} loss {last['loss']:.4f} | {mods} | tasks {tasks}{lr}{moc}{vl}")
                if log_step:
                    t0, tokens_since = time.time(), 0
            if t.save_every and (step % t.save_every == 0 or step == t.max_steps):
                saved = save_checkpoint(engine, ckpt_dir, step, rank=rank, world=world, zero_stage=zero_stage, keep=t.keep_checkpoints,
                                        info={TOKEN_SPACE: token_space(processor)})
                last_good = saved.name
            if step_sleep:
                time.sleep(step_sleep)
    finally:
        bar.close()
        tb.close()
    barrier(world)
    return last


def parse_override(item: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}} (the value is read as YAML, 1e-3 being a float)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. train.lr=3e-4")
    key, value = item.split("=", 1)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for k in parts[:-1]:
        cur = cur.setdefault(k, {})
    if not all(parts):
        raise ConfigError(f"--set '{item}': the key '{key}' has an empty part (expected e.g. train.lr)")
    try:
        cur[parts[-1]] = load_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set '{item}': the value is not valid YAML: {e}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="unified_wm.train", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True, help="training recipe (YAML, recipes/)")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (ds_configs/); default ZeRO-0")
    ap.add_argument("--resume", default=None,
                    help="'latest' (this run's newest complete checkpoint), a checkpoints folder, or one …/checkpoints/stepN")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set train.lr=3e-4 --set data.tokens=runs/x/tokens")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs still print every log_every steps)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    a = ap.parse_args(argv)
    overrides: dict = {}
    if a.max_steps is not None:
        overrides.setdefault("train", {})["max_steps"] = a.max_steps
    if a.output_dir is not None:
        overrides["output_dir"] = a.output_dir
    try:
        for item in a.set:
            overrides = deep_update(overrides, parse_override(item))
        last = train(a.recipe, a.deepspeed, resume=a.resume, overrides=overrides, progress=not a.no_progress)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print("final: " + json.dumps(last), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
