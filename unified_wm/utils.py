"""Small shared helpers: strict YAML -> dataclass loading, atomic writes, JSONL metrics.

Every user-facing config in this project is a typed dataclass loaded from YAML with
:func:`load_config`. Unknown keys are an error that names the key and the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file and the key."""


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=where + ".")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last: Exception | None = None
        for a in non_none:
            try:
                return _convert(value, a, where, source)
            except (ConfigError, TypeError, ValueError) as e:  # try the next member
                last = e
        raise ConfigError(f"{source}: '{where}' = {value!r} does not fit {tp}: {last}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{where}.{k}", source) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{where}' = {value!r}; expected one of {list(args)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{where}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{where}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{where}' must be a string, got {value!r}")
        return value
    return value


def extensions_dir() -> str | None:
    """Where C++ extensions (DeepSpeed's ops, the MoC CPU kernel) are built: ``$TORCH_EXTENSIONS_DIR``,
    else ``<virtual env>/torch_extensions`` when inside a writable virtual environment, else None
    (torch's default, ``~/.cache/torch_extensions``). One folder per environment: a folder that two
    checkouts share is rebuilt each time the other one runs, and every command of one checkout
    (training, rollout, eval) finds the build the others made."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        return os.path.join(sys.prefix, "torch_extensions")
    return None


def from_dict(cls: type[T], data: dict, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming key and source."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return obj


def load_config(cls: type[T], path: str | os.PathLike, overrides: dict | None = None) -> T:
    """Load YAML file ``path`` into dataclass ``cls`` (strict: unknown keys are errors)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist (expected a YAML file for {cls.__name__})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    if overrides:
        data = deep_update(data, overrides)
    return from_dict(cls, data, source=str(p))


def deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary directory next to ``final``; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"'{final}' already exists")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w"):
    """Open a temporary file next to ``final``; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent, suffix=final.suffix)
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=float)
        f.write("\n")


class MetricsWriter:
    """Append-only JSONL metrics; one JSON object per line with a wall-clock stamp."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if not self.path:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def require_dir(path: str | os.PathLike, what: str, must_contain: tuple[str, ...] = ()) -> Path:
    """Check that ``path`` is a directory holding ``must_contain``; else a clear FileNotFoundError."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} '{p}' does not exist or is not a directory")
    for name in must_contain:
        if not (p / name).exists():
            raise FileNotFoundError(f"{what} '{p}' has no '{name}' (expected {', '.join(must_contain)})")
    return p
