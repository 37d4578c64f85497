"""Test helpers: tiny offline VLMs of every supported family (see :mod:`.tiny_models`)."""

from .tiny_models import FAMILIES, IMAGE_PLACEHOLDER, tiny_images, tiny_tokenizer, tiny_vlm

__all__ = ["FAMILIES", "IMAGE_PLACEHOLDER", "tiny_images", "tiny_tokenizer", "tiny_vlm"]
