"""Sparse-masked AdamW step: the op wrapper, its fake kernel and the plain-PyTorch reference.

``torch.ops.fastpeft.sparse_adamw_step_`` updates, for every parameter ``i``, only the entries at
``indices[i]`` (sorted flat int32/int64 indices; ``None`` = every entry). The Adam moments are
float32 vectors with one entry per trained entry, whatever the parameter dtype, and the
parameter is updated in float32 and rounded once. Untrained entries are never read or written,
so they stay bit-identical, weight decay included. One launch covers all tensors of a dtype on
CUDA; on CPU one parallel loop covers them all.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.library.register_fake("fastpeft::sparse_adamw_step_")
def _(params, grads, indices, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, grad_scale=None,
      found_inf=None):  # fmt: skip
    return None


def sparse_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[Optional[torch.Tensor]],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One AdamW step on the masked entries of ``params``, in place.

    ``steps[i]`` is a float32 scalar tensor holding the step number to use (incremented by the
    caller, as torch.optim does). ``grad_scale`` / ``found_inf`` are the float32 scalars of
    ``torch.amp.GradScaler``: gradients are divided by ``grad_scale``, and nothing changes when
    ``found_inf`` is nonzero. All tensors are on one device.
    """
    if len(params) == 0:
        return  # nothing to update, and no tensor for the dispatcher to pick a device from
    torch.ops.fastpeft.sparse_adamw_step_(
        list(params), list(grads), list(indices), list(exp_avgs), list(exp_avg_sqs), list(steps),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), grad_scale, found_inf,
    )  # fmt: skip


def sparse_adamw_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    indices: Sequence[Optional[torch.Tensor]],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """``sparse_adamw_step`` in plain PyTorch: gather, torch.optim.AdamW's formulas in float32, scatter.

    Also what runs on devices without a fastpeft kernel.
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    for p, g, idx, m, v, step in zip(params, grads, indices, exp_avgs, exp_avg_sqs, steps):
        flat_p = p.view(-1)
        g = g.reshape(-1)
        if idx is not None:
            idx = idx.long()
            g = g[idx]
        pv = (flat_p[idx] if idx is not None else flat_p).float()
        g = g.float()
        if grad_scale is not None:
            g = g / grad_scale.float()
        n = float(step.item())
        bias_correction1 = 1 - beta1**n
        bias_correction2_sqrt = (1 - beta2**n) ** 0.5
        pv = pv * (1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        pv = pv.addcdiv(m, denom, value=-(lr / bias_correction1))
        if idx is not None:
            flat_p[idx] = pv.to(p.dtype)
        else:
            flat_p.copy_(pv.to(p.dtype))
