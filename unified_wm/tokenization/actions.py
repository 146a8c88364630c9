"""Action tokens: named discrete action sets and binned continuous actions.

Discrete sets have names a user types in a prompt ("left", "fire", "stay"). Continuous
action vectors are quantised per dimension into bins (uniform or mu-law) with an inverse.
The processor places every known action name once in the shared id space.
"""
from __future__ import annotations

import numpy as np

# Built-in discrete action sets. Atari's full set (18) uses the names gymnasium reports,
# lower-cased; a game's reduced set is a subset of it.
ACTION_SETS: dict[str, list[str]] = {
    "pan5": ["stay", "left", "right", "up", "down"],
    "atari18": [
        "noop", "fire", "up", "right", "left", "down", "upright", "upleft", "downright", "downleft",
        "upfire", "rightfire", "leftfire", "downfire", "uprightfire", "upleftfire", "downrightfire", "downleftfire",
    ],
}

# Synonyms a user may type; they map to a canonical name of some set.
ALIASES = {"none": "stay", "idle": "stay", "wait": "stay"}


def action_vocabulary(sets: list[str]) -> list[str]:
    """Union of the named sets' action names, in a stable order, each name once."""
    names: list[str] = []
    for s in sets:
        if s not in ACTION_SETS:
            raise ValueError(f"unknown action set '{s}'; known sets: {sorted(ACTION_SETS)}")
        for a in ACTION_SETS[s]:
            if a not in names:
                names.append(a)
    return names


def parse_actions(text: str | list[str], vocabulary: list[str]) -> list[str]:
    """Parse "right,right,stay" (or a list) into canonical names; unknown names are an error."""
    items = text if isinstance(text, list) else [t for t in text.replace(" ", ",").split(",") if t]
    out = []
    for raw in items:
        a = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if a not in vocabulary:
            raise ValueError(f"unknown action name '{raw}'; valid actions: {', '.join(vocabulary)}")
        out.append(a)
    return out


class ContinuousActionBinner:
    """Quantise continuous actions in [low, high] per dimension into ``bins`` bins.

    ``mode='uniform'``: equal-width bins; a value in range decodes to within half a bin width
    (``(high - low) / (bins - 1) / 2``). ``mode='mu_law'`` spends more bins near the middle of
    the range (companding, as in audio codecs); encode and decode stay monotone.

    A value outside its declared range is an error naming the dimension, the value and the
    range; ``encode(x, clip=True)`` clips instead. NaN and infinity are always errors.
    """

    def __init__(self, low: list[float], high: list[float], bins: int = 256, mode: str = "uniform", mu: float = 255.0):
        if int(bins) != bins or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins}")
        if mode not in ("uniform", "mu_law"):
            raise ValueError(f"mode must be 'uniform' or 'mu_law', got '{mode}'")
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        self.low = np.atleast_1d(np.asarray(low, dtype=np.float64))
        self.high = np.atleast_1d(np.asarray(high, dtype=np.float64))
        if (self.low.ndim != 1 or self.low.shape != self.high.shape or not self.low.size
                or not np.all(np.isfinite(self.low)) or not np.all(np.isfinite(self.high)) or np.any(self.high <= self.low)):
            raise ValueError(f"need finite low < high per dimension (same length), got low={low} high={high}")
        self.bins, self.mode, self.mu = int(bins), mode, float(mu)

    @property
    def dims(self) -> int:
        return int(self.low.shape[0])

    @property
    def bin_width(self) -> np.ndarray:
        """Per-dimension width of a uniform bin (distance between neighbouring bin centres)."""
        return (self.high - self.low) / (self.bins - 1)

    def to_dict(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist(), "bins": self.bins, "mode": self.mode, "mu": self.mu}

    def _to_unit(self, x: np.ndarray) -> np.ndarray:  # [-1, 1]
        u = 2 * (x - self.low) / (self.high - self.low) - 1
        u = np.clip(u, -1.0, 1.0)  # float rounding at the range ends
        if self.mode == "mu_law":
            u = np.sign(u) * np.log1p(self.mu * np.abs(u)) / np.log1p(self.mu)
        return u

    def _from_unit(self, u: np.ndarray) -> np.ndarray:
        if self.mode == "mu_law":
            u = np.sign(u) * np.expm1(np.abs(u) * np.log1p(self.mu)) / self.mu
        return (u + 1) / 2 * (self.high - self.low) + self.low

    def check_range(self, x) -> np.ndarray:
        """``x`` as float64 [..., dims]; a ValueError naming the first bad dimension, value and range."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0 or x.shape[-1] != self.dims:
            raise ValueError(f"action vectors must have {self.dims} dimension(s) in the last axis, got shape {x.shape}")
        bad = ~np.isfinite(x) | (x < self.low) | (x > self.high)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            d = pos[-1]
            where = f" at index {pos[:-1]}" if len(pos) > 1 else ""
            if not np.isfinite(x[pos]):
                raise ValueError(f"continuous action dimension {d}{where} = {float(x[pos])!r} is not a finite number "
                                 f"(declared range [{float(self.low[d])!r}, {float(self.high[d])!r}])")
            raise ValueError(
                f"continuous action dimension {d}{where} = {float(x[pos])!r} is outside its declared range "
                f"[{float(self.low[d])!r}, {float(self.high[d])!r}] ({int(bad.sum())} value(s) out of range); "
                f"pass clip=True to clip into the range"
            )
        return x

    def encode(self, x, clip: bool = False) -> np.ndarray:
        """Float actions [..., dims] -> int64 bin indices [..., dims] in [0, bins)."""
        if clip:
            x = np.asarray(x, dtype=np.float64)
            if x.ndim == 0 or x.shape[-1] != self.dims:
                raise ValueError(f"action vectors must have {self.dims} dimension(s) in the last axis, got shape {x.shape}")
            if not np.all(np.isfinite(x)):
                d = int(np.argwhere(~np.isfinite(x))[0][-1])
                raise ValueError(f"continuous action dimension {d} holds a non-finite value (NaN or inf); clip=True cannot fix that")
            x = np.clip(x, self.low, self.high)
        else:
            x = self.check_range(x)
        u = self._to_unit(x)
        return np.clip(np.round((u + 1) / 2 * (self.bins - 1)), 0, self.bins - 1).astype(np.int64)

    def decode(self, b) -> np.ndarray:
        """Bin indices [..., dims] -> float actions [..., dims] (bin centres)."""
        b = np.asarray(b)
        if b.ndim == 0 or b.shape[-1] != self.dims:
            raise ValueError(f"bin index vectors must have {self.dims} dimension(s) in the last axis, got shape {b.shape}")
        if b.size and (not np.issubdtype(b.dtype, np.integer) and not np.all(b == np.round(b))):
            raise ValueError(f"bin indices must be integers, got dtype {b.dtype}")
        if b.size and (np.any(b < 0) or np.any(b >= self.bins)):
            raise ValueError(f"bin indices must lie in [0, {self.bins}), got {b.min()}..{b.max()}")
        return self._from_unit(b.astype(np.float64) / (self.bins - 1) * 2 - 1)
