"""A FlexProjector at LLaVA-1.5 shape: one set of weights, any token budget."""

import time

import torch

import flexproj

torch.manual_seed(0)
# CLIP-L/336 gives a 24x24 patch grid of width 1024; Vicuna-7B is 4096 wide.
proj = flexproj.FlexProjector(in_dim=1024, out_dim=4096)
features = torch.randn(2, 24 * 24, 1024)  # (images, patches, width), CLS already dropped

print(
    f"FlexProjector({proj.in_dim} -> {proj.hidden_dim} -> {proj.out_dim}), kernel={proj.kernel!r}"
)
print(f"{'tokens':>6}  {'grid':>7}  {'output':>16}  {'time ms':>8}")
with torch.inference_mode():
    for tokens in (576, 256, 144, 64):
        grid = flexproj.target_grid(tokens, (24, 24))
        start = time.perf_counter()
        out = proj(features, tokens=tokens)
        ms = (time.perf_counter() - start) * 1e3
        print(f"{tokens:>6}  {grid[0]:>3}x{grid[1]:<3}  {tuple(out.shape)!s:>16}  {ms:8.1f}")
