"""sdk.quantization: grids equal their formulas by hand, rounding is idempotent and exactly on
the grid, stochastic rounding is unbiased, neighbours bracket the weights, and the
straight-through estimator passes the gradient inside the range only."""

import pytest
import torch

import sdk
from sdk.quantization import Grid, code_range, round_ste, stochastic_round


def test_symmetric_per_channel_grid_by_hand():
    w = torch.tensor([[0.3, -0.7, 0.1], [2.0, 1.0, -0.5]])
    grid = Grid.fit(w, 3)  # codes -3 .. 3
    assert code_range(3, True) == (-3, 3)
    assert torch.allclose(grid.scale.flatten(), torch.tensor([0.7 / 3, 2.0 / 3]))
    want = torch.round(w / torch.tensor([[0.7 / 3], [2.0 / 3]])) * torch.tensor([[0.7 / 3], [2.0 / 3]])
    assert torch.allclose(grid.round(w), want)


def test_asymmetric_grid_by_hand():
    w = torch.tensor([[0.0, 1.0, 3.0, 1.6]])
    grid = Grid.fit(w, 2, symmetric=False)  # codes 0 .. 3, scale 1, zero 0
    assert grid.scale.item() == pytest.approx(1.0) and grid.zero.item() == 0
    assert grid.round(w).tolist() == [[0.0, 1.0, 3.0, 2.0]]
    shifted = Grid.fit(w - 2.0, 2, symmetric=False)
    assert shifted.zero.item() == 2 and torch.equal(shifted.round(w - 2.0), grid.round(w) - 2.0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_rounding_is_idempotent_and_on_the_grid(symmetric, group_size):
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    grid = Grid.fit(w, 4, symmetric=symmetric, group_size=group_size)
    q = grid.round(w)
    assert torch.equal(grid.round(q), q) and bool(grid.contains(q).all())
    assert not bool(grid.contains(w).all())
    # half a step; asymmetric grids' rounded zero point may clip an end by up to one step
    assert (q - w).abs().max() <= (0.5 if symmetric else 1.0) * grid.scale.max() + 1e-6
    down, up = grid.neighbours(w)
    inside = (down <= w + 1e-6) & (w <= up + 1e-6)
    assert bool(inside.all()) if symmetric else bool(((down == up) | inside).all())  # clipped ends
    assert torch.equal(grid.round(down), down) and torch.equal(grid.round(up), up)
    assert bool(((q == down) | (q == up)).all())


def test_stochastic_rounding_is_unbiased():
    x = torch.full((20000,), 2.3)
    r = stochastic_round(x, torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {2.0, 3.0}
    assert r.mean().item() == pytest.approx(2.3, abs=0.01)


def test_straight_through_gradient():
    x = torch.tensor([0.2, 1.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0]))
    assert torch.equal(x.grad, torch.ones(2))
    w = torch.tensor([[1.0, -0.5, 0.2]])
    grid = Grid.fit(w, 3)
    big = torch.tensor([[1.0, -3.0, 0.2]], requires_grad=True)  # -3 lies outside the range
    grid.round_ste(big).sum().backward()
    assert big.grad.tolist() == [[1.0, 0.0, 1.0]]


def test_bad_grids_are_named():
    with pytest.raises(sdk.ConfigError, match="bits must be an integer in"):
        Grid.fit(torch.ones(2, 2), 1)
    with pytest.raises(sdk.ConfigError, match="group_size must divide the 3 entries"):
        Grid.fit(torch.ones(2, 3), 4, group_size=2)
    with pytest.raises(sdk.ShapeError, match=r"fitted to \[2, 2\], got a tensor \[3\]"):
        Grid.fit(torch.ones(2, 2), 4).round(torch.ones(3))
