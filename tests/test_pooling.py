"""Properties of grid pooling and the target-grid rule."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexproj import pool_grid, pool_packed, target_grid

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

sides = st.integers(1, 12)


@st.composite
def grid_and_target(draw):
    H, W = draw(sides), draw(sides)
    return (H, W), (draw(st.integers(1, H)), draw(st.integers(1, W)))


def reference_pool(x, grid, target):
    """adaptive_avg_pool2d on the (B, C, H, W) image, back to row-major tokens."""
    B, _, C = x.shape
    img = x.float().reshape(B, *grid, C).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(img, target).flatten(2).transpose(1, 2)


@settings(max_examples=60, deadline=None)
@given(
    gt=grid_and_target(),
    batch=st.integers(1, 3),
    channels=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
)
def test_shape_and_equals_adaptive_avg_pool(gt, batch, channels, dtype):
    grid, target = gt
    x = torch.randn(batch, grid[0] * grid[1], channels).to(dtype)
    out = pool_grid(x, grid, target)
    assert out.shape == (batch, target[0] * target[1], channels)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.float(), reference_pool(x, grid, target), atol=TOL[dtype], rtol=TOL[dtype]
    )


@settings(max_examples=30, deadline=None)
@given(grid=st.tuples(sides, sides), batch=st.integers(1, 3))
def test_identity_when_target_is_grid(grid, batch):
    x = torch.randn(batch, grid[0] * grid[1], 4)
    assert torch.equal(pool_grid(x, grid, grid), x)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), fh=st.integers(1, 4), fw=st.integers(1, 4))
def test_mean_preserved_when_bins_tile(h, w, fh, fw):
    grid = (h * fh, w * fw)
    x = torch.randn(2, grid[0] * grid[1], 3, dtype=torch.float64)
    out = pool_grid(x, grid, (h, w))
    torch.testing.assert_close(out.mean(1), x.mean(1))
    # each output cell is the plain mean of its fh x fw block
    blocks = x.reshape(2, h, fh, w, fw, 3).mean((2, 4)).reshape(2, h * w, 3)
    torch.testing.assert_close(out, blocks)


@settings(max_examples=30, deadline=None)
@given(gt=grid_and_target(), batch=st.integers(2, 4))
def test_batch_elements_independent(gt, batch):
    grid, target = gt
    x = torch.randn(batch, grid[0] * grid[1], 3)
    out = pool_grid(x, grid, target)
    y = x.clone()
    y[1:] = torch.randn_like(y[1:])  # change every element but the first
    assert torch.equal(pool_grid(y, grid, target)[0], out[0])
    singles = torch.cat([pool_grid(x[i : i + 1], grid, target) for i in range(batch)])
    torch.testing.assert_close(out, singles)


@settings(max_examples=30, deadline=None)
@given(items=st.lists(grid_and_target(), min_size=1, max_size=5))
def test_packed_equals_per_image_loop(items):
    grids = [g for g, _ in items]
    targets = [t for _, t in items]
    per_image = [torch.randn(g[0] * g[1], 4) for g in grids]
    packed = pool_packed(torch.cat(per_image), grids, targets)
    loop = torch.cat([pool_grid(x[None], g, t)[0] for x, g, t in zip(per_image, grids, targets)])
    torch.testing.assert_close(packed, loop)


def test_packed_batches_repeated_grids():
    grids = [(4, 6)] * 3 + [(2, 2)]
    targets = [(2, 3)] * 3 + [(1, 1)]
    x = torch.randn(3 * 24 + 4, 5)
    out = pool_packed(x, grids, targets)
    assert out.shape == (3 * 6 + 1, 5)
    torch.testing.assert_close(out[-1], x[-4:].mean(0))


@settings(max_examples=30, deadline=None)
@given(gt=grid_and_target(), dtype=st.sampled_from(DTYPES))
def test_gradients_flow_and_are_finite(gt, dtype):
    grid, target = gt
    x = torch.randn(2, grid[0] * grid[1], 3).to(dtype).requires_grad_()
    pool_grid(x, grid, target).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    # d(sum)/dx is each cell's total pooling weight: positive, since every source
    # cell lies in at least one adaptive bin, and summing to h*w
    assert (x.grad.float() > 0).all()
    torch.testing.assert_close(
        x.grad.float()[0, :, 0].sum(),
        torch.tensor(float(target[0] * target[1])),
        rtol=TOL[dtype],
        atol=TOL[dtype] * 10,
    )


def test_target_larger_than_grid_raises_unless_upsampling():
    x = torch.randn(1, 4 * 4, 2)
    with pytest.raises(ValueError, match="larger than the source grid 4x4"):
        pool_grid(x, (4, 4), (5, 4))
    up = pool_grid(x, (4, 4), (8, 8), allow_upsample=True)
    assert up.shape == (1, 64, 2)
    torch.testing.assert_close(up, reference_pool(x, (4, 4), (8, 8)))


def test_wrong_length_and_bad_grids_raise():
    with pytest.raises(ValueError, match="x has 15 tokens but grid 4x4 needs 16"):
        pool_grid(torch.randn(1, 15, 2), (4, 4), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        pool_grid(torch.randn(1, 16, 2), (4, 4), (0, 2))
    with pytest.raises(TypeError, match="pair of ints"):
        pool_grid(torch.randn(1, 16, 2), (4, 4), (2.0, 2))
    with pytest.raises(ValueError, match="grids hold 16 tokens"):
        pool_packed(torch.randn(17, 2), [(4, 4)], [(2, 2)])


@pytest.mark.parametrize(
    ("tokens", "grid", "expected"),
    [
        (144, (24, 24), (12, 12)),
        (64, (24, 24), (8, 8)),
        (256, (24, 24), (16, 16)),
        (64, (27, 27), (8, 8)),
        (144, (27, 27), (12, 12)),
        (256, (27, 27), (16, 16)),
        (96, (16, 24), (8, 12)),
        (1000, (24, 24), (24, 24)),
        (576, (24, 24), (24, 24)),
        (3, (1, 100), (1, 3)),
        (1, (7, 3), (1, 1)),
    ],
)
def test_target_grid_examples(tokens, grid, expected):
    assert target_grid(tokens, grid) == expected


@settings(max_examples=300, deadline=None)
@given(tokens=st.integers(1, 2000), H=st.integers(1, 40), W=st.integers(1, 40))
def test_target_grid_properties(tokens, H, W):
    h, w = target_grid(tokens, (H, W))
    assert 1 <= h <= H and 1 <= w <= W
    assert h * w <= tokens
    if tokens >= H * W:
        assert (h, w) == (H, W)
    if H == W:
        assert h == w == min(math.isqrt(tokens), H)
    # aspect ratio kept to within rounding of one column (unless the budget is below one row)
    if w < tokens // h:
        assert abs(w - h * W / H) <= 0.5 + 1e-9
    # a larger budget never buys a smaller grid
    h2, w2 = target_grid(tokens + 1, (H, W))
    assert h2 * w2 >= h * w


def test_target_grid_rejects_bad_budgets():
    for bad in (0, -4):
        with pytest.raises(ValueError, match="positive"):
            target_grid(bad, (24, 24))
    for bad in (2.5, "64", True):
        with pytest.raises(TypeError, match="positive int"):
            target_grid(bad, (24, 24))
    assert target_grid(2000, (24, 24), allow_upsample=True) == (44, 44)
