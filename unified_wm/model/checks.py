"""Checks of an exported model folder before it loads, so that bad input is a message naming
the file rather than a traceback from deep inside transformers or safetensors."""
from __future__ import annotations

import json
from pathlib import Path


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a ``save_pretrained`` folder holds (one file, or the shards its index lists)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"'{index}' is not a safetensors index ({type(e).__name__}: {e}); re-export the model") from None
        return [folder / s for s in shards]
    return [folder / "model.safetensors"]


def check_weights(folder: Path) -> None:
    """Every weights file exists and its header and length check out (a truncated or garbage file is named)."""
    from safetensors import safe_open

    for f in weight_files(folder):
        if not f.is_file():
            raise FileNotFoundError(f"model folder '{folder}' has no '{f.name}' (expected the weights written by `uwm export`)")
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
            raise ValueError(f"weights file '{f}' is damaged or not a safetensors file ({str(e).strip()[:200]}; "
                             f"{f.stat().st_size} bytes); re-export the model with `uwm export`") from None


def check_model_folder(folder: str | Path, processor) -> None:
    """The config (``config.json``) agrees with the folder's processor, and the weights are readable."""
    from transformers import AutoConfig

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"'{folder / 'config.json'}' is not a unified_wm model config ({str(e).strip()[:300]})") from None
    try:
        processor.check_model(config)
    except ValueError as e:
        raise ValueError(f"model folder '{folder}': config.json and the processor (processor_config.json) do not "
                         f"match: {e}") from None
    check_weights(folder)
