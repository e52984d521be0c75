"""Sparse fine-tuning through ``fastpeft.get_peft_model``: BitFit and FishMask (methods peft lacks).

Both train a fixed subset of the model's *own* parameters in place, with
``fastpeft.optim.SparseMaskedAdamW`` (``FastPeftModel.create_optimizer``), so nothing is added to
the model and entries outside the mask are never written (bit-identical after training).

* ``BitFitConfig``: the bias terms (``which="all"``) or only the query and second-MLP biases
  (``which="query_mlp2"``); the checkpoint holds those bias tensors in full, under peft's keys.
* ``FishMaskConfig``: the ``keep_ratio`` fraction of weight entries with the largest empirical
  Fisher information on calibration batches given to ``get_peft_model(..., batches=...)``; the
  checkpoint holds, per trained tensor, the values at the mask (``<key>.sparse_values``) and the
  sorted flat indices (``<key>.sparse_indices``), so loading needs no batches.

``modules_to_save`` (the SEQ_CLS classifier head by default) are trained dense and saved in full.
bitsandbytes 4-bit weights cannot be trained entry-wise: BitFit works on 4-bit models (biases are
dense), FishMask raises naming the 4-bit modules unless they are excluded (``exclude=`` or
``skip_quantized=True``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from fastpeft.integrations.checkpoint import PEFT_PREFIX, CheckpointError
from fastpeft.integrations.registry import Injection, register_method
from fastpeft.optim import SparseMaskedAdamW, bitfit_mask, fisher_mask, validate_indices
from fastpeft.optim.masked_grads import MaskedGradsReport, remove_masked_weight_grads, use_masked_weight_grads
from fastpeft.optim.fisher import default_loss
from fastpeft.optim.masks import Mask, check_keep_ratio

VALUES_SUFFIX = ".sparse_values"
INDICES_SUFFIX = ".sparse_indices"


def _check_names(value, field: str) -> None:
    if value is None:
        return
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field} must be a list of module or parameter names, got {value!r}")


@dataclasses.dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2022): train only bias terms (plus ``modules_to_save`` in full).

    ``which``: ``"all"`` (every ``*.bias``, LayerNorm biases included) or ``"query_mlp2"`` (the query
    projection's and the second MLP layer's biases, the paper's smallest variant).
    ``modules_to_save``: modules trained and saved in full; ``task_type="SEQ_CLS"`` with none given
    saves ``["classifier", "score"]`` as peft does.
    """

    which: str = "all"
    modules_to_save: Optional[list] = None
    task_type: Optional[str] = None
    peft_type: str = "FASTPEFT_BITFIT"

    def __post_init__(self):
        if self.peft_type != "FASTPEFT_BITFIT":
            raise ValueError(f"BitFitConfig has peft_type 'FASTPEFT_BITFIT', got {self.peft_type!r}")
        if self.which not in ("all", "query_mlp2"):
            raise ValueError(f"BitFitConfig.which must be 'all' or 'query_mlp2', got {self.which!r}")
        _check_names(self.modules_to_save, "BitFitConfig.modules_to_save")

    def to_dict(self) -> dict:
        """The JSON-able fields (peft_type included), as saved in ``adapter_config.json``."""
        data = dataclasses.asdict(self)
        data["modules_to_save"] = None if self.modules_to_save is None else list(self.modules_to_save)
        return data


@dataclasses.dataclass
class FishMaskConfig:
    """FishMask (Sung et al. 2021): train the entries with the largest empirical Fisher information.

    ``keep_ratio`` in (0, 1]: fraction of the eligible entries kept (``scope="global"``: over all
    eligible tensors together; ``"per_layer"``: of every tensor). ``num_samples``: at most this many
    calibration batches are used (None: all given). ``exclude``: module or parameter names (a name
    matches itself and anything whose dotted path ends with it, e.g. ``"embed_tokens"``) never
    scored and kept frozen. ``skip_quantized``: leave 4-bit (non-floating) weights frozen instead of
    raising. ``modules_to_save``: trained dense, not scored (SEQ_CLS default: the classifier head).
    ``masked_weight_grads``: the masked ``nn.Linear`` weights get their gradient computed at the
    mask only (``fastpeft.optim.use_masked_weight_grads``: ``.grad`` is the dense masked gradient,
    zero off the mask, without the dense weight-gradient GEMM); False keeps the full dense gradient.
    """

    keep_ratio: float
    num_samples: Optional[int] = None
    scope: str = "global"
    exclude: tuple = ()
    skip_quantized: bool = False
    modules_to_save: Optional[list] = None
    masked_weight_grads: bool = True
    task_type: Optional[str] = None
    peft_type: str = "FASTPEFT_FISHMASK"

    def __post_init__(self):
        if self.peft_type != "FASTPEFT_FISHMASK":
            raise ValueError(f"FishMaskConfig has peft_type 'FASTPEFT_FISHMASK', got {self.peft_type!r}")
        check_keep_ratio(self.keep_ratio, "FishMaskConfig.keep_ratio")
        if self.num_samples is not None and (
            isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1
        ):
            raise ValueError(f"FishMaskConfig.num_samples must be a positive int or None, got {self.num_samples!r}")
        if self.scope not in ("global", "per_layer"):
            raise ValueError(f"FishMaskConfig.scope must be 'global' or 'per_layer', got {self.scope!r}")
        _check_names(self.exclude, "FishMaskConfig.exclude")
        self.exclude = tuple(self.exclude)  # JSON gives a list back
        if not isinstance(self.skip_quantized, bool):
            raise ValueError(f"FishMaskConfig.skip_quantized must be a bool, got {self.skip_quantized!r}")
        if not isinstance(self.masked_weight_grads, bool):
            raise ValueError(f"FishMaskConfig.masked_weight_grads must be a bool, got {self.masked_weight_grads!r}")
        _check_names(self.modules_to_save, "FishMaskConfig.modules_to_save")

    def to_dict(self) -> dict:
        """The JSON-able fields (peft_type included), as saved in ``adapter_config.json``."""
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        data["modules_to_save"] = None if self.modules_to_save is None else list(self.modules_to_save)
        return data

    def method_kwargs_from_checkpoint(self, model: nn.Module, tensors: dict, source: str) -> dict:
        """``fastpeft.from_pretrained``'s hook: the mask comes from the checkpoint's indices, so
        loading needs no calibration batches. Raises CheckpointError before the model is touched."""
        return {"mask": mask_from_checkpoint(model, tensors, source)}


# ---- names -------------------------------------------------------------------------------------


def _matches(path: str, targets: Iterable[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _names_under(model: nn.Module, targets, modules_only: bool = False) -> list:
    """Parameter names of the modules (or, unless ``modules_only``, parameters) named by
    ``targets``: a target matches a dotted path equal to it or ending with ``.<target>`` (peft's
    modules_to_save rule, the one get_peft_model applies)."""
    if not targets:
        return []
    out = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        last = len(parts) if modules_only else len(parts) + 1
        if any(_matches(".".join(parts[:i]), targets) for i in range(1, last)):
            out.append(name)
    return out


def _module_of(name: str) -> str:
    return name.rpartition(".")[0] or name


# ---- injection ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SparseInjection(Injection):
    """An Injection that also records its mask (parameter name -> sorted flat indices, or None
    for tensors trained in full) and, for FishMask with ``masked_weight_grads``, which layers
    compute masked weight gradients (``fastpeft.optim.MaskedGradsReport``)."""

    mask: Mask = dataclasses.field(default_factory=dict)
    masked_grads: Optional[MaskedGradsReport] = None


def trained_mask(fast) -> Mask:
    """The mask a BitFit / FishMask ``FastPeftModel`` trains: name (relative to the transformers
    model) -> sorted flat indices, or None for a tensor trained in full (biases, modules_to_save)."""
    injection = getattr(fast, "_injection", None)
    if not isinstance(injection, SparseInjection):
        raise ValueError("trained_mask needs a FastPeftModel made from a BitFitConfig or FishMaskConfig")
    return dict(injection.mask)


def _optimizer(model: nn.Module, mask: Mask) -> Callable:
    def make(params, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        # Parameters outside the mask (none, unless the caller made more trainable) are dense.
        return SparseMaskedAdamW(params, masks=[mask.get(names.get(id(p))) for p in params], **kwargs)

    return make


def _finish(model: nn.Module, mask: Mask, state_dict=None, load_state_dict=None) -> SparseInjection:
    for name, p in model.named_parameters():
        if name in mask:
            p.requires_grad_(True)
    return SparseInjection(
        parameter_names=list(mask),
        # The trained entries live in the base weights: there is nothing to remove or fold in.
        unload=lambda: model,
        merge_and_unload=lambda: model,
        state_dict=state_dict,
        load_state_dict=load_state_dict,
        optimizer=_optimizer(model, mask),
        trainable_count=lambda: _trained_entries(model, mask),
        mask=mask,
    )


def _trained_entries(model: nn.Module, mask: Mask) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() if idx is None else idx.numel() for n, idx in mask.items())


def _inject_bitfit(model: nn.Module, config: BitFitConfig) -> SparseInjection:
    config.__post_init__()  # a config mutated after construction is checked again
    saved = set(_names_under(model, config.modules_to_save, modules_only=True))
    biases = [n for n in bitfit_mask(model, config.which) if n not in saved]
    order = [n for n, _ in model.named_parameters()]
    mask: Mask = {n: None for n in order if n in saved or n in biases}
    # Default checkpoint: the listed tensors in full (get_peft_model appends modules_to_save).
    injection = _finish(model, mask)
    injection.parameter_names = biases
    return injection


def _check_given_mask(model: nn.Module, mask) -> Mask:
    if not isinstance(mask, dict) or not mask:
        raise ValueError(f"mask must be a non-empty dict of parameter name -> flat indices or None, got {mask!r}")
    params = dict(model.named_parameters())
    for name, idx in mask.items():
        if name not in params:
            raise ValueError(f"mask names parameter {name!r}, which {type(model).__name__} does not have")
        if not params[name].is_floating_point():
            raise NotImplementedError(f"mask names {name!r}, a {type(params[name]).__name__} (quantized) weight; "
                                      "SparseMaskedAdamW trains floating-point tensors only")  # fmt: skip
        if idx is not None:
            validate_indices(idx, params[name].numel(), f"mask[{name!r}]")
    return mask


def _fisher(model: nn.Module, config: FishMaskConfig, batches, loss_fn, saved: set) -> Mask:
    excluded = set(_names_under(model, config.exclude))
    quantized = [
        n for n, p in model.named_parameters() if not p.is_floating_point() and n not in excluded and n not in saved
    ]
    if quantized and not config.skip_quantized:
        modules = sorted({_module_of(n) for n in quantized})
        raise NotImplementedError(
            f"FishMask cannot train entries of quantized (4-bit) weights; these modules hold some: "
            f"{', '.join(modules[:8])}{' ...' if len(modules) > 8 else ''}. Set FishMaskConfig(skip_quantized=True) "
            "to keep them frozen (the mask then covers only floating-point parameters), list them in exclude=, or "
            "compute the mask on a dense copy and use fastpeft.nn.sparse_delta.apply_sparse_deltas."
        )
    return fisher_mask(model, batches, config.keep_ratio, config.scope, loss_fn or default_loss, config.num_samples,
                       include=lambda n, p: n not in excluded and n not in saved)  # fmt: skip


def _inject_fishmask(
    model: nn.Module,
    config: FishMaskConfig,
    batches: Optional[Iterable[Any]] = None,
    loss_fn: Optional[Callable] = None,
    mask: Optional[Mask] = None,
) -> SparseInjection:
    """``batches``: calibration batches for the Fisher score (``loss_fn(model, batch)`` -> scalar,
    default ``model(**batch).loss``); or ``mask``: a precomputed mask used as is (from_pretrained
    passes the checkpoint's)."""
    config.__post_init__()
    saved = set(_names_under(model, config.modules_to_save, modules_only=True))
    if mask is not None:
        if batches is not None or loss_fn is not None:
            raise ValueError("give FishMask either calibration batches= (and loss_fn=) or a precomputed mask=, "
                             "not both")  # fmt: skip
        mask = _check_given_mask(model, mask)
    elif batches is None:
        raise ValueError("FishMaskConfig needs calibration batches: get_peft_model(model, config, batches=[...]) "
                         "(each batch gives loss_fn(model, batch), default model(**batch).loss), or mask=")  # fmt: skip
    else:
        mask = _fisher(model, config, batches, loss_fn, saved)
    params = dict(model.named_parameters())
    noncontiguous = [n for n, idx in mask.items() if idx is not None and not params[n].is_contiguous()]
    if noncontiguous:
        raise ValueError(f"flat indices need contiguous parameters; these are not: {noncontiguous[:5]}")
    full: Mask = {}
    for name in params:  # model order, so optimizer state and checkpoint keys are stable
        if name in saved or (name in mask and mask[name] is None):
            full[name] = None
        elif name in mask and mask[name].numel():
            full[name] = mask[name]
    injection = _finish(model, full)
    if config.masked_weight_grads:
        injection.masked_grads = use_masked_weight_grads(model, full)

        def unload():
            remove_masked_weight_grads(model)
            return model

        injection.unload = injection.merge_and_unload = unload
    injection.state_dict = lambda: sparse_state_dict(model, full)
    injection.load_state_dict = lambda tensors: load_sparse_state_dict(model, full, tensors)
    return injection


# ---- checkpoints -------------------------------------------------------------------------------


def sparse_state_dict(model: nn.Module, mask: Mask) -> dict:
    """Checkpoint tensors of a sparse mask: ``base_model.model.<name>.sparse_values`` (the trained
    entries, parameter dtype) and ``.sparse_indices`` per masked tensor; dense ones in full."""
    params = dict(model.named_parameters())
    out = {}
    for name, idx in mask.items():
        p = params[name].detach()
        if idx is None:
            out[PEFT_PREFIX + name] = p
        else:
            out[PEFT_PREFIX + name + VALUES_SUFFIX] = p.reshape(-1).index_select(0, idx.to(p.device).long())
            out[PEFT_PREFIX + name + INDICES_SUFFIX] = idx
    return out


def mask_from_checkpoint(model: nn.Module, tensors: dict, source: str = "the checkpoint") -> Mask:
    """The sparse part of a FishMask checkpoint's mask (its ``.sparse_indices``), checked against
    ``model``: known floating-point parameters, integer 1-D sorted in-range indices."""
    params = dict(model.named_parameters())
    mask: Mask = {}
    for key in sorted(tensors):
        if not key.endswith(INDICES_SUFFIX):
            continue
        name = key[len(PEFT_PREFIX) : -len(INDICES_SUFFIX)] if key.startswith(PEFT_PREFIX) else None
        if name not in params:
            raise CheckpointError(f"the adapter in {source} does not fit this model: {key} names no parameter of it")
        if not params[name].is_floating_point():
            raise CheckpointError(f"the adapter in {source} has sparse entries of {name!r}, a quantized weight")
        try:
            mask[name] = validate_indices(tensors[key], params[name].numel(), key)
        except ValueError as exc:
            raise CheckpointError(f"the adapter in {source} is invalid: {exc}") from exc
    if not mask:
        raise CheckpointError(f"the adapter in {source} has no '*{INDICES_SUFFIX}' tensors: not a FishMask checkpoint")
    return mask


@torch.no_grad()
def load_sparse_state_dict(model: nn.Module, mask: Mask, tensors: dict, source: str = "the checkpoint") -> None:
    """Write a checkpoint from ``sparse_state_dict`` into the base weights. Everything is checked
    first (keys, indices equal to ``mask``'s, value counts, shapes, float dtypes); on any problem
    CheckpointError is raised and nothing has changed."""
    params = dict(model.named_parameters())
    expected = sparse_state_dict(model, mask)
    problems = []
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    for key in sorted(set(expected) & set(tensors)):
        got, want = tensors[key], expected[key]
        if key.endswith(INDICES_SUFFIX):
            if got.dtype not in (torch.int32, torch.int64) or not torch.equal(got.long(), want.to(got.device).long()):
                problems.append(f"{key} differs from this model's mask")
        elif not torch.is_floating_point(got):
            problems.append(f"{key} is {got.dtype}, not floating point")
        elif got.shape != want.shape:
            problems.append(f"{key}: saved {tuple(got.shape)}, model has {tuple(want.shape)}")
    if problems:
        raise CheckpointError(f"the adapter in {source} does not fit this model: " + "; ".join(problems))
    for name, idx in mask.items():
        p = params[name]
        if idx is None:
            p.copy_(tensors[PEFT_PREFIX + name].to(p.dtype))
        else:
            values = tensors[PEFT_PREFIX + name + VALUES_SUFFIX].to(device=p.device, dtype=p.dtype)
            p.view(-1).index_copy_(0, idx.to(p.device).long(), values)


register_method("FASTPEFT_BITFIT", _inject_bitfit, BitFitConfig)
register_method("FASTPEFT_FISHMASK", _inject_fishmask, FishMaskConfig)
