"""unified_wm: text, actions and video in one decoder-only transformer with Mixture-of-Contexts attention.

Importing the package registers the model with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""
from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM, register

register()

__all__ = ["UnifiedWMConfig", "UnifiedWMForCausalLM", "__version__"]
__version__ = "0.1.0"
