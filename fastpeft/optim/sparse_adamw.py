"""SparseMaskedAdamW: AdamW whose state exists only for the masked entries of each parameter."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from fastpeft.ops.sparse_optim import sparse_adamw_step, sparse_adamw_step_reference
from fastpeft.optim.masks import Mask, validate_indices

_KERNEL_DEVICES = ("cpu", "cuda")


def state_bytes_formula(trained_entries: int, index_bytes: int, tensors: int) -> int:
    """Bytes of SparseMaskedAdamW state: float32 exp_avg and exp_avg_sq per trained entry (8 B),
    its index (4 B for int32 masks, 8 B for int64, 0 for dense entries), and one float32 step
    counter per tensor."""
    return 8 * trained_entries + index_bytes + 4 * tensors


class SparseMaskedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) on a fixed sparse subset of each parameter's entries.

    ``masks`` gives, for each parameter in the order of ``params`` (all groups, flattened),
    sorted flat int32/int64 indices of the entries to train, or ``None`` to train every entry.
    Param groups may instead carry their own ``"masks"`` list. The optimizer state of a
    parameter is float32 ``exp_avg`` and ``exp_avg_sq`` of one entry per trained entry, the
    ``indices`` and a float32 ``step``: 8 bytes per trained entry plus its index, nothing of the
    parameter's dense size (see ``state_bytes``). The update reads the dense ``.grad`` at the
    indices, applies torch.optim.AdamW's formulas in float32 (for float32, float16 and bfloat16
    parameters alike) and writes the entries back in place: one fused launch over all tensors of
    a dtype on CUDA, one parallel loop on CPU. Entries outside the mask are never written, so
    they stay bit-identical, also with weight decay.

    AMP: ``torch.amp.GradScaler.step(optimizer)`` hands this optimizer the scale and the
    found-inf flag (``_step_supports_amp_scaling``); gradients are unscaled inside the kernel
    and the whole step is skipped on inf/nan without a host sync. The gradients themselves are
    left scaled.

    ``state_dict()`` holds only tensors and numbers (the masks included), so
    ``torch.load(..., weights_only=True)`` reads it; ``load_state_dict`` validates it and the
    checkpoint's masks replace the ones given at construction.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
        lr: float = 1e-3,
        betas: "tuple[float, float]" = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if isinstance(lr, torch.Tensor):
            raise ValueError("lr must be a float (a tensor lr is not supported)")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        flat = [p for g in self.param_groups for p in g["params"]]
        if masks is not None:
            masks = list(masks)
            if any("masks" in g for g in self.param_groups):
                raise ValueError("give masks either as the masks argument or per param group, not both")
            if len(masks) != len(flat):
                raise ValueError(f"masks must have one entry (indices or None) per parameter: got {len(masks)} "
                                 f"masks for {len(flat)} parameters")  # fmt: skip
        else:
            masks = []
            for g in self.param_groups:
                group_masks = g.get("masks", [None] * len(g["params"]))
                if len(group_masks) != len(g["params"]):
                    raise ValueError(f"a param group has {len(g['params'])} params but {len(group_masks)} masks")
                masks.extend(group_masks)
        for g in self.param_groups:
            g.pop("masks", None)
        for i, (p, idx) in enumerate(zip(flat, masks)):
            self._init_state(p, idx, f"masks[{i}]")

    @classmethod
    def from_mask(cls, model: nn.Module, mask: Mask, freeze_others: bool = True, **kwargs) -> "SparseMaskedAdamW":
        """An optimizer over the parameters ``mask`` names, with their masks. With
        ``freeze_others`` every other parameter gets ``requires_grad=False`` (no dense gradient is
        computed for it) and the masked ones ``requires_grad=True``."""
        params = dict(model.named_parameters())
        unknown = [n for n in mask if n not in params]
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {unknown[:5]}")
        if not mask:
            raise ValueError("the mask is empty: nothing to train")
        if freeze_others:
            for n, p in params.items():
                p.requires_grad_(n in mask)
        names = [n for n in params if n in mask]  # model order, so the state order is stable
        return cls([params[n] for n in names], masks=[mask[n] for n in names], **kwargs)

    def _init_state(self, p: torch.Tensor, indices: Optional[torch.Tensor], name: str) -> None:
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise ValueError(f"{name}: parameters must be floating-point tensors")
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: parameter dtype must be float32, float16 or bfloat16, got {p.dtype}")
        state = self.state[p]
        if indices is not None:
            indices = validate_indices(indices, p.numel(), name).to(p.device)
            state["indices"] = indices
        count = p.numel() if indices is None else indices.numel()
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros(count, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(count, dtype=torch.float32, device=p.device)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (indices, moments and step counters), measured."""
        seen = set()
        total = 0
        for state in self.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        return total

    @torch.no_grad()
    def step(self, closure=None):
        """One fused AdamW update of the masked entries of every parameter (untrained entries untouched)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            by_device: Dict[torch.device, List[list]] = defaultdict(lambda: [[] for _ in range(6)])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SparseMaskedAdamW needs dense gradients; got a sparse .grad")
                s = self.state[p]
                lists = by_device[p.device]
                for lst, t in zip(lists, (p, p.grad, s.get("indices"), s["exp_avg"], s["exp_avg_sq"], s["step"])):
                    lst.append(t)
            beta1, beta2 = group["betas"]
            for device, (params, grads, indices, exp_avgs, exp_avg_sqs, steps) in by_device.items():
                scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
                inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
                torch._foreach_add_(steps, 1)
                step_fn = sparse_adamw_step if device.type in _KERNEL_DEVICES else sparse_adamw_step_reference
                step_fn(params, grads, indices, exp_avgs, exp_avg_sqs, steps, group["lr"], beta1, beta2,
                        group["eps"], group["weight_decay"], scale, inf)  # fmt: skip
                if inf is not None:
                    # A skipped step does not count, as in torch's fused AdamW (found_inf is a sum
                    # over devices, hence the != 0).
                    skipped = (inf != 0).to(torch.float32).reshape(())
                    torch._foreach_sub_(steps, [skipped] * len(steps))
        return loss

    # ---- checkpoints -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict from ``state_dict()``: same number of groups and parameters; every
        state entry is checked (int32/int64 sorted in-range indices, float32 moments of one entry
        per trained entry, a float32 step) and moved to its parameter's device. Unlike
        torch.optim.Optimizer, no tensor is cast to the parameter dtype (the moments stay float32
        and the indices integers)."""
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict must have 'state' (dict) and 'param_groups' (list)")
        if len(saved_groups) != len(groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
        id_map = {}
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"param group {i} has {len(g['params'])} params, the state_dict's {len(sg['params'])}")
            id_map.update(zip(sg["params"], g["params"]))
        new_state = defaultdict(dict)
        for key, s in saved_state.items():
            if key not in id_map:
                raise ValueError(f"state_dict has state for parameter id {key}, which no param group lists")
            p = id_map[key]
            new_state[p] = self._checked_state(p, s, f"state[{key}]")
        missing = [p for g in groups for p in g["params"] if p not in new_state]
        if missing:
            raise ValueError(f"state_dict lacks the state of {len(missing)} parameters")
        for g, sg in zip(groups, saved_groups):
            g.update({k: v for k, v in sg.items() if k != "params"})
        self.state = new_state

    @staticmethod
    def _checked_state(p: torch.Tensor, s: dict, name: str) -> dict:
        expected = {"step", "exp_avg", "exp_avg_sq"}
        keys = set(s)
        if not expected <= keys or not keys <= expected | {"indices"}:
            raise ValueError(f"{name} must have keys step, exp_avg, exp_avg_sq (and indices), got {sorted(keys)}")
        out = {}
        count = p.numel()
        if "indices" in s:
            # Copies, so an optimizer never shares state with the dict it was loaded from.
            indices = validate_indices(s["indices"], p.numel(), f"{name}['indices']")
            out["indices"] = indices.to(device=p.device, copy=True)
            count = out["indices"].numel()
        for k in ("exp_avg", "exp_avg_sq"):
            t = s[k]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (count,):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}['{k}'] must be float32 of shape ({count},), got {got}")
            out[k] = t.to(device=p.device, memory_format=torch.contiguous_format, copy=True)
        step = s["step"]
        if not isinstance(step, torch.Tensor) or step.numel() != 1:
            raise ValueError(f"{name}['step'] must be a tensor with one element")
        out["step"] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
        return out
