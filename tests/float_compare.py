"""Comparing float results that were computed in a different order.

Two process layouts, two thread counts, two code paths (C kernel / torch ops / reference) or two
devices add the same float32 numbers in a different order. How far apart the results end depends
on the CPU's vector unit (Intel and AMD differ in the last bits) and, element by element, on how
small the element is: a momentum entry that is the difference of nearly equal gradients can carry
a relative error of 1e-2 while its tensor as a whole is right to 1e-5. An element-wise rtol / atol
picked on one machine is therefore a coin toss on another.

So such comparisons use the norm-wise relative error of each tensor,
``||actual - expected||_2 / ||expected||_2`` (in float64), which is what float32 rounding bounds:
reordering a sum of n float32 terms moves it by about sqrt(n) * u relative to the sum of the
magnitudes (u = 2**-24 ~ 6e-8, rounding errors behaving as a random walk). Each test states the
n and the number of steps its tolerance comes from, and how far above the measured error it sits.

Bit-for-bit equality (torch.equal) stays only where a test compares reruns on one machine with
one process layout and thread count (resume after SIGKILL, data-loader workers, repeated runs).
"""

from __future__ import annotations

import torch

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the whole tensor, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def largest_relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The worst tensor of two state dicts with the same keys: (its norm-wise relative error, its name)."""
    assert actual.keys() == expected.keys()
    errors = [(relative_error(actual[name], tensor), name)
              for name, tensor in expected.items() if tensor.is_floating_point()]
    return max(errors)
