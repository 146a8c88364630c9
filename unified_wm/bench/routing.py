"""Benchmark: how many tiles a trained model's Mixture-of-Contexts routing makes a block-sparse
kernel visit (``uwm bench routing``).

Routing is per query: each query picks its own ``top_k`` chunks. A tiled kernel (the ``triton``
backend, 64 x 64 tiles) runs a tile when ANY of its 64 queries needs one of its keys, so what it
pays for is the union of the selections over each block of queries, not the token pairs kept.
For every layer of an exported model, on token documents (``uwm data tokenize``), this reports:

* ``pairs kept``: 1 - the token-pair sparsity of the routed mask (what the routing keeps);
* ``tiles (model)``: the share of causal tiles the Triton plan visits for the model's own
  queries and keys (``--query-blocks``: also with fewer queries a tile, e.g. 16 or 32 instead of
  the kernel's 64, which shrinks the unions at some cost in the matrix units' efficiency);
* ``tiles (random q)`` and ``tiles (coherent q)``: the same keys and layout with random queries
  (each query routes on its own: the worst case) and with queries shared by each block of 64 plus
  10 % noise (the best case), as ``uwm bench gpu`` times them.

Where the model sits between the two says how much of the token sparsity a tiled GPU kernel can
turn into speed. CPU only, no timing; the plan is the Triton backend's own (torch code).

  uwm bench routing --model runs/demo/hf --tokens runs/demo/tokens_val --out bench_routing.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TILE = 64


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="uwm bench routing", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported model folder (uwm export)")
    ap.add_argument("--tokens", required=True, help="token documents (uwm data tokenize)")
    ap.add_argument("--documents", type=int, default=16, help="documents to run, one per forward")
    ap.add_argument("--template", default="interleaved", help="the documents' template to use")
    ap.add_argument("--query-blocks", default="", help="comma-separated query tile heights besides 64 for the model's "
                    "queries (e.g. 16,32); keys stay in tiles of 64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_routing.json")
    a = ap.parse_args(argv)
    if a.documents < 1:
        ap.error(f"--documents must be at least 1, got {a.documents}")
    try:
        a.query_blocks = [int(x) for x in a.query_blocks.split(",") if x]
    except ValueError:
        ap.error(f"--query-blocks must be comma-separated integers, got '{a.query_blocks}'")
    if any(b < 1 for b in a.query_blocks):
        ap.error(f"--query-blocks must be positive, got {a.query_blocks}")
    return a


def tile_share(q, k, q_meta, k_meta, settings, bm: int | None = None, bn: int | None = None) -> tuple[float, float]:
    """(pairs kept, share of the causal (query tile, key tile) area the Triton plan visits) of
    one attention call, with query tiles of ``bm`` rows and key tiles of ``bn`` (default: the
    kernel's): the visited tiles weighted by their rows, over the causal ones."""
    from unified_wm.model.attention_routing import plan_routing
    from unified_wm.model.attention_triton import plan

    stats: dict = {}
    with torch.no_grad():
        r = plan_routing(q, k, q_meta, k_meta, settings, False, stats)
        p = plan(q, k, q_meta, k_meta, r, bm, bn)
    B, Hq, Nq = q.shape[:3]
    nqb = (Nq + p.bm - 1) // p.bm
    causal = sum((i * p.bm + p.bm - 1) // p.bn + 1 for i in range(nqb))  # key tiles up to each query tile's last row
    return 1.0 - stats["moc_sparsity"], float(p.qcnt.double().sum() / (B * Hq * causal))


def sample_queries(shape, kind: str, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 queries ``[B, H, N, D]``: ``random`` (each its own), or ``coherent`` (one direction
    shared by each block of 64 positions, plus 10 % noise)."""
    noise = torch.randn(shape, device=device, generator=generator)
    if kind == "random":
        return noise
    B, H, N, D = shape
    nb = (N + TILE - 1) // TILE
    base = torch.randn(B, H, nb, D, device=device, generator=generator).repeat_interleave(TILE, dim=2)[:, :, :N]
    return base + 0.1 * noise


def measure(model, docs: list[list[int]], query_blocks: tuple[int, ...] = ()) -> list[dict]:
    """Per layer: mean pairs kept and tile shares over ``docs`` (one forward each)."""
    import unified_wm.model.modeling_uwm as M

    captured: list = []
    orig = M.attend

    def spy(q, k, v, q_meta, k_meta, settings, **kw):
        captured.append((q.detach(), k.detach(), q_meta, k_meta, settings))
        return orig(q, k, v, q_meta, k_meta, settings, **kw)

    g = torch.Generator().manual_seed(0)
    sums: dict[int, dict[str, float]] = {}
    M.attend = spy
    try:
        for ids in docs:
            captured.clear()
            with torch.no_grad():
                model(torch.tensor([ids]))
            for layer, (q, k, q_meta, k_meta, s) in enumerate(captured):
                kept, tiles = tile_share(q, k, q_meta, k_meta, s, TILE, TILE)
                row = sums.setdefault(layer, {"pairs_kept": 0.0, "tiles_model": 0.0, "tiles_random_q": 0.0,
                                              "tiles_coherent_q": 0.0, "tokens": 0.0})
                row["pairs_kept"] += kept
                row["tiles_model"] += tiles
                scale = q.float().pow(2).mean(dim=(-1, -2), keepdim=True).sqrt()  # the model's per-head size
                for kind in ("random", "coherent"):
                    other = (sample_queries(q.shape, kind, generator=g) * scale).to(q.dtype)
                    row[f"tiles_{kind}_q"] += tile_share(other, k, q_meta, k_meta, s, TILE, TILE)[1]
                for bm in query_blocks:
                    row[f"tiles_model_{bm}x{TILE}"] = row.get(f"tiles_model_{bm}x{TILE}", 0.0) + tile_share(
                        q, k, q_meta, k_meta, s, bm, TILE)[1]
                row["tokens"] += len(ids)
    finally:
        M.attend = orig
    n = len(docs)
    return [{"layer": layer, **{key: v / n for key, v in row.items()}} for layer, row in sorted(sums.items())]


def main(argv: list[str] | None = None) -> int:
    import datasets

    from unified_wm.rollout import WorldModel

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    wm = WorldModel.from_pretrained(a.model)
    settings = wm.model.config.attention_settings()
    if settings.backend == "dense":
        raise ValueError(f"model '{a.model}' uses dense attention (attention.backend: dense): there is no routing to measure")
    tok_dir = Path(a.tokens)
    if not (tok_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(f"--tokens '{tok_dir}' is not a token dataset folder (expected the output of `uwm data tokenize`)")
    ds = datasets.load_from_disk(str(tok_dir))
    docs = [list(map(int, r["input_ids"])) for r in ds if r["template"] == a.template][: a.documents]
    if not docs:
        templates = sorted(set(ds["template"]))
        raise ValueError(f"--tokens '{tok_dir}' has no '{a.template}' documents (it has: {', '.join(templates)})")
    rows = measure(wm.model, docs, tuple(a.query_blocks))
    out = {"model": a.model, "tokens": a.tokens, "documents": len(docs), "template": a.template,
           "top_k": settings.top_k, "tile": TILE, "layers": rows}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"{len(docs)} '{a.template}' documents of {a.tokens} (mean {rows[0]['tokens']:.0f} tokens), top_k {settings.top_k}, "
          f"{TILE} x {TILE} tiles")
    extra = [f"tiles_model_{bm}x{TILE}" for bm in a.query_blocks]
    print(f"{'layer':>5} {'pairs kept':>10} {'tiles (model)':>13} {'tiles (random q)':>16} {'tiles (coherent q)':>18}"
          + "".join(f" {f'model {bm}x{TILE}':>13}" for bm in a.query_blocks))
    for r in rows:
        print(f"{r['layer']:>5} {r['pairs_kept']:10.3f} {r['tiles_model']:13.3f} {r['tiles_random_q']:16.3f} {r['tiles_coherent_q']:18.3f}"
              + "".join(f" {r[e]:13.3f}" for e in extra))
    print(f"wrote {a.out}")
    return 0
