"""Registered modalities. Importing this package registers the built-in ones."""

from mmcl.modalities.base import (
    MissingModality,
    Modality,
    SampleError,
    TokenEmbedder,
    Tower,
    available_modalities,
    build_modality,
    register_modality,
)
from mmcl.modalities import audio, text, vector, video  # noqa: F401  (registration side effect)

__all__ = ["Modality", "Tower", "TokenEmbedder", "SampleError", "MissingModality", "register_modality",
           "build_modality", "available_modalities"]
