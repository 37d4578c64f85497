"""Step 2: the tiny, randomly initialised stock model each seed starts from.

LLaVA: a tiny ``LlavaForConditionalGeneration`` (CLIP tower, Llama LLM) at the demo's
geometry (96 px, 8 px patches: 12x12 = 144 native tokens), with fixed 2-D sin-cos vision
positions; every attention head 32 wide (vLLM's CPU attention wants head_dim >= 32)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexproj.demo.config import ConvertConfig, DemoConfig
from flexproj.testing import tiny_vlm
from flexproj.testing.datasets import VOCAB

__all__ = ["build_base", "sincos_2d", "write_base_model"]


def build_base(cfg: DemoConfig, seed: int) -> tuple[nn.Module, Any]:
    """The demo's tiny stock LLaVA (unpatched, stock projector) and its processor."""
    hidden = cfg.text_hidden
    model, processor = tiny_vlm(
        "llava",
        seed=seed,
        vision_config={
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": 2 * cfg.vision_hidden,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
        },
        vision_feature_layer=-1,
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": max(1, cfg.text_heads // 2),
            **({"head_dim": cfg.text_head_dim} if cfg.text_head_dim else {}),
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        },
        extra_words=list(VOCAB),
        # the images are drawn at the model's size: no resize or crop needed (saves time)
        image_processor={"do_resize": False, "do_center_crop": False},
    )
    if cfg.vision_pos == "sincos":
        _set_sincos_positions(model, cfg.grid_side)
    elif cfg.vision_pos != "random":
        raise ValueError(f"vision_pos must be 'sincos' or 'random', got {cfg.vision_pos!r}")
    return model, processor


def sincos_2d(side: int, dim: int, temperature: float = 100.0) -> torch.Tensor:
    """MAE-style fixed 2-D sin-cos embeddings of a ``side x side`` grid, row-major: ``(side**2, dim)``.

    Half the channels encode the row, half the column, each as sin/cos pairs of
    geometrically spaced frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embeddings need a width divisible by 4, got {dim}")
    freqs = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(x: torch.Tensor) -> torch.Tensor:
        angles = x.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def _set_sincos_positions(model: nn.Module, side: int) -> None:
    """Give the random CLIP tower fixed 2-D sin-cos positions, at the scale of its patch features.

    A pretrained encoder's features know where they are; a random one's barely do (CLIP
    initialises its learned position table with std 0.02, an order of magnitude below
    the patch signal). The CLS row is zeroed.
    """
    llava: Any = model
    embeddings = llava.model.vision_tower.embeddings
    table = embeddings.position_embedding.weight
    grid = sincos_2d(side, table.shape[1])
    patch_std = float(embeddings.patch_embedding.weight.detach().std()) * math.sqrt(
        embeddings.patch_embedding.weight[0].numel()
    )
    with torch.no_grad():
        table.zero_()
        table[-side * side :] = grid * (patch_std / float(grid.std()))


def write_base_model(cfg: ConvertConfig, seed: int, out: Path) -> tuple[str, str | None]:
    """The randomly initialised stock model of ``seed``: ``(--model, --weights)`` for the recipe.

    LLaVA: the demo's tiny LLaVA (96 px, 8 px patches, 12x12 = 144 tokens, sin-cos vision
    positions, a vision tower 64 wide with 2 heads of 32; the LLM's heads are 16 wide unless
    ``text_head_dim`` says otherwise: vLLM's CPU attention wants 32) saved with its processor, so ``--model`` is that directory. Other
    families: ``tiny:<family>`` (its processor is built in code) with the seed's weights.
    """
    if cfg.family == "llava":
        geometry = DemoConfig(
            image_size=cfg.image_size or 96, vision_hidden=64, vision_heads=2,
            text_head_dim=cfg.text_head_dim,
        )  # fmt: skip
        model, processor = build_base(geometry, seed)
        llava: Any = model
        llava.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        return str(out), None
    tiny, _ = tiny_vlm(cfg.family, seed=seed, extra_words=list(VOCAB))
    tiny.save_pretrained(str(out))
    return f"tiny:{cfg.family}", str(out)
