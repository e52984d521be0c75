"""Probing through ``fastpeft.get_peft_model``: a frozen encoder, a trained head on one layer's output.

    config = ProbingConfig(layer=-1, head="linear", pooling="mean", num_labels=4)
    model = fastpeft.get_peft_model(bert_for_sequence_classification, config)
    opt = model.create_optimizer(lr=1e-2)                     # the head's parameters only
    out = model(**batch, labels=labels); out.loss.backward()  # out.logits [B, num_labels]

``layer`` counts as transformers' ``output_hidden_states`` does: 0 is the embedding output, k the
output of encoder layer k (1-based), -1 the last layer. The features are pooled ("cls": the first
token; "mean": the mean over the tokens ``attention_mask`` keeps) and fed to a ``ProbingHead``
(``fastpeft.nn.probing``: linear, or Linear -> act -> dropout -> Linear), registered on the
FastPeftModel as ``probe_head``. The model's own head (``classifier``, ``pooler``) is not run.

How the encoder runs (the memory and time rules of probing):

* under ``torch.no_grad()``: autograd records nothing of the encoder, so backward keeps only the
  head's input ([B, hidden]) and the head's own activations, never a [B, T, hidden] tensor.
* in eval mode (no dropout): a frozen feature extractor gives the same features every epoch. The
  training flags of the encoder's modules are restored when the call ends, however it ends.
* stopped at the chosen layer: a forward hook on encoder layer k (a pre-hook on layer 1 for
  ``layer=0``) records its output and raises a private exception that the probe catches, so layers
  after k and the model's pooler never run. The hook is removed in a ``finally``, so an error in the
  encoder (or a KeyboardInterrupt) leaves the model without hooks and with its training flags. The
  encoder layers are found as the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules
  (``encoder.layer`` of BERT); models without one run in full with ``output_hidden_states=True``.
  Layer k's output is taken before any final norm a pre-norm decoder applies after its last layer.

Checkpoints: ``probe_head.<parameter>`` tensors (``probe_head.net.1.weight`` ...) and the config,
with ``num_labels`` / ``hidden`` resolved from the model at injection. ``unload()`` returns the
untouched model (nothing was changed in it); ``merge_and_unload()`` raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import nn

from fastpeft.integrations.config_checks import is_int
from fastpeft.integrations.registry import Injection, register_method
from fastpeft.nn.probing import ACTIVATIONS, HEADS, POOLINGS, ProbingHead, pool

PEFT_TYPE = "FASTPEFT_PROBING"
HEAD_NAME = "probe_head"


@dataclasses.dataclass
class ProbingConfig:
    """A probe for ``fastpeft.get_peft_model`` (see the module docstring).

    ``layer``: which hidden state (0 = embeddings, k = encoder layer k, negative counts from the end;
    -1 = last). ``head``: "linear" or "mlp". ``pooling``: "cls" or "mean". ``num_labels``: None =
    ``model.config.num_labels``; 1 is regression (MSE loss), more is classification (cross-entropy).
    ``hidden``: the MLP's width (None: the model's hidden size; must be None for a linear head).
    ``activation``: the MLP's (relu, gelu, tanh, silu). ``dropout``: on the head input (linear) or
    after the activation (mlp).
    """

    layer: int = -1
    head: str = "linear"
    pooling: str = "cls"
    num_labels: Optional[int] = None
    hidden: Optional[int] = None
    activation: str = "relu"
    dropout: float = 0.0
    task_type: Optional[str] = None
    peft_type: str = PEFT_TYPE

    def __post_init__(self):
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"ProbingConfig has peft_type {PEFT_TYPE!r}, got {self.peft_type!r}")
        if not is_int(self.layer):
            raise ValueError(f"layer must be an int (a hidden-state index: 0 = embeddings, -1 = last), got {self.layer!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.num_labels is not None and (not is_int(self.num_labels) or self.num_labels < 1):
            raise ValueError(f"num_labels must be an int >= 1 (or None), got {self.num_labels!r}")
        if self.hidden is not None and (not is_int(self.hidden) or self.hidden < 1):
            raise ValueError(f"hidden must be an int >= 1 (or None), got {self.hidden!r}")
        if self.head == "linear" and self.hidden is not None:
            raise ValueError("hidden is the MLP head's width; a linear head has none (use head='mlp')")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        """The JSON-able fields (``peft_type`` included); ``ProbingConfig(**to_dict())`` rebuilds it."""
        return dataclasses.asdict(self)


# ---- running the encoder up to a layer ------------------------------------------------------------


class _StopAtLayer(Exception):
    """Raised by the probe's hook once the chosen layer's output is recorded; caught by the probe."""


def encoder_layers(body: nn.Module) -> Optional[nn.ModuleList]:
    """The encoder's layer list: the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules (None if absent)."""
    config = getattr(body, "config", None)
    n = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in body.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and n]
    preferred = [m for name, m in lists if name.split(".")[-1] in ("layer", "layers", "h", "block")]
    return (preferred or [m for _, m in lists] or [None])[0]


def resolve_layer(layer: int, num_layers: int) -> int:
    """``layer`` as an index in [0, num_layers] (0 = embeddings); ValueError naming ``layer`` if out of range."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer must be in [{-(num_layers + 1)}, {num_layers}] for a model with {num_layers} layers "
                         f"(0 = embeddings, -1 = last layer), got {layer}")  # fmt: skip
    return layer % (num_layers + 1)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def hidden_state_at(body: nn.Module, layer: int, **inputs) -> torch.Tensor:
    """Hidden states [B, T, d] of ``body`` (a transformers base model) at ``layer`` (an index in
    [0, num_layers]), without running the layers after it. Runs in whatever grad mode the caller set."""
    layers = encoder_layers(body)
    if layers is None or len(layers) == 0:
        return body(**inputs, output_hidden_states=True, return_dict=True).hidden_states[layer]
    captured = {}

    def after_layer(module, args, output):
        captured["h"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _StopAtLayer

    def before_first(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _StopAtLayer

    if layer == 0:
        handle = layers[0].register_forward_pre_hook(before_first, with_kwargs=True)
    else:
        handle = layers[layer - 1].register_forward_hook(after_layer)
    try:
        body(**inputs)
    except _StopAtLayer:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"{type(body).__name__} finished its forward without running encoder layer {layer}")
    return captured["h"]


def probe_features(body: nn.Module, layer: int, pooling: str, input_ids=None, attention_mask=None,
                   **inputs) -> torch.Tensor:
    """Pooled features [B, d] of a frozen encoder at ``layer`` (index in [0, num_layers]): no_grad,
    eval mode, stopped at the layer (see the module docstring)."""
    with torch.no_grad(), _eval_mode(body):
        h = hidden_state_at(body, layer, input_ids=input_ids, attention_mask=attention_mask, **inputs)
        return pool(h, attention_mask, pooling)


# ---- injection ----------------------------------------------------------------------------------------


def _inject(model: nn.Module, config: ProbingConfig) -> Injection:
    config.__post_init__()
    body = getattr(model, "base_model", model)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = encoder_layers(body)
    num_layers = len(layers) if layers is not None else text_config.num_hidden_layers
    layer = resolve_layer(config.layer, num_layers)
    num_labels = config.num_labels if config.num_labels is not None else getattr(model.config, "num_labels", None)
    if not is_int(num_labels) or num_labels < 1:
        raise ValueError(f"num_labels: set it in the ProbingConfig ({type(model).__name__}.config has none)")
    d = text_config.hidden_size
    hidden = config.hidden if config.head == "linear" or config.hidden is not None else d
    weight = model.get_input_embeddings().weight
    head = ProbingHead(d, num_labels, config.head, None if config.head == "linear" else hidden, config.activation,
                       config.dropout, device=weight.device,
                       dtype=weight.dtype if weight.is_floating_point() else None)  # fmt: skip
    config.num_labels, config.hidden = num_labels, hidden  # saved resolved: from_pretrained rebuilds this head

    def forward(inner: nn.Module, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        features = probe_features(getattr(inner, "base_model", inner), layer, config.pooling, input_ids=input_ids,
                                  attention_mask=attention_mask, **kwargs)  # fmt: skip
        p = next(head.parameters())
        logits = head(features.to(p.dtype))
        loss = None
        if labels is not None:
            if num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def merge_unsupported():
        raise NotImplementedError("a probe is a separate head; there is nothing to merge into the encoder. "
                                  "unload() returns the untouched model, model.probe_head is the head")  # fmt: skip

    return Injection(
        parameter_names=[],
        unload=lambda: model,
        merge_and_unload=merge_unsupported,
        state_dict=lambda: {f"{HEAD_NAME}.{n}": p for n, p in head.named_parameters()},
        forward=forward,
        owned_modules={HEAD_NAME: head},
    )


register_method(PEFT_TYPE, _inject, ProbingConfig)
