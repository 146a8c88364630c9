"""Training through DeepSpeed: ``deepspeed --num_gpus N -m unified_wm.train --recipe R --deepspeed C``.

``uwm train`` runs the same loop in one process (DeepSpeed with world size 1). We use the
DeepSpeed engine directly (not the HF Trainer): the loss is ours (per-task, per-modality
weights over one packed stream), and the engine already gives ZeRO, checkpoint/resume of
optimizer + scheduler, and gradient clipping with no glue code of ours.

Each step: packed rows of token documents -> weighted next-token loss -> engine.step().
Rank 0 shows a progress bar and writes ``metrics.jsonl`` (loss, loss per modality, lr,
grad norm, tokens/s). Checkpoints: ``<output_dir>/checkpoints/step<N>`` (DeepSpeed format).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unified_wm.sequence import MODALITY_KEYS, TEMPLATES
from unified_wm.utils import ConfigError, MetricsWriter, deep_update, load_config


# ----------------------------------------------------------------------------- recipe
@dataclass
class ModelRecipe:
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


@dataclass
class AttentionRecipe:
    backend: str = "dense"
    top_k: int = 4
    n_sink: int = 1
    drop_off: float = 0.0
    drop_in: float = 0.0


@dataclass
class LossWeights:
    special: float = 1.0
    text: float = 1.0
    action: float = 1.0
    video: float = 1.0


@dataclass
class TaskRecipe:
    weight: float = 1.0  # sampling share of this template's documents
    loss: LossWeights = field(default_factory=LossWeights)


@dataclass
class DataRecipe:
    tokens: str = ""  # token documents (uwm data tokenize)
    processor: str = ""  # processor folder (save_pretrained)


@dataclass
class TrainRecipe:
    seq_len: int = 1024
    micro_batch_size: int = 2
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    torch_threads: int = 0  # 0: leave torch's default


@dataclass
class Recipe:
    output_dir: str
    data: DataRecipe = field(default_factory=DataRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    attention: AttentionRecipe = field(default_factory=AttentionRecipe)
    tasks: dict[str, TaskRecipe] = field(default_factory=lambda: {"interleaved": TaskRecipe()})
    train: TrainRecipe = field(default_factory=TrainRecipe)
    description: str = ""

    def validate(self) -> None:
        for name in self.tasks:
            if name not in TEMPLATES:
                raise ValueError(f"tasks: unknown task template '{name}'; valid templates: {', '.join(TEMPLATES)}")
        if not self.tasks or sum(t.weight for t in self.tasks.values()) <= 0:
            raise ValueError("tasks: at least one task needs a positive weight")
        if self.train.seq_len <= 0 or self.train.micro_batch_size <= 0 or self.train.grad_accum <= 0:
            raise ValueError("train: seq_len, micro_batch_size and grad_accum must be positive")


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> Recipe:
    return load_config(Recipe, path, overrides)


def check_recipe_inputs(recipe: Recipe, recipe_path) -> None:
    """Fail before launch if the recipe points at data or a processor that is not there."""
    for key, what, marker in (("tokens", "token documents", "dataset_info.json"), ("processor", "processor", "processor_config.json")):
        p = Path(getattr(recipe.data, key))
        if not getattr(recipe.data, key):
            raise ConfigError(f"{recipe_path}: 'data.{key}' is empty; it must point at the {what} folder")
        if not (p / marker).exists():
            raise ConfigError(f"{recipe_path}: 'data.{key}' = '{p}' has no {what} ({marker} missing)")


# ----------------------------------------------------------------------------- deepspeed config
def fill_ds_config(ds_cfg: dict, recipe: Recipe, world_size: int, source: str) -> dict:
    """Fill ``"auto"`` values from the recipe; refuse values that contradict it (naming file and key)."""
    t = recipe.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
    }
    cfg = json.loads(json.dumps(ds_cfg))
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have == "auto":
            cfg[key] = value
        elif have != value:
            raise ConfigError(
                f"{source}: '{key}' = {have} contradicts the recipe ({value} from micro_batch_size={t.micro_batch_size}, "
                f"grad_accum={t.grad_accum}, world size {world_size}); set it to \"auto\" or change the recipe"
            )
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"{source}: '{key}' is set; the optimizer and schedule come from the recipe, remove '{key}'")
    cfg.setdefault("zero_allow_untested_optimizer", True)
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


# ----------------------------------------------------------------------------- data
class PackedBatches:
    """Deterministic packed rows: (epoch, rank) -> list of rows; the order only depends on the seed.

    Each epoch samples documents by task weight (with replacement inside a template), then packs
    them greedily into rows of ``seq_len`` tokens; a document longer than a row is cut at the
    row's end (its remainder is dropped). Rows are dealt to ranks round-robin.
    """

    def __init__(self, docs, recipe: Recipe, rank: int, world: int, pad_id: int = 0):
        self.docs, self.recipe, self.rank, self.world, self.pad = docs, recipe, rank, world, pad_id
        templates = np.array(docs["template"])
        self.by_task = {name: np.nonzero(templates == name)[0] for name in recipe.tasks}
        missing = [n for n, idx in self.by_task.items() if len(idx) == 0 and recipe.tasks[n].weight > 0]
        if missing:
            raise ConfigError(f"tasks: template '{missing[0]}' has no documents in '{recipe.data.tokens}' (tokenize with it)")
        self.task_of = np.zeros(len(templates), dtype=np.int64)
        for i, name in enumerate(recipe.tasks):
            self.task_of[self.by_task[name]] = i
        self.ids = docs["input_ids"]
        self.masks = docs["loss_mask"]
        self._epoch_rows: dict[int, list] = {}

    def epoch_rows(self, epoch: int):
        if epoch in self._epoch_rows:
            return self._epoch_rows[epoch]
        rng = np.random.default_rng(self.recipe.train.seed * 1000003 + epoch)
        names = [n for n in self.recipe.tasks if len(self.by_task[n])]
        w = np.array([self.recipe.tasks[n].weight for n in names], dtype=float)
        n_docs = sum(len(self.by_task[n]) for n in names)
        choice = rng.choice(len(names), size=n_docs, p=w / w.sum())
        order = [int(self.by_task[names[c]][rng.integers(len(self.by_task[names[c]]))]) for c in choice]
        L = self.recipe.train.seq_len
        rows, cur_ids, cur_mask, cur_task = [], [], [], []
        for d in order:
            ids, mask = list(self.ids[d]), list(self.masks[d])
            if cur_ids and len(cur_ids) + len(ids) > L:
                rows.append((cur_ids, cur_mask, cur_task))
                cur_ids, cur_mask, cur_task = [], [], []
            take = ids[:L - len(cur_ids)]
            cur_ids += take
            cur_mask += mask[:len(take)]
            cur_task += [int(self.task_of[d])] * len(take)
        if cur_ids:
            rows.append((cur_ids, cur_mask, cur_task))
        self._epoch_rows = {epoch: rows}
        return rows

    def rows_per_rank_per_epoch(self) -> int:
        return len(self.epoch_rows(0)) // self.world

    def batch(self, micro_step: int):
        """The micro-batch of global micro-step ``micro_step`` for this rank."""
        mbs = self.recipe.train.micro_batch_size
        per_epoch = max(1, self.rows_per_rank_per_epoch() // mbs)
        epoch, k = divmod(micro_step, per_epoch)
        rows = self.epoch_rows(epoch)
        picked = [rows[((k * mbs + j) * self.world + self.rank) % len(rows)] for j in range(mbs)]
        L = self.recipe.train.seq_len
        ids = torch.full((mbs, L), self.pad, dtype=torch.long)
        mask = torch.zeros((mbs, L), dtype=torch.float32)
        task = torch.zeros((mbs, L), dtype=torch.long)
        for j, (r_ids, r_mask, r_task) in enumerate(picked):
            ids[j, :len(r_ids)] = torch.tensor(r_ids)
            mask[j, :len(r_mask)] = torch.tensor(r_mask, dtype=torch.float32)
            task[j, :len(r_task)] = torch.tensor(r_task)
        return ids, mask, task, epoch


def token_weights(ids, mask, task, modality, recipe: Recipe, task_names: list[str]) -> torch.Tensor:
    """Loss weight of every token: its template's mask x the recipe's weight for its modality."""
    table = torch.tensor([[getattr(recipe.tasks[n].loss, m) for m in MODALITY_KEYS] for n in task_names])
    return mask * table[task, modality]


# ----------------------------------------------------------------------------- distributed setup
def setup_distributed() -> tuple[int, int]:
    """Rank and world size; a plain process becomes a world of one for DeepSpeed."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def default_ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 0}}


# ----------------------------------------------------------------------------- the loop
def build_model(recipe: Recipe, processor):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    a = recipe.attention
    cfg = UnifiedWMConfig(
        **vars(recipe.model), **processor.model_layout(), attn_backend=a.backend, moc_top_k=a.top_k,
        moc_n_sink=a.n_sink, moc_drop_off=a.drop_off, moc_drop_in=a.drop_in,
    )
    return UnifiedWMForCausalLM(cfg)


def lr_lambda(recipe: Recipe):
    t = recipe.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / max(1, t.warmup_steps)
        prog = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def rotate_checkpoints(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    for p in tags[:-keep] if keep > 0 else []:
        import shutil

        shutil.rmtree(p, ignore_errors=True)


def train(recipe_path: str, ds_config_path: str | None = None, *, resume: str | None = None,
          overrides: dict | None = None, progress: bool = True) -> dict:
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.model.modeling_uwm import stream_layout, summarize_routing
    from unified_wm.tokenization.processor import UnifiedProcessor

    recipe = load_recipe(recipe_path, overrides)
    check_recipe_inputs(recipe, recipe_path)
    if ds_config_path:
        p = Path(ds_config_path)
        if not p.is_file():
            raise ConfigError(f"DeepSpeed config '{p}' does not exist")
        try:
            ds_raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
        ds_source = str(p)
    else:
        ds_raw, ds_source = default_ds_config(), "<default ZeRO-0 config>"
    t = recipe.train
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    rank, world = setup_distributed()
    ds_cfg = fill_ds_config(ds_raw, recipe, world, ds_source)
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed)  # same init on every rank

    processor = UnifiedProcessor.from_pretrained(recipe.data.processor)
    model = build_model(recipe, processor)
    docs = load_token_documents(recipe.data.tokens)
    task_names = list(recipe.tasks)
    batches = PackedBatches(docs, recipe, rank, world)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)

    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    start_step = 0
    if resume:
        load_dir, tag = (ckpt_dir, None) if resume == "latest" else (Path(resume).parent, Path(resume).name)
        if not (load_dir / "latest").exists() and tag is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in '{ckpt_dir}'")
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        start_step = int(client["step"])
        if rank == 0:
            print(f"resumed from step {start_step}", flush=True)
    metrics = MetricsWriter(out / "metrics.jsonl" if rank == 0 else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps({"recipe_file": str(recipe_path), "overrides": overrides or {}, "deepspeed": ds_cfg}, indent=2, default=str))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters, attention={recipe.attention.backend}, world size {world}, "
              f"{len(docs)} documents, seq_len {t.seq_len}, ZeRO stage {ds_cfg['zero_optimization'].get('stage', 0)}", flush=True)
    bar = tqdm(total=t.max_steps, initial=start_step, desc="train", disable=not (progress and rank == 0), dynamic_ncols=True)
    engine.train()
    t0, tokens_since, last, routing = time.time(), 0, {}, {}
    zero_stage = int(ds_cfg["zero_optimization"].get("stage", 0))
    plain_grad_norm = None
    step = start_step
    while step < t.max_steps:
        agg = torch.zeros(2 + 2 * len(MODALITY_KEYS))  # loss sum, count, per-modality (sum, count)
        log_step = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps or step == start_step
        for micro in range(t.grad_accum):
            ids, mask, task, _ = batches.batch(step * t.grad_accum + micro)
            _, modality = stream_layout(ids, engine.module.config)
            weights = token_weights(ids, mask, task, modality, recipe, task_names)
            labels = torch.where(weights > 0, ids, torch.full_like(ids, -100))
            want_stats = log_step and micro == 0
            out_ = engine(input_ids=ids.to(engine.device), labels=labels.to(engine.device), loss_weights=weights.to(engine.device),
                          return_routing_stats=want_stats)
            if want_stats and out_.routing_stats:
                routing = summarize_routing(out_.routing_stats)
            loss = out_.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step + 1} (rank {rank}); stopping. "
                    f"The last good checkpoint is in '{ckpt_dir}'"
                )
            engine.backward(loss)
            if log_step and zero_stage == 0 and micro == t.grad_accum - 1:
                # DeepSpeed only tracks the global grad norm under ZeRO; without it, measure it here
                grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                plain_grad_norm = float(torch.stack(grads).norm()) if grads else None
            engine.step()
            agg[0] += loss.item()
            agg[1] += 1
            for i, m in enumerate(MODALITY_KEYS):
                if m in out_.modality_losses:
                    agg[2 + 2 * i] += out_.modality_losses[m].item()
                    agg[3 + 2 * i] += 1
            tokens_since += int((ids != 0).sum())
        step += 1
        if world > 1:
            dist.all_reduce(agg)
            tok = torch.tensor([tokens_since], dtype=torch.float64)
            dist.all_reduce(tok)
            tokens_total = int(tok.item())
        else:
            tokens_total = tokens_since
        bar.update(1)
        last = {"step": step, "loss": float(agg[0] / agg[1])}
        for i, m in enumerate(MODALITY_KEYS):
            if agg[3 + 2 * i] > 0:
                last[f"loss_{m}"] = float(agg[2 + 2 * i] / agg[3 + 2 * i])
        if log_step:
            dt = time.time() - t0
            gn = engine.get_global_grad_norm() if zero_stage > 0 else plain_grad_norm
            last.update(lr=float(sched.get_last_lr()[0]), grad_norm=float(gn) if gn is not None else None,
                        tokens_per_s=tokens_total / max(dt, 1e-9), **routing)
            if rank == 0:
                metrics.write(**last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", video=f"{last.get('loss_video', float('nan')):.3f}")
                mods = " ".join(f"{m}={last[f'loss_{m}']:.3f}" for m in MODALITY_KEYS if f"loss_{m}" in last)
                moc = f" | sparsity {last['moc_sparsity']:.2f}" if "moc_sparsity" in last else ""
                tqdm.write(f"step {step:5d} loss {last['loss']:.4f} | {mods} | lr {last['lr']:.2e} | "
                           f"{last['tokens_per_s']:.0f} tok/s{moc}")
            t0, tokens_since = time.time(), 0
        if t.save_every and (step % t.save_every == 0 or step == t.max_steps):
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})
            if rank == 0:
                rotate_checkpoints(ckpt_dir, t.keep_checkpoints)
    bar.close()
    if world > 1:
        dist.barrier()
    return last


def parse_override(item: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}} (the value is read as YAML)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. train.lr=3e-4")
    key, value = item.split("=", 1)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for k in parts[:-1]:
        cur = cur.setdefault(k, {})
    cur[parts[-1]] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="unified_wm.train", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True, help="training recipe (YAML, recipes/)")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (ds_configs/); default ZeRO-0")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (…/checkpoints/stepN)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set train.lr=3e-4 --set data.tokens=runs/x/tokens")
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
        last = train(a.recipe, a.deepspeed, resume=a.resume, overrides=overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print("final: " + json.dumps(last), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
