"""Registered modalities: a processor per kind and its tower types. Importing this package registers the
built-in ones."""

from mmcl.modalities.base import (
    MissingModality,
    Processor,
    SampleError,
    TokenEmbedder,
    Tower,
    available_modalities,
    build_processor,
    build_token_embedder,
    build_tower,
    register_processor,
    register_tower,
)
from mmcl.modalities import audio, text, vector, video  # noqa: F401  (registration side effect)
from mmcl.modalities import clip_family  # noqa: F401,E402  (after the modalities whose tower types it adds)

__all__ = ["Processor", "Tower", "TokenEmbedder", "SampleError", "MissingModality", "register_processor",
           "register_tower", "build_processor", "build_tower", "build_token_embedder", "available_modalities"]
