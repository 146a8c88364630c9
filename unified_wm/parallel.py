"""Long sequences in training: DeepSpeed-Ulysses sequence parallelism and tiled compute.

``train.sequence_parallel: P`` splits every micro-batch's sequence across P ranks (data
parallelism runs over the remaining ``world / P``). DeepSpeed's pieces do the work:

* process groups: ``deepspeed.runtime.sequence_parallel.parallel_state_sp`` (passed to
  ``deepspeed.initialize`` as ``mpu``), so ZeRO 0-3 reduce gradients over the sequence-data
  group and average over the data-parallel ranks only (each sequence shard contributes its
  part of one micro-batch's gradient);
* attention: ``deepspeed.sequence.layer.DistributedAttention`` around our ``attend()``: an
  all-to-all turns [B, N/P, H, D] into [B, N, H/P, D] (the whole sequence for H/P heads),
  attention runs, a second all-to-all gives the sequence split back. Mixture of Contexts
  routes each head on its own, so every rank routes its heads over the full sequence and the
  result equals the unsplit model's;
* tiling: ``TiledMLP`` and ``sequence_tiled_compute`` from
  ``deepspeed.runtime.sequence_parallel.ulysses_sp`` compute the MLP and the logits + loss
  in tiles of ``train.tile_tokens`` tokens, recomputing each tile in the backward.

The stream's layout travels with the split: every rank of a sequence group reads the same
full row of ids (a few bytes per token) and derives the layout of the whole row
(:func:`stream_layout_continue`: chunk and document ids, positions, text flags, the rotary
coordinates of ``rope_mode: 3d``), then embeds only its own slice. Queries are rotated at the
coordinates of their own slice, keys likewise, before the all-to-all; after it, attention
sees the layout of the whole row. So routing on each rank is routing on the unsplit row.

The loss: targets are shifted on the full row (position i predicts token i+1, also across a
shard boundary), each rank computes the weighted CE of its slice divided by the weight of the
WHOLE row, so the shards' losses sum to the unsplit loss and their gradients sum to its
gradient. The returned ``loss`` carries that share's gradient but the value of the whole
row's loss (the other shards' part enters detached), so logging, the finite check and the
per-modality means read exactly what a single rank would. Per-task (sum, count) pairs are
kept per shard and summed over every rank by the training loop.
"""
from __future__ import annotations

import functools

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unified_wm.model.modeling_uwm import MODALITIES, UnifiedWMForCausalLM, UnifiedWMOutput, rope_pair, stream_layout_continue


# ----------------------------------------------------------------------------- checks
def check_sequence_parallel(sp: int, *, seq_len: int, heads: int, kv_heads: int, world: int | None = None) -> None:
    """Refuse a sequence-parallel degree that cannot work; every rank runs this on the same
    inputs (the recipe and the launcher's WORLD_SIZE) before any collective, so all of them
    fail the same way and none is left waiting. ``world`` None: not known yet (recipe load).
    Raises ValueError naming the setting (the caller adds the recipe's file name)."""
    key = "'train.sequence_parallel'"
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ValueError(f"{key} must be a positive integer (1: off), got {sp!r}")
    if sp == 1:
        return
    if seq_len % sp:
        raise ValueError(f"'train.seq_len' = {seq_len} is not divisible by {key} = {sp}; "
                          f"each rank holds seq_len / {sp} tokens (e.g. seq_len {seq_len - seq_len % sp or sp})")
    if heads % sp:
        raise ValueError(f"'model.num_attention_heads' = {heads} is not divisible by {key} = {sp}; "
                          f"each rank attends with num_attention_heads / {sp} heads")
    if kv_heads % sp:
        raise ValueError(f"'model.num_key_value_heads' = {kv_heads} is not divisible by {key} = {sp}; "
                          f"each rank holds num_key_value_heads / {sp} key/value heads")
    if world is not None and world % sp:
        raise ValueError(f"{key} = {sp} does not divide the world size {world} (ranks launched); "
                          f"launch a multiple of {sp} ranks, e.g. deepspeed --num_gpus {sp} ...")


# ----------------------------------------------------------------------------- groups
@dataclass
class SequenceParallel:
    """This rank's place: ``size`` ranks share a sequence (``rank`` holds slice ``rank``);
    ``dp_rank`` / ``dp_world`` index the data-parallel copies (each reads its own rows)."""

    size: int = 1
    rank: int = 0
    group: object = None
    dp_rank: int = 0
    dp_world: int = 1

    def bounds(self, n: int) -> tuple[int, int]:
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size <= 1:
            return x
        import deepspeed.comm as dist

        dist.all_reduce(x, group=self.group)
        return x


def init_sequence_parallel(sp: int, rank: int, world: int):
    """After ``deepspeed.init_distributed``: DeepSpeed's sequence-parallel groups (consecutive
    ranks share a sequence). Returns (SequenceParallel, mpu for ``deepspeed.initialize`` or None)."""
    if sp <= 1:
        return SequenceParallel(1, 0, None, rank, world), None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(sp)
    return SequenceParallel(sp, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group(), rank // sp, world // sp), mpu


# ----------------------------------------------------------------------------- attention
class _LocalAttend(nn.Module):
    """``attend()`` in DeepSpeed's [B, N, H, D] layout (the whole sequence, this rank's heads)."""

    def forward(self, q, k, v, q_meta, k_meta, settings, training, stats):
        from unified_wm.model.attention import attend

        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q_meta, k_meta, settings,
                   training=training, stats=stats)
        return y.transpose(1, 2)


class UlyssesAttend:
    """Sequence-parallel attention for one layer: DeepSpeed's ``DistributedAttention`` around
    ``attend()``. q/k/v come as this rank's slice [B, H, N/P, D]; the result likewise."""

    def __init__(self, group, num_kv_heads: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.attn = DistributedAttention(_LocalAttend(), group, scatter_idx=2, gather_idx=1, num_kv_heads=num_kv_heads)

    def __call__(self, q, k, v, q_meta, k_meta, settings, training, stats):
        y = self.attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None,
                      q_meta, k_meta, settings, training, stats)
        return y.transpose(1, 2)


# ----------------------------------------------------------------------------- tiled MLP
def tiled_mlp_forward(mlp: nn.Module, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """``mlp(x)`` through DeepSpeed's ``TiledMLP``: tiles of ``tile_tokens`` tokens, each
    recomputed in the backward, so the [B, N, intermediate] activations are never all alive."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = max(1, math.ceil(x.shape[-2] / tile_tokens))
    if shards == 1 or not torch.is_grad_enabled():
        return mlp.plain_forward(x)
    params = [p for p in mlp.parameters()]
    return TiledMLP.apply(lambda self, h: self.plain_forward(h), mlp, x, shards, params)


# ----------------------------------------------------------------------------- the long forward
@dataclass
class LongSequence:
    """What the model's training forward does differently (attached as ``model.uwm_long``)."""

    sp: SequenceParallel
    tiled_loss: bool = False
    tile_tokens: int = 1024
    grad_scale: float = 1.0  # see zero_grad_scale

    def forward(self, model, input_ids, labels=None, loss_weights=None, return_routing_stats=False):
        """The model's training forward under sequence parallelism and/or tiling (:func:`long_forward`)."""
        return long_forward(model, input_ids, labels, loss_weights, return_routing_stats)


def zero_grad_scale(sp: SequenceParallel, ds_cfg: dict) -> float:
    """What each shard's gradient must be multiplied by so that DeepSpeed's reduction yields
    the sum over the sequence group averaged over the data-parallel ranks. ZeRO 0-2 divide the
    all-reduced gradient by ``world / P`` (they account for sequence parallelism): 1. ZeRO-3's
    reduce-scatter (``zero_optimization.reduce_scatter``, its default) divides by the whole
    ``world``: P. (ZeRO-3 without reduce-scatter picks per bucket between both, so
    :func:`check_zero_config` refuses it.)"""
    zero = ds_cfg.get("zero_optimization", {})
    return float(sp.size) if sp.size > 1 and int(zero.get("stage", 0)) == 3 else 1.0


def check_zero_config(sp_size: int, ds_cfg: dict, source: str, tiled_loss: bool = False) -> None:
    """Refuse ZeRO settings whose gradient averaging ignores the sequence group, and the tiled
    loss under ZeRO-3 (ValueError)."""
    zero = ds_cfg.get("zero_optimization", {})
    if tiled_loss and int(zero.get("stage", 0)) == 3:
        raise ValueError(f"{source}: 'train.tiled_loss' needs ZeRO stage 0-2 (this config uses stage 3, whose partitioned "
                         f"LM head weight the tiles cannot read); use a stage-2 config or set train.tiled_loss: false")
    if sp_size > 1 and int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True) is False:
        raise ValueError(f"{source}: 'zero_optimization.reduce_scatter' is false under ZeRO stage 3 with "
                         f"'train.sequence_parallel' = {sp_size}; DeepSpeed then averages some gradient buckets over "
                         f"the sequence group and others not: remove the key (default true)")


def enable(model, sp: SequenceParallel, *, tiled_mlp: bool = False, tiled_loss: bool = False, tile_tokens: int = 1024,
           grad_scale: float = 1.0) -> None:
    """Attach sequence parallelism and/or tiling to ``model`` (an ``UnifiedWMForCausalLM``).
    Nothing is registered as a module or parameter: state dicts and checkpoints are unchanged."""
    if sp.size <= 1 and not tiled_mlp and not tiled_loss:
        return
    model.__dict__["uwm_long"] = LongSequence(sp, tiled_loss, tile_tokens, grad_scale)
    for block in model.layers:
        if sp.size > 1:
            block.self_attn.__dict__["ulysses"] = UlyssesAttend(sp.group, model.config.num_key_value_heads)
        if tiled_mlp:
            block.mlp.__dict__["tiled_forward"] = functools.partial(tiled_mlp_forward, tile_tokens=tile_tokens)


def shift_targets(x: torch.Tensor, fill) -> torch.Tensor:
    """``x[:, 1:]`` with ``fill`` appended: the target of every position (position i predicts i+1)."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def _reduce_stats(stats: dict, sp: SequenceParallel) -> None:
    """Routing statistics are counted over this rank's heads; sum them over the sequence group."""
    for st in stats.values():
        keys = sorted(k for k in st if k not in ("moc_sparsity", "moc_selection_entropy"))
        if not keys:
            continue
        v = sp.all_reduce(torch.tensor([st[k] for k in keys], dtype=torch.float64))
        for k, x in zip(keys, v.tolist()):
            st[k] = x if k != "moc_calls" else x / sp.size
        st["moc_sparsity"] = 1.0 - st["moc_routed_pairs"] / max(st["moc_causal_pairs"], 1.0)
        st["moc_selection_entropy"] = st["moc_entropy_sum"] / max(st["moc_entropy_n"], 1.0)


def long_forward(model, input_ids, labels=None, loss_weights=None, return_routing_stats=False):
    """The training forward under :class:`LongSequence` (see the module docstring).

    ``input_ids`` / ``labels`` / ``loss_weights`` are the FULL rows (the same on every rank of
    a sequence group). Returns a ``UnifiedWMOutput`` whose ``logits`` (None with the tiled
    loss) and ``token_ce`` ([B, N/P]: CE of the token each position predicts) are this rank's
    slice."""
    long: LongSequence = model.__dict__["uwm_long"]
    sp, cfg = long.sp, model.config
    B, N = input_ids.shape
    if N % sp.size:
        raise ValueError(f"sequence length {N} is not divisible by the sequence-parallel degree {sp.size}")
    lo, hi = sp.bounds(N)
    meta, modality, _, (q_coords, k_coords, prev) = stream_layout_continue(input_ids, cfg, None)
    x = model.embed(input_ids, prev[:, lo:hi], lo, hi)
    rope = rope_pair(q_coords[:, lo:hi], k_coords[:, lo:hi], cfg, x.dtype)
    stats: dict | None = {} if return_routing_stats else None
    x = model.run_layers(x, rope, meta, meta, None, stats)
    if stats is not None and sp.size > 1:
        _reduce_stats(stats, sp)

    logits = None
    if labels is None or not long.tiled_loss:
        logits = model.lm_head(x).float()
    if labels is None:
        return UnifiedWMOutput(logits=logits, routing_stats=stats)

    tgt_full = shift_targets(labels, -100)
    w_full = (tgt_full != -100).float()
    if loss_weights is not None:
        w_full = w_full * shift_targets(loss_weights.float(), 0.0)
    denom = w_full.sum().clamp(min=1e-8)  # the weight of the whole row: the same on every shard
    tgt, w = tgt_full[:, lo:hi], w_full[:, lo:hi] / denom
    if long.tiled_loss:
        loss, token_ce = _tiled_loss(model, x, tgt, w, long.tile_tokens)
    else:
        token_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.clamp(min=0).reshape(-1),
                                   reduction="none").view_as(tgt)
        loss = (token_ce * w).sum()
        token_ce = token_ce.detach()
    # per modality of the target: (sum, count) over the whole row
    valid = tgt != -100
    tmod = shift_targets(modality, 0)[:, lo:hi]
    sums = UnifiedWMForCausalLM.ce_sums(token_ce, tmod, valid, len(MODALITIES))
    acc = torch.tensor([x for pair in sums for x in pair] + [loss.item()], dtype=torch.float64, device=x.device)
    acc = sp.all_reduce(acc)
    mod_losses = {name: (acc[2 * i] / acc[2 * i + 1]).float() for i, name in enumerate(MODALITIES) if acc[2 * i + 1] > 0}
    total = acc[-1].to(loss.dtype)
    # the value of the whole row's loss; the gradient of this shard's part (times grad_scale)
    if long.grad_scale != 1.0:
        loss = loss * long.grad_scale
    loss = loss + (total - loss.detach())
    return UnifiedWMOutput(loss=loss, logits=logits, modality_losses=mod_losses, routing_stats=stats, token_ce=token_ce)


class _HeadGradBridge(torch.autograd.Function):
    """Identity on the hidden states ``x``; its backward runs after the tiled loss's backward
    (which accumulated the LM head's gradient into a detached copy of the weight) and hands that
    gradient to the real weight through the ordinary autograd graph. The LM head is tied to the
    token embedding: letting the tiles' own backward calls write into the shared weight would
    give ZeRO two gradients of one parameter in one step ("already reduced")."""

    @staticmethod
    def forward(ctx, x, weight, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        holder = ctx.box[0]
        gw, holder.grad = holder.grad, None
        return g, gw, None


def _tiled_loss(model, x, tgt, w, tile_tokens):
    """sum(CE * w) over this slice through DeepSpeed's ``sequence_tiled_compute``: the logits
    of one tile of ``tile_tokens`` positions at a time, recomputed in the backward. Also the
    detached per-position CE (kept from the forward pass, [B, n])."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

    n = x.shape[1]
    shards = max(1, math.ceil(n / tile_tokens))
    kept: list[torch.Tensor] = []
    weight = model.lm_head.weight
    holder = weight.detach().requires_grad_(weight.requires_grad)
    if torch.is_grad_enabled() and weight.requires_grad:
        x = _HeadGradBridge.apply(x, weight, [holder])

    def fn(x, tgt, w):
        logits = F.linear(x, holder).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.clamp(min=0).reshape(-1), reduction="none").view_as(tgt)
        if not torch.is_grad_enabled():  # the forward pass (the backward recomputes with grad on)
            kept.append(ce.detach())
        return (ce * w).sum()

    loss = sequence_tiled_compute(fn, n, shards, {"x": x, "tgt": tgt, "w": w}, {}, "x",
                                  compute_params=[], output_unshard_dimension=0, output_reduction="sum")
    return loss, torch.cat(kept, dim=1)


def per_task_ce(out, labels: torch.Tensor, task: torch.Tensor, n_tasks: int, sp: SequenceParallel) -> torch.Tensor:
    """``[2 * n_tasks]`` (sum, count) of the unweighted CE over this rank's slice of targets
    (``train.per_task_ce`` for the long forward; the loop sums the pairs over every rank)."""
    lo, hi = sp.bounds(labels.shape[1])
    tgt = shift_targets(labels, -100)[:, lo:hi].to(out.token_ce.device)
    tk = shift_targets(task, 0)[:, lo:hi].to(out.token_ce.device)
    sums = UnifiedWMForCausalLM.ce_sums(out.token_ce, tk, tgt != -100, n_tasks)
    return torch.tensor([x for pair in sums for x in pair], dtype=torch.float64)
