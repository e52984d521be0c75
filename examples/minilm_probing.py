"""Probing and MAD-X for the main job (finetune_minilm.py --method probing | madx).

* probing: fastpeft's ``ProbingConfig``: MiniLM frozen, a linear head on the mean-pooled output of
  encoder layer ``PROBE_LAYER``; the encoder runs under no_grad and stops at that layer. Its peer is
  the plain-PyTorch practice it replaces (``FrozenEncoderProbe``): the same model with every encoder
  parameter ``requires_grad=False``, a full forward with ``output_hidden_states=True``, the same
  hidden state pooled the same way, the same head (same initial weights).
* madx: fastpeft's ``InvertibleAdapterConfig`` with Pfeiffer bottleneck adapters (MAD-X's invertible +
  language adapter) and the classifier trained. MiniLM here is a sequence classifier with no LM head, so
  only the embedding-side invertible adapter is installed (as the adapters library does for
  classification heads); the inverse belongs to the MLM head (tested on BertForMaskedLM). No peer: the
  adapters library does not run with transformers 5.17.
"""

from __future__ import annotations

import copy

from torch import nn

# Layer 4 of MiniLM's 6: the run stops two layers early (the mechanism the method adds); see docs/probing.md.
PROBE_LAYER = 4
PROBE_POOLING = "mean"  # all-MiniLM-L6-v2 is a mean-pooling sentence encoder


def probing_config(args):
    import fastpeft

    return fastpeft.ProbingConfig(layer=PROBE_LAYER, head="linear", pooling=PROBE_POOLING)


def madx_config(args):
    import fastpeft

    return fastpeft.InvertibleAdapterConfig(
        kind="nice", reduction_factor=2,
        bottleneck_adapter=fastpeft.BottleneckAdapterConfig(reduction_factor=16, non_linearity="relu",
                                                            placement="pfeiffer"),
        modules_to_save=["classifier"], task_type="SEQ_CLS",
    )  # fmt: skip


class FrozenEncoderProbe(nn.Module):
    """The plain probing practice: a frozen transformers model (every parameter ``requires_grad=False``)
    run in full with ``output_hidden_states=True``, hidden state ``layer`` pooled, ``head`` trained. The
    encoder stays in eval mode (a frozen feature extractor), as in fastpeft's probe."""

    def __init__(self, model: nn.Module, head: nn.Module, layer: int, pooling: str):
        super().__init__()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.head, self.layer, self.pooling = model, head, layer, pooling

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, output_hidden_states=True)  # fmt: skip
        h = out.hidden_states[self.layer]
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def probing_peer(base: nn.Module, fast_model, config) -> nn.Module:
    """The plain practice with fastpeft's probe head weights (a copy of its plain nn.Sequential)."""
    return FrozenEncoderProbe(base, copy.deepcopy(fast_model.probe_head.net), config.layer, config.pooling)
