"""Training through DeepSpeed: ``deepspeed --num_gpus N -m unified_wm.train --recipe R --deepspeed C``.

``uwm train`` runs the same loop in one process (DeepSpeed with world size 1). Several nodes:
a hostfile (``node1 slots=8`` per line) and ``deepspeed --hostfile hostfile -m unified_wm.train
--recipe R --deepspeed C`` from a checkout on a filesystem every node shares.

We use the DeepSpeed engine directly (not the HF Trainer): the loss is ours (per-task,
per-modality weights over one packed stream), and the engine already gives ZeRO 0-3 and
offload, checkpoint/resume of optimizer + scheduler and gradient clipping; the Trainer
would add a second config layer and its own data/resume logic around the same engine.

Each step: packed rows of token documents -> weighted next-token loss -> finite check on
every rank -> engine.backward -> engine.step(). Rank 0 shows a progress bar and writes
``metrics.jsonl`` and TensorBoard events (``<output_dir>/tensorboard``): loss, loss per
modality and per task, lr, grad norm, tokens/s, routing statistics, validation loss.

Checkpoints (``<output_dir>/checkpoints``): each save goes to ``tmp-step<N>`` (DeepSpeed
files + every rank's RNG state), is verified and fsynced, gets ``complete.json``, and only
then is renamed to ``step<N>`` and named in ``latest``. A crash mid-write leaves only a
``tmp-`` folder, which resume ignores and the next save removes; rotation keeps the newest
``keep_checkpoints`` complete ones and never the one ``latest`` names.

Test-only hooks (environment variables, read by the loop; never set them in real runs):
  UWM_DEBUG_NAN_AT_STEP=N[:R]   the loss of step N on rank R (default 0) becomes NaN.
  UWM_DEBUG_STEP_SLEEP=S        sleep S seconds after every step (so a test can kill the
                                run at a known point).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unified_wm.sequence import MODALITY_KEYS, TEMPLATES, TaskWeights
from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, TEXT_CLOSE, TEXT_OPEN
from unified_wm.utils import ConfigError, MetricsWriter, atomic_file, deep_update, extensions_dir, load_config, write_json


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
    rope_mode: str = "1d"  # "3d": rotary pairs split over document position, frame, row and column
    attention_bias: bool = False  # biases on the query, key and value projections


@dataclass
class AttentionRecipe:
    backend: str = "dense"
    top_k: int = 4
    n_sink: int = 1
    drop_off: float = 0.0
    drop_in: float = 0.0


# loss weight per modality of the target token: the same four fields the templates use
LossWeights = TaskWeights


@dataclass
class TaskRecipe:
    weight: float = 1.0  # sampling share of this template's documents
    loss: LossWeights = field(default_factory=LossWeights)


@dataclass
class DataRecipe:
    tokens: str = ""  # token documents (uwm data tokenize)
    processor: str = ""  # processor folder (save_pretrained): text + video tokenizers, id space
    val_tokens: str = ""  # optional held-out token documents: validation loss every train.eval_every steps


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
    save_every: int = 100  # checkpoint every N steps and at the last step; 0: no checkpoints
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0 keeps all
    eval_every: int = 0  # validation loss on data.val_tokens every N steps (0: never)
    eval_batches: int = 4  # micro-batches per rank in one validation pass
    # condition dropout, so classifier-free guidance has its unconditional streams: the share of
    # documents whose text segments (interleaved, dynamics, t2v) / action segments
    # (interleaved, dynamics) are removed before packing (uwm rollout --cfg-text / --cfg-action)
    text_dropout: float = 0.0
    action_dropout: float = 0.0
    torch_threads: int = 0  # 0: leave torch's default
    # activation checkpointing: keep only each Block's input, recompute the Block in the
    # backward (less memory at long seq_len for ~1/3 more compute; same gradients)
    gradient_checkpointing: bool = False


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
        for name, task in self.tasks.items():
            if not (task.weight >= 0 and math.isfinite(task.weight)):
                raise ValueError(f"'tasks.{name}.weight' must be >= 0, got {task.weight}")
            for mod, w in dataclasses.asdict(task.loss).items():
                if not (w >= 0 and math.isfinite(w)):
                    raise ValueError(f"'tasks.{name}.loss.{mod}' is a loss weight and must be >= 0, got {w}")
        if not self.tasks or sum(t.weight for t in self.tasks.values()) <= 0:
            raise ValueError("tasks: at least one task needs a positive weight")
        t = self.train
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ValueError(f"'train.min_lr_ratio' must be in [0, 1] (the final lr as a share of train.lr), got {t.min_lr_ratio}")
        if not (t.grad_clip >= 0 and math.isfinite(t.grad_clip)):
            raise ValueError(f"'train.grad_clip' must be >= 0 (0: no clipping), got {t.grad_clip}")
        if t.weight_decay < 0:
            raise ValueError(f"'train.weight_decay' must be >= 0, got {t.weight_decay}")
        for key in ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "log_every", "eval_batches"):
            if getattr(t, key) <= 0:
                raise ValueError(f"'train.{key}' must be positive, got {getattr(t, key)}")
        for key in ("save_every", "keep_checkpoints", "eval_every", "warmup_steps", "torch_threads"):
            if getattr(t, key) < 0:
                raise ValueError(f"'train.{key}' must be >= 0, got {getattr(t, key)}")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise ValueError(f"'train.lr' must be a positive number, got {t.lr}")
        for key in ("text_dropout", "action_dropout"):
            if not 0.0 <= getattr(t, key) < 1.0:
                raise ValueError(f"'train.{key}' must be in [0, 1), got {getattr(t, key)}")
        if len(t.betas) != 2:
            raise ValueError(f"'train.betas' must hold two numbers, got {t.betas}")
        if t.eval_every and not self.data.val_tokens:
            raise ValueError("'train.eval_every' is set but 'data.val_tokens' is empty (no held-out token documents)")
        if self.model.max_position_embeddings < t.seq_len:
            raise ValueError(f"'train.seq_len' = {t.seq_len} exceeds 'model.max_position_embeddings' = {self.model.max_position_embeddings}")


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> Recipe:
    return load_config(Recipe, path, overrides)


def check_recipe_inputs(recipe: Recipe, recipe_path) -> None:
    """Fail before launch if the recipe points at data or a processor that is not there."""
    checks = [("tokens", "token documents", "dataset_info.json"), ("processor", "processor", "processor_config.json")]
    if recipe.data.val_tokens:
        checks.append(("val_tokens", "held-out token documents", "dataset_info.json"))
    for key, what, marker in checks:
        p = Path(getattr(recipe.data, key))
        if not getattr(recipe.data, key):
            raise ConfigError(f"{recipe_path}: 'data.{key}' is empty; it must point at the {what} folder")
        if not (p / marker).exists():
            raise ConfigError(f"{recipe_path}: 'data.{key}' = '{p}' has no {what} ({marker} missing)")


# ----------------------------------------------------------------------------- deepspeed config
@functools.lru_cache(maxsize=1)
def deepspeed_config_keys() -> frozenset[str]:
    """The keys DeepSpeed's config reads, taken from the installed DeepSpeed itself: the string
    constants of its config/constants modules, the fields (and aliases) of its pydantic config
    classes, the literal keys ``deepspeed.runtime.config`` reads, and the removed top-level keys it
    refuses with its own message. A superset of the top-level keys, so a misspelling (``train_batch_sze``)
    is caught while every real key passes."""
    import inspect
    import re

    import deepspeed.runtime.config as dsc
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    keys: set[str] = set()
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("deepspeed") and ("constants" in name or name.endswith("config")):
            keys.update(v for k, v in list(vars(mod).items()) if k.isupper() and isinstance(v, str))
    stack = list(DeepSpeedConfigModel.__subclasses__())
    while stack:
        c = stack.pop()
        stack += c.__subclasses__()
        for fname, f in getattr(c, "model_fields", {}).items():
            keys.add(fname)
            if getattr(f, "alias", None):
                keys.add(f.alias)
    keys.update(re.findall(r"""param_dict(?:\.get\(|\[)\s*['"](\w+)['"]""", inspect.getsource(dsc)))
    keys.update(getattr(dsc, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))  # DeepSpeed refuses these with its own reason
    return frozenset(keys)


def fill_ds_config(ds_cfg: dict, recipe: Recipe, world_size: int, source: str) -> dict:
    """Fill ``"auto"`` values from the recipe; refuse values that contradict it (naming file and key)."""
    t = recipe.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
    }
    if not isinstance(ds_cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    known = deepspeed_config_keys()
    unknown = [k for k in ds_cfg if k not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.75)
        raise ConfigError(f"{source}: unknown DeepSpeed config key '{unknown[0]}'"
                          + (f" (did you mean '{close[0]}'?)" if close else " (not a key DeepSpeed reads)"))
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
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: 'zero_optimization' must be an object")
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: 'zero_optimization.stage' = {stage!r}; expected 0, 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        dev = zero.get(key, {}).get("device", "none")
        if dev not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{source}: 'zero_optimization.{key}.device' = {dev!r}; expected none, cpu or nvme")
    h = recipe.model.hidden_size
    zero_auto = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                 "stage3_param_persistence_threshold": 10 * h}  # the HF Trainer's rule for these sizes
    for key, value in zero_auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = [f"zero_optimization.{k}" for k, v in zero.items() if v == "auto"] + [k for k, v in cfg.items() if v == "auto"]
    if left:
        raise ConfigError(f"{source}: '{left[0]}' is \"auto\" but the recipe cannot fill it; give a value")
    if zero.get("offload_param", {}).get("device", "none") != "none" and stage != 3:
        raise ConfigError(f"{source}: 'zero_optimization.offload_param' needs stage 3 (stage is {stage})")
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = torch.cuda.is_available()
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        # our optimizer is a plain torch AdamW (the recipe's); DeepSpeed's CPU Adam would need a JIT build
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


# ----------------------------------------------------------------------------- data
class PackedBatches:
    """Deterministic packed rows: (epoch, rank) -> list of rows; the order only depends on the seed.

    Each epoch samples documents by task weight (with replacement inside a template), then packs
    them greedily into rows of ``seq_len`` tokens; a document longer than a row is cut at the
    row's end (its remainder is dropped). Rows are dealt to ranks round-robin. ``batch(i)`` is a
    pure function of ``i``: resuming at step ``s`` continues the data order exactly.
    """

    def __init__(self, docs, recipe: Recipe, rank: int, world: int, pad_id: int = 0, source: str | None = None):
        self.docs, self.recipe, self.rank, self.world, self.pad = docs, recipe, rank, world, pad_id
        templates = np.array(docs["template"])
        self.by_task = {name: np.nonzero(templates == name)[0] for name in recipe.tasks}
        missing = [n for n, idx in self.by_task.items() if len(idx) == 0 and recipe.tasks[n].weight > 0]
        if missing:
            where = source or recipe.data.tokens
            raise ConfigError(f"tasks: template '{missing[0]}' has no documents in '{where}' (tokenize with it)")
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
        names = [n for n in self.recipe.tasks if len(self.by_task[n]) and self.recipe.tasks[n].weight > 0]
        w = np.array([self.recipe.tasks[n].weight for n in names], dtype=float)
        n_docs = sum(len(self.by_task[n]) for n in names)
        choice = rng.choice(len(names), size=n_docs, p=w / w.sum())
        order = [int(self.by_task[names[c]][rng.integers(len(self.by_task[names[c]]))]) for c in choice]
        L = self.recipe.train.seq_len
        tr = self.recipe.train
        # a separate generator: the document order does not change when dropout is switched on
        drop_rng = np.random.default_rng([tr.seed, epoch, 7])
        task_names = list(self.recipe.tasks)
        rows, cur_ids, cur_mask, cur_task = [], [], [], []
        for d in order:
            ids, mask = list(self.ids[d]), list(self.masks[d])
            if tr.text_dropout or tr.action_dropout:
                name = task_names[int(self.task_of[d])]
                u_text, u_act = drop_rng.random(2)
                if name in TEXT_DROPPABLE and u_text < tr.text_dropout:
                    ids, mask = drop_segments(ids, mask, TEXT_OPEN, TEXT_CLOSE)
                if name in ACTION_DROPPABLE and u_act < tr.action_dropout:
                    ids, mask = drop_segments(ids, mask, ACT_OPEN, ACT_CLOSE)
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


# templates whose text / action segments are conditions (not the only target) and may be dropped
TEXT_DROPPABLE = ("interleaved", "dynamics", "t2v")
ACTION_DROPPABLE = ("interleaved", "dynamics")


def drop_segments(ids: list[int], mask: list, open_id: int, close_id: int) -> tuple[list[int], list]:
    """``ids``/``mask`` without every ``open_id ... close_id`` segment (markers included)."""
    out_ids, out_mask, inside = [], [], False
    for t, m in zip(ids, mask):
        if t == open_id:
            inside = True
        if not inside:
            out_ids.append(t)
            out_mask.append(m)
        if t == close_id:
            inside = False
    return out_ids, out_mask


def token_weights(ids, mask, task, modality, recipe: Recipe, task_names: list[str]) -> torch.Tensor:
    """Loss weight of every token: its template's mask x the recipe's weight for its modality."""
    table = torch.tensor([[getattr(recipe.tasks[n].loss, m) for m in MODALITY_KEYS] for n in task_names])
    return mask * table[task, modality]


def per_task_ce(logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """``[2 * n_tasks]``: (sum, count) of the unweighted next-token CE over each task's loss tokens.

    The task of a target is the template of the document the target token belongs to."""
    with torch.no_grad():
        V = logits.shape[-1]
        lb = labels[:, 1:].to(logits.device)
        tk = task[:, 1:].to(logits.device)
        valid = lb != -100
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), lb.clamp(min=0).reshape(-1), reduction="none").view_as(lb)
        out = torch.zeros(2 * n_tasks, dtype=torch.float64)
        for i in range(n_tasks):
            sel = valid & (tk == i)
            out[2 * i] = float(ce[sel].sum())
            out[2 * i + 1] = float(sel.sum())
    return out


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
    ext_dir = extensions_dir()
    if ext_dir is not None:
        # DeepSpeed JIT-builds a C++ op at init (CPU: shared-memory comm) into this folder
        os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def all_reduce_sum(x: torch.Tensor, world: int, device) -> torch.Tensor:
    """Sum a small tensor over ranks (on the engine's device, so NCCL works too); a copy on CPU."""
    if world <= 1:
        return x.clone()
    import torch.distributed as dist

    y = x.to(device)
    dist.all_reduce(y)
    return y.cpu()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def default_ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 0}}


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG state of this process, as JSON-able lists."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [py[0], list(py[1]), py[2]], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
          "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


# ----------------------------------------------------------------------------- checkpoints
TMP_PREFIX = "tmp-"  # a save in progress (or interrupted): never resumed from, removed by the next save
DONE_MARKER = "complete.json"  # written after every rank's files are on disk; rename + 'latest' follow


def _step_of(p: Path) -> int | None:
    name = p.name
    if name.startswith("step") and name[4:].isdigit():
        return int(name[4:])
    return None


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (``stepN`` with ``complete.json``), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = [(_step_of(p), p) for p in d.iterdir() if p.is_dir() and _step_of(p) is not None and (p / DONE_MARKER).is_file()]
    return sorted(out, key=lambda x: x[0])


def read_latest(ckpt_dir: str | Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(d: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``d`` (relative names), as ``complete.json`` records them."""
    return {str(f.relative_to(d)): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(d.rglob("*")) if f.is_file() and f.name != DONE_MARKER}


def check_checkpoint(p: Path) -> list[str]:
    """What is wrong with checkpoint folder ``p`` (empty list: it verifies): ``complete.json`` must
    be readable and every file it lists present with its recorded size and sha256. Checkpoints
    saved before sizes and hashes were recorded (a list of names) are checked for presence only."""
    marker = p / DONE_MARKER
    if not marker.is_file():
        return [f"no {DONE_MARKER} (its save was interrupted)"]
    try:
        info = json.loads(marker.read_text())
        files = info.get("files", [])  # older saves: a list of names, or nothing
        if not isinstance(files, (dict, list)):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return [f"'{marker}' is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for name in files:
        f = p / name
        rec = files[name] if isinstance(files, dict) else None
        if not f.is_file():
            problems.append(f"'{f}' is missing")
        elif rec is not None and f.stat().st_size != rec.get("size"):
            problems.append(f"'{f}' has {f.stat().st_size} bytes, {rec.get('size')} were saved (truncated or changed)")
        elif rec is not None and _sha256(f) != rec.get("sha256"):
            problems.append(f"'{f}' does not match its sha256 recorded at save (corrupted)")
    return problems


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path:
    """The complete, verified checkpoint folder that ``--resume`` means.

    ``latest``: the run's ``checkpoints/latest`` if it verifies (:func:`check_checkpoint`), else
    the newest one that does; each one skipped is printed with the reason. A checkpoints folder:
    the same rule inside it. A ``stepN`` folder: itself, if it verifies (else an error naming the file)."""
    if resume == "latest":
        base = Path(ckpt_dir)
    else:
        p = Path(resume)
        if not p.exists():
            raise FileNotFoundError(f"--resume '{p}': no such checkpoint")
        if _step_of(p) is not None or p.name.startswith(TMP_PREFIX):
            if not (p / DONE_MARKER).is_file():
                raise FileNotFoundError(f"--resume '{p}': checkpoint is incomplete (no {DONE_MARKER}: its save was interrupted)")
            problems = check_checkpoint(p)
            if problems:
                raise ConfigError(f"--resume '{p}': checkpoint does not verify: {'; '.join(problems)}")
            return p
        base = p
    done = complete_checkpoints(base)
    if not done:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint in '{base}'")
    tag = read_latest(base)
    order = [p for _, p in done if p.name == tag] + [p for _, p in reversed(done) if p.name != tag]
    skipped = []
    for p in order:
        problems = check_checkpoint(p)
        if not problems:
            return p
        skipped.append(f"{p.name}: {'; '.join(problems)}")
        _say(f"resume: skipping checkpoint '{p}': {'; '.join(problems)}")
    raise ConfigError(f"--resume {resume}: no checkpoint in '{base}' verifies ({' | '.join(skipped)})")


def checkpoint_zero_stage(p: Path) -> int | None:
    """The ZeRO stage a checkpoint was saved under (from its ``complete.json``), if recorded."""
    try:
        stage = json.loads((Path(p) / DONE_MARKER).read_text()).get("zero_stage")
    except (OSError, ValueError, AttributeError):
        return None
    return int(stage) if isinstance(stage, int) else None


def _fsync_tree(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(p: Path) -> None:
    """Delete a folder so that no half-deleted copy can look like a checkpoint: rename, then remove."""
    trash = p.with_name(f".deleting-{p.name}-{os.getpid()}")
    os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


def verify_checkpoint_files(d: Path, world: int, zero_stage: int) -> list[str]:
    """What is missing from a DeepSpeed save of ``world`` ranks (empty list: all there)."""
    problems = []
    names = {p.name for p in d.iterdir()} if d.is_dir() else set()
    if not any(n.endswith("model_states.pt") for n in names):
        problems.append("no *model_states.pt")
    if zero_stage >= 1:
        n_opt = sum(n.endswith("optim_states.pt") for n in names)
        if n_opt != world:
            problems.append(f"{n_opt} *optim_states.pt files for {world} ranks")
    for r in range(world):
        if f"rng_rank{r}.json" not in names:
            problems.append(f"no rng_rank{r}.json")
    return problems


def save_checkpoint(engine, ckpt_dir: Path, step: int, *, rank: int, world: int, zero_stage: int, keep: int) -> Path:
    """Save step ``step`` so that it only ever appears complete (see the module docstring)."""
    tmp = ckpt_dir / f"{TMP_PREFIX}step{step}"
    final = ckpt_dir / f"step{step}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            _remove_dir(tmp)
    barrier(world)
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"step": step}, save_latest=False)
    write_json(tmp / f"rng_rank{rank}.json", rng_state())
    barrier(world)
    problems: list[str] = []
    if rank == 0:
        problems = verify_checkpoint_files(tmp, world, zero_stage)
        if not problems:
            _fsync_tree(tmp)
            write_json(tmp / DONE_MARKER, {"step": step, "world_size": world, "zero_stage": zero_stage, "time": time.time(),
                                           "files": file_records(tmp)})
            if final.exists():  # a re-run of the same step (resumed from an older checkpoint)
                _remove_dir(final)
            os.replace(tmp, final)
            latest_tmp = ckpt_dir / ".latest.tmp"
            latest_tmp.write_text(final.name)
            os.replace(latest_tmp, ckpt_dir / "latest")
            rotate_checkpoints(ckpt_dir, keep)
    failed = all_reduce_sum(torch.tensor([1.0 if problems else 0.0]), world, engine.device)
    if failed.item():
        raise RuntimeError(f"checkpoint of step {step} in '{tmp}' is incomplete ({'; '.join(problems) or 'see rank 0'}); "
                           f"the previous checkpoint stays in 'latest'")
    return final


def rotate_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all) and the one ``latest`` names;
    remove interrupted saves (``tmp-*``) and leftovers of earlier removals. Call between saves."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    done = complete_checkpoints(ckpt_dir)
    if keep > 0:
        for _, p in done[:-keep]:
            if p.name != latest:
                _remove_dir(p)
    for p in list(ckpt_dir.iterdir()):
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            _remove_dir(p)
        elif p.is_dir() and p.name.startswith(".deleting-"):
            shutil.rmtree(p, ignore_errors=True)


def read_rng_file(path: Path) -> dict:
    """An ``rng_rank*.json`` of a checkpoint, checked; a corrupted one is a ValueError naming it."""
    try:
        st = json.loads(Path(path).read_text())
        py, npst, tst = st["python"], st["numpy"], st["torch"]
        if not (len(py) == 3 and len(npst) == 5 and isinstance(tst, list) and tst):
            raise ValueError("wrong shape")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"RNG state file '{path}' is corrupted ({type(e).__name__}: {e}); "
                         f"resume from another checkpoint (--resume .../stepN)") from None
    return st


def load_for_resume(engine, ckpt: Path, rank: int) -> int:
    """Load model, optimizer, scheduler and this rank's RNG state; return the step to continue from."""
    load_path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None or client is None or "step" not in client:
        raise FileNotFoundError(f"checkpoint '{ckpt}' could not be loaded by DeepSpeed (files missing or another ZeRO layout)")
    rng_file = ckpt / f"rng_rank{rank}.json"
    if rng_file.is_file():
        set_rng_state(read_rng_file(rng_file))
    else:
        print(f"warning: '{rng_file}' is missing (saved with fewer ranks?); RNG state of rank {rank} is not restored",
              file=sys.stderr, flush=True)
    return int(client["step"])


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


def _debug_nan_at() -> tuple[int, int] | None:
    v = os.environ.get("UWM_DEBUG_NAN_AT_STEP")
    if not v:
        return None
    step, _, r = v.partition(":")
    return int(step), int(r or 0)


# ----------------------------------------------------------------------------- the loop
def build_model(recipe: Recipe, processor):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    a = recipe.attention
    cfg = UnifiedWMConfig(
        **vars(recipe.model), **processor.model_layout(), video_grid=list(processor.grid), attn_backend=a.backend, moc_top_k=a.top_k,
        moc_n_sink=a.n_sink, moc_drop_off=a.drop_off, moc_drop_in=a.drop_in,
    )
    return UnifiedWMForCausalLM(cfg)


def enable_checkpointing(model) -> None:
    """``model.gradient_checkpointing_enable()`` (non-reentrant), under transformers' newer
    name where it has one (the old name is a deprecated alias there)."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        fn({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lr_lambda(recipe: Recipe):
    t = recipe.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / max(1, t.warmup_steps)
        prog = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def read_ds_config(ds_config_path: str | None) -> tuple[dict, str]:
    if not ds_config_path:
        return default_ds_config(), "<default ZeRO-0 config>"
    p = Path(ds_config_path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config '{p}' does not exist")
    try:
        return json.loads(p.read_text()), str(p)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None


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


def prepare_batch(batches: PackedBatches, micro_step: int, config, recipe: Recipe, task_names: list[str]):
    from unified_wm.model.modeling_uwm import stream_layout

    ids, mask, task, _ = batches.batch(micro_step)
    _, modality = stream_layout(ids, config)
    weights = token_weights(ids, mask, task, modality, recipe, task_names)
    labels = torch.where(weights > 0, ids, torch.full_like(ids, -100))
    return ids, labels, weights, task


def evaluate(engine, val: PackedBatches, recipe: Recipe, task_names: list[str], world: int) -> dict:
    """Validation loss (total, per modality, per task) over ``eval_batches`` micro-batches per rank."""
    acc = _Step(len(task_names))
    engine.eval()
    with torch.no_grad():
        for i in range(recipe.train.eval_batches):
            ids, labels, weights, task = prepare_batch(val, i, engine.module.config, recipe, task_names)
            out = engine(input_ids=ids.to(engine.device), labels=labels.to(engine.device), loss_weights=weights.to(engine.device))
            acc.add(out.loss.item(), out.modality_losses)
            acc.tasks += per_task_ce(out.logits, labels, task, len(task_names))
    engine.train()
    acc.reduce(world, engine.device, with_tasks=True)
    return acc.record("val_", task_names)


def train(recipe_path: str, ds_config_path: str | None = None, *, resume: str | None = None,
          overrides: dict | None = None, progress: bool = True) -> dict:
    import deepspeed
    from tqdm import tqdm

    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.model.modeling_uwm import summarize_routing
    from unified_wm.tokenization.processor import UnifiedProcessor

    recipe = load_recipe(recipe_path, overrides)
    check_recipe_inputs(recipe, recipe_path)
    ds_raw, ds_source = read_ds_config(ds_config_path)
    t = recipe.train
    pre = fill_ds_config(ds_raw, recipe, int(os.environ.get("WORLD_SIZE", "1")), ds_source)  # bad input: fail before init
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = resolve_resume(resume, ckpt_dir) if resume else None  # fail before init too
    if resume_from is not None:
        saved_stage, stage = checkpoint_zero_stage(resume_from), int(pre["zero_optimization"].get("stage", 0))
        if saved_stage is not None and saved_stage != stage:
            raise ConfigError(f"--resume: checkpoint '{resume_from}' was saved under ZeRO stage {saved_stage}, but this run's "
                              f"DeepSpeed config '{ds_source}' uses ZeRO stage {stage}; resume with a stage-{saved_stage} "
                              f"config (or export the checkpoint and start a new run)")
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    rank, world = setup_distributed()
    ds_cfg = fill_ds_config(ds_raw, recipe, world, ds_source)
    zero_stage = int(ds_cfg["zero_optimization"].get("stage", 0))

    processor = UnifiedProcessor.from_pretrained(recipe.data.processor)
    torch.manual_seed(t.seed)  # same initial weights on every rank
    model = build_model(recipe, processor)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed * 7919 + 1 + rank)  # per-rank stream for the MoC regularisers
    docs = load_token_documents(recipe.data.tokens)
    task_names = list(recipe.tasks)
    batches = PackedBatches(docs, recipe, rank, world)
    val = None
    if recipe.data.val_tokens and t.eval_every:
        val = PackedBatches(load_token_documents(recipe.data.val_tokens), recipe, rank, world, source=recipe.data.val_tokens)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)

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
            json.dump({"recipe_file": str(recipe_path), "overrides": overrides or {}, "deepspeed": ds_cfg}, f, indent=2, default=str)
        n_params = sum(p.numel() for p in model.parameters())
        if zero_stage == 3:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters, attention={recipe.attention.backend}, world size {world}, "
              f"{len(docs)} documents, seq_len {t.seq_len}, ZeRO stage {zero_stage}", flush=True)
    nan_at = _debug_nan_at()
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
            log_step = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps or step == start_step
            for micro in range(t.grad_accum):
                ids, labels, weights, task = prepare_batch(batches, step * t.grad_accum + micro, engine.module.config, recipe, task_names)
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
                    acc.tasks += per_task_ce(out_.logits, labels, task, len(task_names))
                engine.backward(loss)
                if log_step and zero_stage == 0 and micro == t.grad_accum - 1:
                    # DeepSpeed only tracks the global grad norm under ZeRO; without it, measure it here
                    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                    plain_grad_norm = float(torch.stack(grads).norm()) if grads else None
                engine.step()
                acc.add(loss.item(), out_.modality_losses)
                tokens_since += int((ids != 0).sum())
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
            if val is not None and step % t.eval_every == 0:
                last.update(evaluate(engine, val, recipe, task_names, world))
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
                saved = save_checkpoint(engine, ckpt_dir, step, rank=rank, world=world, zero_stage=zero_stage, keep=t.keep_checkpoints)
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
    import yaml

    from unified_wm.utils import load_yaml

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
