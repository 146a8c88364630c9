"""Training recipes (``recipes/*.yaml``): the dataclasses a recipe maps onto, validated at load
time; the DeepSpeed config filled from a recipe; the learning-rate schedule; and ``build_model``,
which turns a recipe's ``model:`` and ``attention:`` sections into a ``UnifiedWMForCausalLM``."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unified_wm.model.attention import CONFIG_KEYS, AttentionSettings
from unified_wm.sequence import TEMPLATES, TaskWeights
from unified_wm.utils import ConfigError, load_config, warmup_cosine_lr


# The recipe's `model:` section: its defaults are those of UnifiedWMConfig (tests/test_config.py
# checks that they agree); build_model maps it and `attention:` onto the config.
@dataclass
class ModelRecipe:
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_mode: str = "1d"  # "3d": rotary pairs split over document position, frame, row and column
    attention_bias: bool = False  # biases on the query, key and value projections
    prev_frame_input: str = "none"  # cell | cross | square: the previous frame's codes around the predicted cell as input


# The recipe's `attention:` section: AttentionSettings' fields that a model's config.json carries
# (CONFIG_KEYS), with the same defaults; AttentionSettings' docstring says what each does.
AttentionRecipe = dataclasses.make_dataclass(
    "AttentionRecipe",
    [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(AttentionSettings) if f.name in CONFIG_KEYS],
)
AttentionRecipe.__module__ = __name__  # its type names resolve here (typing.get_type_hints)


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
    # a document longer than train.seq_len: refuse (training does not start), split (at segment
    # boundaries) or truncate (cut at seq_len); unified_wm/data/long_documents.py
    long_documents: str = "refuse"


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
    # scheduled sampling (train.scheduled_sampling in unified_wm.train): the share of generated
    # video codes (loss targets after the first frame) whose input is replaced by the model's own
    # greedy guess from a forward without gradients (~1/3 more compute a step), so training sees
    # the mistakes a rollout conditions on; reached linearly over the first
    # scheduled_sampling_ramp steps (0: from the first step); scheduled_sampling_passes > 1
    # guesses again from the mixed inputs that many times (one more forward each), so a fed-back
    # code holds mistakes several frames deep, as in a rollout
    scheduled_sampling: float = 0.0
    scheduled_sampling_ramp: int = 0
    scheduled_sampling_passes: int = 1
    # the loss of a video code that differs from the code at its cell one frame back (same
    # document) weighs 1 + changed_code_weight: the codes that move weigh more than those a copy
    # of the last frame gets right (0: off)
    changed_code_weight: float = 0.0
    # activation checkpointing: keep only each Block's input, recompute the Block in the
    # backward (less memory at long seq_len for ~1/3 more compute; same gradients)
    gradient_checkpointing: bool = False
    # long sequences (unified_wm.parallel): split each micro-batch's sequence across this many
    # ranks (DeepSpeed-Ulysses; data parallelism over world / sequence_parallel), and compute
    # the MLP / the logits + loss in tiles of tile_tokens tokens (same gradients, flat memory)
    sequence_parallel: int = 1
    tiled_mlp: bool = False
    tiled_loss: bool = False
    tile_tokens: int = 1024


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
        from unified_wm.data.long_documents import MODES

        if self.data.long_documents not in MODES:
            raise ValueError(f"'data.long_documents' must be one of {', '.join(MODES)}, got '{self.data.long_documents}'")
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
        if not 0.0 <= t.scheduled_sampling <= 1.0:
            raise ValueError(f"'train.scheduled_sampling' must be in [0, 1] (the share of generated video codes replaced "
                             f"by the model's guess), got {t.scheduled_sampling}")
        if t.scheduled_sampling_passes < 1:
            raise ValueError(f"'train.scheduled_sampling_passes' must be >= 1 (forwards that guess the fed-back codes), "
                             f"got {t.scheduled_sampling_passes}")
        if t.changed_code_weight < 0:
            raise ValueError(f"'train.changed_code_weight' must be >= 0 (the extra loss weight of a video code that "
                             f"differs from its cell one frame back), got {t.changed_code_weight}")
        if t.scheduled_sampling_ramp < 0:
            raise ValueError(f"'train.scheduled_sampling_ramp' must be >= 0, got {t.scheduled_sampling_ramp}")
        if t.scheduled_sampling and t.sequence_parallel > 1:
            raise ValueError("'train.scheduled_sampling' needs the whole sequence's logits on one rank; it cannot be combined "
                             f"with 'train.sequence_parallel' = {t.sequence_parallel}")
        if len(t.betas) != 2:
            raise ValueError(f"'train.betas' must hold two numbers, got {t.betas}")
        if t.eval_every and not self.data.val_tokens:
            raise ValueError("'train.eval_every' is set but 'data.val_tokens' is empty (no held-out token documents)")
        try:  # an unknown or unavailable backend is refused here, before any process starts
            AttentionSettings(**dataclasses.asdict(self.attention)).validate()
        except ValueError as e:
            raise ValueError(f"'attention': {e}") from None
        if t.tile_tokens <= 0:
            raise ValueError(f"'train.tile_tokens' must be positive, got {t.tile_tokens}")
        from unified_wm.parallel import check_sequence_parallel

        check_sequence_parallel(t.sequence_parallel, seq_len=t.seq_len, heads=self.model.num_attention_heads,
                                kv_heads=self.model.num_key_value_heads)
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


def default_ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 0}}


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


# ----------------------------------------------------------------------------- model and schedule
def build_model(recipe: Recipe, processor):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    # the recipe's `model:` section maps onto the config's fields by name, its `attention:` section
    # onto the config's `attention` dict by name
    cfg = UnifiedWMConfig(
        **vars(recipe.model), **processor.model_layout(), video_grid=list(processor.grid),
        attention=dataclasses.asdict(recipe.attention),
    )
    return UnifiedWMForCausalLM(cfg)


def lr_lambda(recipe: Recipe):
    """The learning-rate multiplier of each optimizer step: linear warm-up, then cosine decay to
    ``train.min_lr_ratio`` (``torch.optim.lr_scheduler.LambdaLR``)."""
    t = recipe.train
    return functools.partial(warmup_cosine_lr, base_lr=1.0, warmup_steps=t.warmup_steps, total_steps=t.max_steps,
                             min_lr_ratio=t.min_lr_ratio)
