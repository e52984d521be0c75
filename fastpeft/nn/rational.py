"""Initial coefficients of the rational activation (adaptable adapters; ``fastpeft.ops.adapter``).

A rational activation starts as an approximation of a fixed one, as the rational activations
library does (its default: leaky ReLU): ``fit_rational(name)`` fits ``R(z) = P(z) / Q(z)`` of degrees
(5, 4), ``Q = 1 + sum_j |b_j z^j|``, to the named function on [-3, 3] in float64 (a linearised
least-squares start, then L-BFGS on the squared error of R itself). The fit is deterministic and
cached per name; ``tests/nn/test_adaptable_adapter.py`` checks its error.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastpeft.ops.adapter import RATIONAL_COEFFS, rational_reference

RATIONAL_INITS = {
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
FIT_RANGE = (-3.0, 3.0)


@functools.lru_cache(maxsize=None)
def _fit(name: str) -> tuple:
    fn = RATIONAL_INITS[name]
    z = torch.linspace(*FIT_RANGE, 2001, dtype=torch.float64)
    y = fn(z)
    # Linearised start: P(z) - y * (b1 z + ... + b4 z^4) = y, linear in (a, b) (Q without the |.|).
    A = torch.stack([z**i for i in range(6)] + [-y * z**j for j in range(1, 5)], dim=1)
    start = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    c = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([c], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = (rational_reference(z, c) - y).square().mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return tuple(c.detach().tolist())


def fit_rational(name: str = "leaky_relu") -> torch.Tensor:
    """float64 [10] coefficients ``[a0..a5, b1..b4]`` of a rational approximating ``name`` on [-3, 3]
    (one of ``RATIONAL_INITS``: leaky_relu (slope 0.01), relu, gelu, silu, tanh)."""
    if name not in RATIONAL_INITS:
        raise ValueError(f"rational_init must be one of {sorted(RATIONAL_INITS)}, got {name!r}")
    coeffs = torch.tensor(_fit(name), dtype=torch.float64)
    assert coeffs.numel() == RATIONAL_COEFFS
    return coeffs
