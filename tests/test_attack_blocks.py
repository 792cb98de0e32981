"""The fast paths of the attacks' random draws give the same numbers as the plain ones:
splitmix64's finaliser in place, a coin flip read from the top random bit, and Square's Linf
windows and signs made for a block of iterations at once."""

from __future__ import annotations

import pytest
import torch

from robust_transfer.attacks import Square
from robust_transfer.attacks.rng import ExampleRNG, _mix_, mix
from robust_transfer.attacks.square import _PLACES, _RESAMPLE, _window_mask, p_selection

MASK = (1 << 64) - 1


def splitmix64_finaliser(z: int) -> int:
    """Independent: Steele et al.'s splitmix64 output function on unsigned 64-bit ints."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_mix_is_splitmix64_and_leaves_its_input():
    z = torch.randint(-(2**63), 2**63 - 1, (500,), generator=torch.Generator().manual_seed(0))
    z[:3] = torch.tensor([0, -1, -(2**63)])  # sign-bit edge cases of the logical shifts
    before = z.clone()
    got = mix(z)
    assert torch.equal(z, before)  # mix copies; _mix_ works in place
    want = [splitmix64_finaliser(v & MASK) for v in z.tolist()]
    assert [v & MASK for v in got.tolist()] == want
    assert torch.equal(_mix_(z.clone()), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_bit_is_the_coin_and_bits_give_the_uniforms(dtype):
    x = torch.rand(40, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    rng = ExampleRNG.for_inputs(x, 3)
    counters = [(i, _PLACES) for i in range(7)]
    bits = rng.bits_many((11,), counters)
    u = rng.uniform_many((11,), counters, dtype=dtype)
    assert torch.equal(ExampleRNG.to_uniform(bits, dtype), u)
    assert torch.equal(bits < 0, u >= 0.5)
    assert 0.4 < (bits < 0).float().mean() < 0.6


@pytest.mark.parametrize("shape,its", [((1, 8, 8), range(90, 154)),  # side changes at it 100
                                       ((3, 10, 12), range(0, 64))])
def test_square_block_windows_and_signs_match_each_iteration(shape, its):
    """`_linf_block` (B iterations at once) gives, iteration by iteration, the window and the
    tries' signs that `_propose_linf` derives from that iteration's own uniforms."""
    c, h, w = shape
    x = torch.rand(30, *shape, generator=torch.Generator().manual_seed(2))
    atk = Square(torch.nn.Identity(), 0.1, n_queries=5000)
    rng = ExampleRNG.for_inputs(x, 0)
    n_draws = atk._n_draws(c)
    rows, cols, plus = atk._linf_block(rng.bits_many((n_draws,), [(i, _PLACES) for i in its]),
                                       its, h, w)
    windows = torch.stack([atk._block_window(rows[:, j], cols[:, j]) for j in range(len(its))], 1)
    sides = set()
    for j, it in enumerate(its):
        u = rng.uniform((n_draws,), it, _PLACES, dtype=torch.float64)
        s = atk._side_linf(p_selection(atk.p_init, it, atk.n_queries), h, w)
        sides.add(s)
        assert torch.equal(windows[:, j], _window_mask(*atk._corners(u, s, h, w), s, h, w)[2])
        assert torch.equal(plus[:, j], (u[:, 2:] >= 0.5).view(len(x), _RESAMPLE + 1, c))
    assert windows.flatten(2).sum(2).unique().numel() == len(sides)  # s x s pixels each
