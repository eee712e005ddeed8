"""Loading a frozen CLIP: sibling loaders over one checkpoint reader, chosen by ``load_clip``.

- ``named``: open_clip names (``ARCH/TAG``, ``ARCH``, ``ARCH:PATH``, ``hf-hub:org/repo``);
- ``openai``: a checkpoint file in OpenAI's layout (JIT archive or state dict), architecture from its shapes;
- ``transformers_clip``: a Hugging Face transformers CLIP folder or hub id, as an open_clip model;
- ``checkpoint``: the state-dict reader they share; ``hub``: whether the Hugging Face hub may be asked;
- ``device``: the device and precision the model runs in; ``base``: ``ClipModel`` and ``ModelLoadError``.

Each loader imports ``base`` and ``checkpoint`` only; ``load`` imports the loaders; nothing imports ``load``
but this package's namespace.
"""

from .base import DEFAULT_MODEL, MODEL_ENV, ClipModel, ModelLoadError
from .device import cast_vision_weights, fp32_layer_norms, resolve_device
from .load import load_clip

__all__ = [
    "DEFAULT_MODEL", "MODEL_ENV", "ClipModel", "ModelLoadError", "cast_vision_weights", "fp32_layer_norms", "load_clip",
    "resolve_device",
]
