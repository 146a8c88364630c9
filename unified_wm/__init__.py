"""unified_wm: text, actions and video in one decoder-only transformer with Mixture-of-Contexts attention.

Importing the package is light (no torch, no transformers), so ``uwm --help`` answers at once.
The model registers itself with ``AutoConfig`` / ``AutoModelForCausalLM`` when its module
(``unified_wm.model.modeling_uwm``) is imported, which every command that loads or builds a
model does; and after ``import unified_wm``, the first import of ``transformers`` imports it
too, so ``import unified_wm`` then ``AutoModelForCausalLM.from_pretrained(folder)`` works as before.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["UnifiedWMConfig", "UnifiedWMForCausalLM", "__version__"]
__version__ = "0.1.0"

_MODEL = "unified_wm.model.modeling_uwm"


def __getattr__(name: str):
    if name in ("UnifiedWMConfig", "UnifiedWMForCausalLM", "register"):
        return getattr(importlib.import_module(_MODEL), name)
    raise AttributeError(f"module 'unified_wm' has no attribute '{name}'")


def _importing_package() -> bool:
    """True while one of this package's modules is half-imported (its body is running)."""
    return any(n.startswith("unified_wm.") and getattr(getattr(m, "__spec__", None), "_initializing", False)
               for n, m in list(sys.modules.items()))


def _register_model() -> None:
    """Import the model's module (it registers itself), unless it is being imported right now.
    When ``transformers`` is first imported from inside one of this package's modules (say
    ``from unified_wm.model.cache import UWMCache`` before anything else), the model's module
    would import that half-made module: registration then waits for the next import after it."""
    if _MODEL in sys.modules:
        return
    if _importing_package():
        if not any(isinstance(f, _RegisterWhenPackageReady) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterWhenPackageReady())
        return
    try:
        importlib.import_module(_MODEL)
    except Exception as e:  # noqa: BLE001  (never break the user's import of transformers)
        import warnings

        warnings.warn(f"unified_wm could not register its model with transformers' Auto classes: "
                      f"{type(e).__name__}: {e}")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """A one-shot import hook: once ``transformers`` has been imported, register the model."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_model()

        try:
            loader.exec_module = exec_then_register
        except AttributeError:  # a loader that cannot be wrapped: register when the model is used
            pass
        return spec


class _RegisterWhenPackageReady(importlib.abc.MetaPathFinder):
    """One-shot: at the first import once no module of this package is half-imported, register."""

    def find_spec(self, name, path=None, target=None):
        if not _importing_package():
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_model()
        return None


if "transformers" in sys.modules:
    _register_model()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
