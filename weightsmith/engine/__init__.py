"""Layer-wise execution with hooks: bounded memory for activation-aware passes."""

from weightsmith.engine.activations import ActivationStore
from weightsmith.engine.layerwise import LayerHandle, LayerwiseEngine, default_device

__all__ = ["ActivationStore", "LayerHandle", "LayerwiseEngine", "default_device"]
