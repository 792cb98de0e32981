"""Random numbers per example, so that an attack's result does not depend on the batch.

A seeded `torch.Generator` hands out numbers in batch order: example i of a batch of 16 gets
different noise than the same example alone, so its adversarial example (and whether the
attack fools it) would depend on its neighbours. Here every number is a hash of (seed, the
example's content, a counter the caller names, the coordinate): a counter-based generator
(splitmix64 mixing, as in Salmon et al. 2011's Philox idea), vectorised in int64 torch ops on
any device. Two calls with the same counter give the same numbers; the caller names a new
counter (restart, iteration, redraw) for fresh ones.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2, _G = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(_GOLDEN)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of int64 that scrambles every bit (wrapping ops)."""
    return _mix_(z.clone())


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """`mix` in place, with one scratch tensor: the same bits, without a fresh tensor per
    operation (the draws of a block of Square iterations are ~10^5 to 10^6 numbers)."""
    t = torch.empty_like(z)
    for shift, factor in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t &= (1 << (64 - shift)) - 1  # logical shift: clear the copied sign bits
        z ^= t
        if factor is not None:
            z *= factor
    return z


def _mix_int(value: int) -> int:
    """`mix` of one Python int, for folding counters without a tensor."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed(z ^ (z >> 31))


class ExampleRNG:
    """Per-example random streams keyed by content and seed.

    `rng = ExampleRNG.for_inputs(x, seed)`; `rng.uniform((C, H, W), 3)` is an (N, C, H, W)
    tensor in [0, 1) whose row i depends only on (seed, x[i], counter 3). `rng[idx]` is the
    streams of a subset, so attacks that shrink their active set keep each example's numbers.
    Identical images get identical numbers (they are the same problem).
    """

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys

    @classmethod
    def for_inputs(cls, x: torch.Tensor, seed: int | None) -> ExampleRNG:
        """Keys from the exact bits of each example and `seed` (None: a fresh random seed)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        bits = x.detach().float().contiguous().flatten(1).view(torch.int32).long()
        index = torch.arange(bits.shape[1], device=x.device, dtype=torch.long)
        per_coord = _mix_(bits + (index + 1) * _G)
        keys = _mix_(per_coord.sum(1) ^ _mix_int(seed))  # int64 sums wrap: order-free
        return cls(keys)

    @classmethod
    def shared(cls, seed: int | None, device: torch.device | str = "cpu") -> ExampleRNG:
        """One stream keyed by `seed` alone, for a draw every example of a batch shares (a
        window AutoAttack's Square places for the whole batch): the same for any batch."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        key = _mix_int(_mix_int(seed) ^ 0x5A17ED)
        return cls(torch.tensor([key], dtype=torch.long, device=device))

    def __getitem__(self, idx) -> ExampleRNG:
        return ExampleRNG(self.keys[idx])

    def __len__(self) -> int:
        return len(self.keys)

    def _bits(self, shape: tuple[int, ...], counters: list[tuple[int, ...]]) -> torch.Tensor:
        """(N, len(counters), *shape) int64 of uniform random bits, one slice per counter
        (many counters in one pass: the same numbers as one call per counter)."""
        folded = []
        for counter in counters:
            c = 0
            for part in counter:
                c = _mix_int(c ^ _mix_int(int(part) + 0x51ED27))
            folded.append(c)
        cs = torch.tensor(folded, dtype=torch.long, device=self.keys.device)
        n_coords = math.prod(shape)
        index = torch.arange(n_coords, device=self.keys.device, dtype=torch.long)
        z = _mix_(self.keys.view(-1, 1, 1) ^ cs.view(1, -1, 1)) + (index + 1) * _G
        return _mix_(z).view(len(self.keys), len(counters), *shape)

    def bits_many(self, shape: tuple[int, ...], counters: list[tuple[int, ...]]
                  ) -> torch.Tensor:
        """(N, len(counters), *shape) int64: the 64 random bits behind `uniform_many`'s
        numbers. `uniform_many(...) >= 0.5` is `bits_many(...) < 0` (the top bit), a coin
        flip without the conversion to float."""
        return self._bits(tuple(shape), counters)

    def uniform_many(self, shape: tuple[int, ...], counters: list[tuple[int, ...]],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, len(counters), *shape): `uniform(shape, *counter)` for each counter, in one
        pass (an attack drawing every iteration takes a block of iterations at once)."""
        return self.to_uniform(self._bits(tuple(shape), counters), dtype)

    @staticmethod
    def to_uniform(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`bits_many`'s bits as `uniform_many`'s numbers in [0, 1): the top 24 (float32) or
        53 (float64) bits."""
        n = 53 if dtype == torch.float64 else 24
        return _shr(bits, 64 - n).to(dtype) * (2.0**-n)

    def uniform(self, shape: tuple[int, ...], *counter: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, *shape) uniform in [0, 1) (24 random bits; 53 for float64)."""
        return self.uniform_many(shape, [counter], dtype)[:, 0]

    def normal(self, shape: tuple[int, ...], *counter: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, *shape) standard normal (Box-Muller on two uniform streams)."""
        u1 = self.uniform(shape, *counter, 1, dtype=dtype)
        u2 = self.uniform(shape, *counter, 2, dtype=dtype)
        radius = torch.sqrt(-2 * torch.log1p(-u1))  # 1 - u1 in (0, 1]: finite
        return radius * torch.cos(2 * math.pi * u2)

    def randint(self, high: int | torch.Tensor, shape: tuple[int, ...], *counter: int
                ) -> torch.Tensor:
        """(N, *shape) integers in [0, high); `high` an int or an (N,) tensor, >= 1."""
        u = self.uniform(shape, *counter, dtype=torch.float64)
        if isinstance(high, torch.Tensor):
            high = high.to(u).view(-1, *([1] * len(shape)))
        return (u * high).floor().long()

    def sign(self, shape: tuple[int, ...], *counter: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, *shape) of -1 / +1 with equal probability."""
        return torch.where(self.uniform(shape, *counter) < 0.5, -1.0, 1.0).to(dtype)
