"""FlexProjector shapes, errors and state_dict round trip."""

import io

import pytest
import torch

from flexproj import FlexProjector, pool_grid


@pytest.mark.parametrize("grid", [(24, 24), (27, 27)])
@pytest.mark.parametrize("tokens", [64, 144, 256])
def test_shapes_for_clip_and_siglip_grids(grid, tokens):
    proj = FlexProjector(16, 24)
    x = torch.randn(2, grid[0] * grid[1], 16)
    y = proj(x, tokens=tokens)
    assert y.shape == (2, tokens, 24)  # 64/144/256 are squares: exactly N out
    assert torch.isfinite(y).all()


def test_explicit_target_grid_and_non_square_source():
    proj = FlexProjector(8, 12, hidden_dim=20)
    x = torch.randn(3, 16 * 24, 8)
    assert proj(x, tokens=(8, 12), grid=(16, 24)).shape == (3, 96, 12)
    assert proj(x, tokens=100, grid=(16, 24)).shape == (3, 8 * 12, 12)
    assert proj.mlp.w12.weight.shape == (40, 8) and proj.mlp.w3.weight.shape == (12, 20)


def test_default_hidden_is_three_times_input():
    proj = FlexProjector(10, 7)
    assert proj.hidden_dim == 30
    assert proj.mlp.w12.weight.shape == (60, 10)


def test_forward_is_pool_then_norm_then_swiglu():
    torch.manual_seed(0)
    proj = FlexProjector(6, 5, hidden_dim=9)
    x = torch.randn(2, 36, 6)
    pooled = pool_grid(x, (6, 6), (3, 3))
    n = proj.norm(pooled)
    a, b = proj.mlp.w12(n).chunk(2, -1)
    expected = proj.mlp.w3(torch.nn.functional.silu(a) * b)
    torch.testing.assert_close(proj(x, tokens=9), expected)


def test_same_weights_serve_every_budget():
    proj = FlexProjector(4, 4)
    x = torch.randn(1, 64, 4)
    # at the native count the pooling is the identity: the projector is a per-token MLP
    full = proj(x, tokens=64)
    torch.testing.assert_close(full, proj.project(x))
    assert proj(x, tokens=16).shape == (1, 16, 4)


def test_cls_token_is_never_pooled_silently():
    proj = FlexProjector(4, 4)
    x = torch.randn(2, 1 + 24 * 24, 4)
    with pytest.raises(ValueError, match="CLS"):
        proj(x, tokens=64)
    with pytest.raises(ValueError, match="drop_cls=True"):
        proj(x, tokens=64, grid=(24, 24))
    out = proj(x, tokens=64, drop_cls=True)
    torch.testing.assert_close(out, proj(x[:, 1:], tokens=64))


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_tokens_raise(bad):
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        FlexProjector(4, 4)(torch.randn(1, 16, 4), tokens=bad)


def test_non_integer_tokens_raise():
    with pytest.raises(TypeError, match="tokens must be a positive int"):
        FlexProjector(4, 4)(torch.randn(1, 16, 4), tokens=8.0)


def test_wrong_in_dim_raises():
    with pytest.raises(ValueError, match="width 4, got 5"):
        FlexProjector(4, 4)(torch.randn(1, 16, 5), tokens=4)


def test_target_larger_than_grid_raises():
    proj = FlexProjector(4, 4)
    with pytest.raises(ValueError, match="larger than the source grid 4x4"):
        proj(torch.randn(1, 16, 4), tokens=(5, 5))
    assert proj(torch.randn(1, 16, 4), tokens=(5, 5), allow_upsample=True).shape == (1, 25, 4)
    # an int budget above the grid is capped at the grid (never upsampled silently)
    assert proj(torch.randn(1, 16, 4), tokens=100).shape == (1, 16, 4)


def test_wrong_length_for_grid_raises():
    proj = FlexProjector(4, 4)
    with pytest.raises(ValueError, match="x has 30 tokens but grid 4x8 holds 32"):
        proj(torch.randn(1, 30, 4), tokens=8, grid=(4, 8))
    with pytest.raises(ValueError, match="cannot infer a square grid from 30"):
        proj(torch.randn(1, 30, 4), tokens=8)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="in_dim"):
        FlexProjector(0, 4)
    with pytest.raises(ValueError, match="unknown kernel 'cuda-magic'"):
        FlexProjector(4, 4, kernel="cuda-magic")


def test_state_dict_round_trip_is_plain_torch():
    src = FlexProjector(8, 6)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = FlexProjector(8, 6)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 16, 8)
    torch.testing.assert_close(dst(x, tokens=4), src(x, tokens=4), rtol=0, atol=0)
    assert set(src.state_dict()) == {
        "norm.weight",
        "norm.bias",
        "mlp.w12.weight",
        "mlp.w12.bias",
        "mlp.w3.weight",
        "mlp.w3.bias",
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    proj = FlexProjector(8, 8).to(dtype)
    y = proj(torch.randn(2, 36, 8, dtype=dtype), tokens=9)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
