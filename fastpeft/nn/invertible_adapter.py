"""MAD-X invertible adapters (Pfeiffer et al. 2020): an invertible coupling block on the embedding
output, its exact inverse on the LM head input.

The hidden vector is split into halves ``x = [x1, x2]`` (d/2 each). Two small MLPs ``f`` and ``g``
(``Linear(d/2, r) -> act -> Linear(r, ...)``, ``r = (d/2) // reduction_factor``) couple them:

* ``kind="nice"`` (additive, the adapters library's ``NICECouplingBlock``)::

      y1 = x1 + f(x2);             y2 = x2 + g(y1)
      x2 = y2 - g(y1);             x1 = y1 - f(x2)           (inverse)

* ``kind="glow"`` (affine, the library's ``GLOWCouplingBlock``; RealNVP/Glow): ``f`` and ``g``
  output a log-scale and a shift ``(s, t)``, the scale softly clamped,
  ``e(s) = exp(clamp * 0.636 * atan(s / clamp))`` (the library's clamp; 0.636 ~ 2/pi, so the
  log-scale stays in (-clamp, clamp))::

      (s2, t2) = f(x2); y1 = e(s2) * x1 + t2;    (s1, t1) = g(y1); y2 = e(s1) * x2 + t1
      inverse: x2 = (y2 - t1) / e(s1) with (s1, t1) = g(y1);  x1 = (y1 - t2) / e(s2) with (s2, t2) = f(x2)

Both directions are exact up to rounding (nothing is approximated), so ``inverse(forward(x)) == x``
to fp32 precision. Plain PyTorch (batched GEMMs); no fused op: the block is two r-wide MLPs on the
embedding output and the head input, once per forward, far off the hot path of the encoder layers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("nice", "glow")
ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
# The adapters library's GLOWCouplingBlock writes 2/pi as 0.636; kept for parity with its weights.
_ATAN_SCALE = 0.636


def check_adapter_ids(adapter_ids, num_adapters: int, batch: int, device) -> Optional[torch.Tensor]:
    """Validate a per-example bank index: None is allowed only for a bank of one; otherwise a 1-D
    integer tensor of ``batch`` entries in ``[0, num_adapters)``. Returns it on ``device``."""
    if adapter_ids is None:
        if num_adapters > 1:
            raise ValueError(f"adapter_ids is required for a bank of num_adapters={num_adapters}: pass a [batch] "
                             "integer tensor picking each example's adapter")  # fmt: skip
        return None
    ids = torch.as_tensor(adapter_ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"adapter_ids must be a 1-D integer tensor [batch], got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] != batch:
        raise ValueError(f"adapter_ids has {ids.shape[0]} entries for a batch of {batch}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_adapters):
        raise ValueError(f"adapter_ids values must be in [0, {num_adapters}), got {ids.tolist()}")
    return ids.to(device=device, dtype=torch.long)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, L, in] through bank entry 0 (ids None) or entry ids[b] for example b: one (batched) GEMM."""
    w, b = weight.to(x.dtype), bias.to(x.dtype)
    if ids is None:
        return F.linear(x, w[0], b[0])
    return torch.baddbmm(b[ids].unsqueeze(1), x, w[ids].transpose(1, 2))


class InvertibleAdapter(nn.Module):
    """``forward(x, adapter_ids=None)`` / ``inverse(y, adapter_ids=None)``: the MAD-X invertible
    coupling block (see the module docstring for the maths) over the last dimension of ``x``
    ``[B, ..., hidden]``.

    ``hidden`` must be even (the two halves share one shape, so a bank is two tensors per
    projection). ``reduction_factor``: the MLPs' width is ``(hidden / 2) // reduction_factor``
    (the adapters library's ``inv_adapter_reduction_factor``, default 2). ``kind``: "nice"
    (additive) or "glow" (affine, scale clamped by ``clamp``). ``non_linearity``: relu (the
    library's default), gelu, silu / swish or tanh.

    ``num_adapters=N`` holds a bank (one invertible adapter per language): ``adapter_ids`` [B]
    picks each example's entry, and the same ids must be passed to ``inverse``. Parameters (banks,
    N first; h = hidden / 2, o = h for nice, 2h for glow): ``f_down_weight`` [N, r, h],
    ``f_down_bias`` [N, r], ``f_up_weight`` [N, o, r], ``f_up_bias`` [N, o], and the same for
    ``g``. ``f`` reads the second half and updates the first, ``g`` reads the updated first half
    and updates the second. Initialised as ``nn.Linear`` (the library's default).

    Autograd keeps what the plain-PyTorch MLPs need (their inputs and r-wide activations).
    """

    def __init__(self, hidden: int, reduction_factor: float = 2, kind: str = "nice", num_adapters: int = 1,
                 non_linearity: str = "relu", clamp: float = 5.0, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 2:
            raise ValueError(f"hidden must be an int >= 2, got {hidden!r}")
        if hidden % 2:
            raise ValueError(f"hidden must be even: the coupling splits the hidden vector into two equal halves, "
                             f"got hidden={hidden}")  # fmt: skip
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) \
                or not reduction_factor > 0:  # fmt: skip
            raise ValueError(f"reduction_factor must be a number > 0, got {reduction_factor!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be an int >= 1, got {num_adapters!r}")
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {tuple(ACTIVATIONS)}, got {non_linearity!r}")
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0:
            raise ValueError(f"clamp must be a number > 0, got {clamp!r}")
        half = hidden // 2
        r = int(half // reduction_factor)
        if r < 1:
            raise ValueError(f"reduction_factor={reduction_factor!r} leaves no hidden units for half size {half} "
                             f"(hidden={hidden}); use a smaller reduction_factor")  # fmt: skip
        self.hidden, self.half, self.width = hidden, half, r
        self.reduction_factor, self.kind, self.num_adapters = reduction_factor, kind, num_adapters
        self.non_linearity, self.clamp = non_linearity, float(clamp)
        out = half if kind == "nice" else 2 * half
        opts = dict(device=device, dtype=dtype)
        for net in ("f", "g"):
            self.register_parameter(f"{net}_down_weight", nn.Parameter(torch.empty(num_adapters, r, half, **opts)))
            self.register_parameter(f"{net}_down_bias", nn.Parameter(torch.empty(num_adapters, r, **opts)))
            self.register_parameter(f"{net}_up_weight", nn.Parameter(torch.empty(num_adapters, out, r, **opts)))
            self.register_parameter(f"{net}_up_bias", nn.Parameter(torch.empty(num_adapters, out, **opts)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation for every bank entry (the adapters library's)."""
        with torch.no_grad():
            for net in ("f", "g"):
                for part in ("down", "up"):
                    weight, bias = getattr(self, f"{net}_{part}_weight"), getattr(self, f"{net}_{part}_bias")
                    bound = 1.0 / math.sqrt(weight.shape[2])
                    for i in range(self.num_adapters):
                        nn.init.kaiming_uniform_(weight[i], a=math.sqrt(5))
                    bias.uniform_(-bound, bound)

    def load_adapter(self, index: int, f: nn.Sequential, g: nn.Sequential) -> None:
        """Copy one coupling block's MLPs (``Sequential(Linear, act, Linear)``) into bank entry
        ``index``: for the adapters library's ``NICECouplingBlock`` pass ``F``, ``G``; for its
        ``GLOWCouplingBlock`` pass ``s2``, ``s1`` (s2 reads x2 and updates x1, as ``f`` does)."""
        with torch.no_grad():
            for net, seq in (("f", f), ("g", g)):
                linears = [m for m in seq if isinstance(m, nn.Linear)]
                if len(linears) != 2:
                    raise ValueError(f"{net} must hold two nn.Linear layers (down, up), got {len(linears)}")
                for part, lin in zip(("down", "up"), linears):
                    getattr(self, f"{net}_{part}_weight")[index].copy_(lin.weight)
                    getattr(self, f"{net}_{part}_bias")[index].copy_(lin.bias)

    def _mlp(self, net: str, x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        p = lambda name: getattr(self, f"{net}_{name}")  # noqa: E731
        h = ACTIVATIONS[self.non_linearity](_linear(x, p("down_weight"), p("down_bias"), ids))
        return _linear(h, p("up_weight"), p("up_bias"), ids)

    def _scale(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.clamp * _ATAN_SCALE * torch.atan(s / self.clamp))

    def _prepare(self, x: torch.Tensor, adapter_ids, name: str):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"{name} must be a tensor [batch, ..., hidden], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")  # fmt: skip
        if x.shape[-1] != self.hidden:
            raise ValueError(f"{name} has last dimension {x.shape[-1]}, this adapter's hidden is {self.hidden}")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ids = check_adapter_ids(adapter_ids, self.num_adapters, x.shape[0], x.device)
        flat = x.to(dtype).reshape(x.shape[0], math.prod(x.shape[1:-1]), self.hidden)  # [B, L, d]: one GEMM batch per example
        return flat[..., : self.half], flat[..., self.half :], ids

    def forward(self, x: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The coupling ``x -> y`` (embedding side); ``adapter_ids`` [B] picks each example's bank entry."""
        x1, x2, ids = self._prepare(x, adapter_ids, "x")
        if self.kind == "nice":
            y1 = x1 + self._mlp("f", x2, ids)
            y2 = x2 + self._mlp("g", y1, ids)
        else:
            s2, t2 = self._mlp("f", x2, ids).split(self.half, dim=-1)
            y1 = self._scale(s2) * x1 + t2
            s1, t1 = self._mlp("g", y1, ids).split(self.half, dim=-1)
            y2 = self._scale(s1) * x2 + t1
        return torch.cat((y1, y2), dim=-1).reshape(x.shape[:-1] + (self.hidden,))

    def inverse(self, y: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact inverse ``y -> x`` (LM head side); pass the ``adapter_ids`` the forward got."""
        y1, y2, ids = self._prepare(y, adapter_ids, "y")
        if self.kind == "nice":
            x2 = y2 - self._mlp("g", y1, ids)
            x1 = y1 - self._mlp("f", x2, ids)
        else:
            s1, t1 = self._mlp("g", y1, ids).split(self.half, dim=-1)
            x2 = (y2 - t1) / self._scale(s1)
            s2, t2 = self._mlp("f", x2, ids).split(self.half, dim=-1)
            x1 = (y1 - t2) / self._scale(s2)
        return torch.cat((x1, x2), dim=-1).reshape(y.shape[:-1] + (self.hidden,))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, kind={self.kind}, width={self.width}, non_linearity={self.non_linearity}, "
                f"num_adapters={self.num_adapters}" + (f", clamp={self.clamp:g}" if self.kind == "glow" else ""))
