"""Small shared helpers: strict YAML -> dataclass loading, atomic writes, JSONL metrics.

Every user-facing config in this project is a typed dataclass loaded from YAML with
:func:`load_config`. Unknown keys are an error that names the key and the file.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import re
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


OVERWRITE_HELP = "replace an earlier output of this command at --out (a folder it did not write is never replaced)"


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``,
    then cosine decay from ``base_lr`` to ``min_lr_ratio * base_lr`` at ``total_steps``. The one
    schedule of the toolkit: the world model's recipes and the video tokenizer's configs use it."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    prog = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


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


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with floats as YAML 1.2 (and people) write them: ``1e-3``, ``1E5``, ``.5``.

    YAML 1.1 reads ``1e-3`` (no dot) as the string '1e-3'; a learning rate written that way
    would be refused as "not a number"."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text the way every config in this project is read (safe; 1e-3 is a float)."""
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a SafeLoader subclass


def _flat_items(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat_items(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def load_config(cls: type[T], path: str | os.PathLike, overrides: dict | None = None,
                override_flag: typing.Callable[[str], str] = lambda key: f"--set {key}") -> T:
    """Load YAML file ``path`` into dataclass ``cls`` (strict: unknown keys are errors).

    ``overrides`` (nested keys, e.g. from ``--set train.lr=1e-3``) replace values of the file; an
    error about one of them names the override (``override_flag(key)``), not the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist (expected a YAML file for {cls.__name__})")
    try:
        data = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    if overrides:
        data = deep_update(data, overrides)
    try:
        return from_dict(cls, data, source=str(p))
    except ConfigError as e:
        msg = str(e).removeprefix(f"{p}: ")
        for key, value in _flat_items(overrides or {}):
            if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", msg):
                raise ConfigError(f"{override_flag(key)}={value!r}: {msg} (over the config file '{p}')") from None
        raise


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


OUTPUT_MARKER = ".uwm_output.json"
# the --out folder the running command may replace (set by :func:`guarded_out`, read by :func:`atomic_dir`)
_OUT_GUARD: contextvars.ContextVar = contextvars.ContextVar("uwm_out_guard", default=None)


class OutputError(ValueError):
    """``--out`` cannot be written: it is a file, a folder the user made, or the parent is not writable."""


def output_owner(path: str | os.PathLike) -> str | None:
    """The command named in ``path``'s marker file (a folder this project wrote), else None."""
    marker = Path(path) / OUTPUT_MARKER
    try:
        return str(json.loads(marker.read_text()).get("command")) if marker.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def mark_output(path: str | os.PathLike, command: str) -> None:
    """Write the marker that says ``path`` is the output of ``uwm <command>`` (and may be replaced by it)."""
    write_json(Path(path) / OUTPUT_MARKER, {"command": command, "created": time.time()})


def _nearest_folder(p: Path, flag: str, why: str) -> Path:
    """The nearest existing ancestor of ``p``, which must be a folder (an OutputError saying ``why`` not)."""
    anc = p.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{flag} '{p}': '{anc}' is not a folder, so {why}")
    return anc


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output file before any work: ``path`` must not be a folder, and the nearest
    existing folder on its way must take a new file (tried: a probe file is made and removed,
    which also catches read-only mounts, where permission bits say yes)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} '{p}' is a folder; expected a file name")
    anc = _nearest_folder(p, flag, "the file cannot be written there")
    try:
        with tempfile.NamedTemporaryFile(dir=anc, prefix=".uwm-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{flag} '{p}': cannot write a file in the folder '{anc}' ({e.strerror or e})") from None
    return p


def check_out(path: str | os.PathLike, command: str, overwrite: bool = False, flag: str = "--out",
              allow_own: bool = False) -> Path:
    """Refuse an output folder before any work is done; return it as a Path.

    Refused: ``path`` exists as a file; its parent is not a writable folder; it is a non-empty
    folder without this command's marker (a folder the user made is never replaced); it is this
    command's own earlier output and ``overwrite`` is False (``allow_own`` accepts it, e.g. for
    ``--resume``). An empty folder or a missing path is fine.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} '{p}' exists and is not a folder (expected a new folder for `uwm {command}`)")
    anc = _nearest_folder(p, flag, "the output cannot be created there")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} '{p}': the folder '{anc}' is not writable")
    if p.is_dir() and any(p.iterdir()):
        owner = output_owner(p)
        if owner is None:
            raise OutputError(
                f"{flag} '{p}' is an existing folder that `uwm {command}` did not write (no {OUTPUT_MARKER} in it); "
                f"it is never replaced: choose a new or empty folder, or remove it yourself")
        if owner != command:
            raise OutputError(f"{flag} '{p}' holds the output of `uwm {owner}`, not of `uwm {command}`; choose another folder")
        if not overwrite and not allow_own:
            raise OutputError(f"{flag} '{p}' holds an earlier output of `uwm {command}`; pass --overwrite to replace it")
    return p


@contextlib.contextmanager
def guarded_out(path: str | os.PathLike, command: str, overwrite: bool = False):
    """For a command's ``--out`` folder: check it up front (:func:`check_out`), then let the
    :func:`atomic_dir` that builds exactly this folder swap in the new output (marked as
    ``command``'s), re-checking at the swap that nobody put files there in the meantime."""
    p = check_out(path, command, overwrite)
    token = _OUT_GUARD.set((p.absolute(), command, overwrite))
    try:
        yield p
    finally:
        _OUT_GUARD.reset(token)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary directory next to ``final``; rename it into place only on success.

    Inside :func:`guarded_out` for this very folder, the new folder gets the command's marker and
    replaces ``final`` only if ``final`` is missing, empty or that command's earlier output."""
    final = Path(final)
    guard = _OUT_GUARD.get()
    guard = guard if guard is not None and guard[0] == final.absolute() else None
    if guard is not None:
        check_out(final, guard[1], guard[2])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if guard is not None:
            mark_output(tmp, guard[1])
            check_out(final, guard[1], guard[2])  # still ours (or empty) at the moment of the swap
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield the path of a temporary file next to ``final`` (to be written by any writer); rename it
    into place only on success. The file gets the permissions of an ordinary new file (0666 less
    the umask), not mkstemp's private 0600."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent, suffix=final.suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # again: some writers (safetensors) replace the file with a private one
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w"):
    """Open a temporary file next to ``final``; rename it into place only on success (see :func:`atomic_path`)."""
    with atomic_path(final) as tmp, open(tmp, mode) as f:
        yield f


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


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or
    ``taskset`` narrows), not the host's count that ``os.cpu_count()`` reports."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1
