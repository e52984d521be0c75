"""WARP (Hambardzumyan et al. 2021): trainable prompt tokens around the input and a ``[MASK]``,
trainable class embeddings scored against the mask position's output.

* ``warp_layout``: turns tokenizer output ``[CLS] x [SEP]`` (right-padded) into
  ``[CLS] P_1..P_k x P_k+1..P_m [MASK] [SEP]`` token ids, with the positions of the m prompt slots
  and of the mask (k = ``num_before``, m - k = ``num_after``).
* ``WarpPrompt``: a ``SoftPrompt`` bank of N prompts of m embeddings, scattered into those slots;
  a per-example ``prompt_index`` picks each example's prompt (SoftPrompt's validation).
* ``WarpVerbalizer``: class embeddings [C, H] (+ optional bias [C]) scored against the mask
  position's (MLM-head-transformed) hidden state by a dot product.
* ``warp_logits_reference``: the plain-PyTorch version (per-example concatenation, the head's
  transform and the class scores at every position, then the mask row gathered).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpeft.nn.soft_prompt import SoftPrompt


def _lengths(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    B, S = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), S, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")  # fmt: skip
    lengths = attention_mask.long().sum(1)
    expected = torch.arange(S, device=input_ids.device)[None, :] < lengths[:, None]
    if not bool((attention_mask.bool() == expected).all()):
        raise ValueError("WARP needs right-padded inputs (attention_mask = ones then zeros); use the tokenizer's "
                         "padding_side='right'")  # fmt: skip
    if B and int(lengths.min()) < 2:
        raise ValueError("WARP needs inputs with their special tokens ([CLS] x [SEP]): some row has fewer than 2 tokens")
    return lengths


def warp_layout(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], num_before: int, num_after: int,
                mask_token_id: int, pad_token_id: int = 0) -> dict:  # fmt: skip
    """``[CLS] x [SEP]`` -> ``[CLS] P_1..P_k x P_k+1..P_m [MASK] [SEP]`` (see the module docstring).

    Returns ``input_ids`` and ``attention_mask`` [B, S + m + 1] (prompt slots hold ``pad_token_id``;
    their embeddings are replaced), ``prompt_positions`` [B, m] and ``mask_positions`` [B]."""
    B, S = input_ids.shape
    k, m = num_before, num_before + num_after
    device = input_ids.device
    L = _lengths(input_ids, attention_mask)[:, None]  # [B, 1], [CLS] and [SEP] included
    pos = torch.arange(S + m + 1, device=device)[None, :]
    is_x = (pos > k) & (pos <= L - 2 + k)
    source = (pos - k).clamp(0, S - 1)
    ids = torch.where(is_x, input_ids.gather(1, source.expand(B, -1)), torch.full_like(source, pad_token_id))
    ids[:, 0] = input_ids[:, 0]
    mask_positions = (L - 1 + m).squeeze(1)
    ids = ids.scatter(1, mask_positions[:, None], mask_token_id)
    ids = ids.scatter(1, mask_positions[:, None] + 1, input_ids.gather(1, L - 1))  # the [SEP]
    before = torch.arange(1, k + 1, device=device)[None, :].expand(B, -1)
    after = L - 1 + k + torch.arange(num_after, device=device)[None, :]
    return {
        "input_ids": ids,
        "attention_mask": (pos <= L + m).to(attention_mask.dtype if attention_mask is not None else torch.long),
        "prompt_positions": torch.cat([before, after], dim=1),
        "mask_positions": mask_positions,
    }


class WarpPrompt(nn.Module):
    """The WARP prompt: a ``SoftPrompt`` bank (``soft_prompt``) of ``num_prompts`` prompts of
    ``num_before + num_after`` embeddings, placed around the input and before the mask.

    ``init``: "mask" (every prompt token starts as the mask token's embedding, as in WARP), "vocab"
    (random vocabulary tokens) or "random" (N(0, 1)); "mask" and "vocab" need ``word_embeddings``."""

    def __init__(self, num_before: int, num_after: int, embed_dim: int, mask_token_id: int, num_prompts: int = 1,
                 init: str = "mask", word_embeddings: Optional[nn.Embedding] = None, pad_token_id: int = 0,
                 dtype=None, device=None):  # fmt: skip
        super().__init__()
        for name, value in (("num_before", num_before), ("num_after", num_after)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if num_before + num_after < 1:
            raise ValueError("num_before + num_after must be >= 1 (WARP needs at least one prompt token)")
        if init not in ("mask", "vocab", "random"):
            raise ValueError(f"init must be 'mask', 'vocab' or 'random', got {init!r}")
        self.num_before, self.num_after = num_before, num_after
        self.mask_token_id, self.pad_token_id = mask_token_id, pad_token_id
        kwargs = dict(init="text", init_token_ids=[mask_token_id]) if init == "mask" else dict(init=init)
        self.soft_prompt = SoftPrompt(num_before + num_after, embed_dim, num_prompts=num_prompts,
                                      word_embeddings=word_embeddings, dtype=dtype, device=device, **kwargs)  # fmt: skip

    @property
    def num_prompts(self) -> int:
        """N, the number of prompts in the bank."""
        return self.soft_prompt.num_prompts

    def forward(self, word_embeddings: nn.Module, input_ids: torch.Tensor, attention_mask=None,
                prompt_index: Optional[torch.Tensor] = None) -> dict:  # fmt: skip
        """``inputs_embeds`` [B, S + m + 1, E], ``attention_mask`` and ``mask_positions`` [B] for the
        encoder; ``prompt_index`` [B] picks each example's prompt (default: prompt 0)."""
        layout = warp_layout(input_ids, attention_mask, self.num_before, self.num_after, self.mask_token_id,
                             self.pad_token_id)  # fmt: skip
        embeds = word_embeddings(layout["input_ids"])
        B, m = input_ids.shape[0], self.num_before + self.num_after
        # SoftPrompt's own selection (and prompt_index checks): prepend to an empty sequence.
        chosen = self.soft_prompt(embeds.new_zeros((B, 0, embeds.shape[-1])), prompt_index=prompt_index)["inputs_embeds"]
        slots = layout["prompt_positions"][..., None].expand(B, m, embeds.shape[-1])
        embeds = embeds.scatter(1, slots, chosen.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": layout["attention_mask"],
                "mask_positions": layout["mask_positions"]}  # fmt: skip


class WarpVerbalizer(nn.Module):
    """WARP's class embeddings: ``scores = h @ class_embeddings.T (+ bias)`` for the mask
    position's hidden state ``h`` [B, H] (after the MLM head's transform where there is one)."""

    def __init__(self, class_embeddings: torch.Tensor, bias: Optional[torch.Tensor] = None, use_bias: bool = True):
        super().__init__()
        if class_embeddings.dim() != 2 or class_embeddings.shape[0] < 1:
            raise ValueError(f"class_embeddings must be [C >= 1, H], got {tuple(class_embeddings.shape)}")
        self.class_embeddings = nn.Parameter(class_embeddings.detach().clone().float())
        if use_bias:
            init = bias.detach().clone().float() if bias is not None else torch.zeros(class_embeddings.shape[0])
            self.bias = nn.Parameter(init.to(self.class_embeddings.device))
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] -> class scores [B, C]."""
        scores = hidden @ self.class_embeddings.to(hidden.dtype).T
        return scores + self.bias.to(scores.dtype) if self.bias is not None else scores


def warp_logits_reference(body: nn.Module, transform: Optional[nn.Module], word_embeddings: nn.Module,
                          prompts: torch.Tensor, class_embeddings: torch.Tensor, bias: Optional[torch.Tensor],
                          input_ids: torch.Tensor, attention_mask: torch.Tensor, num_before: int, mask_token_id: int,
                          prompt_index: Optional[torch.Tensor] = None, pad_token_id: int = 0) -> torch.Tensor:  # fmt: skip
    """Plain WARP: per example, ``torch.cat`` of the [CLS] embedding, the prompt's first
    ``num_before`` tokens, x, the rest of the prompt, [MASK] and [SEP]; pad; run the body; the head's
    transform and the class scores at every position; gather the mask row. ``prompts`` [N, m, E]."""
    rows, mask_positions = [], []
    for i in range(input_ids.shape[0]):
        n = int(attention_mask[i].sum())
        ids = input_ids[i, :n]
        prompt = prompts[0 if prompt_index is None else int(prompt_index[i])]
        e = word_embeddings(ids)
        mask = word_embeddings(torch.tensor([mask_token_id], device=ids.device))
        rows.append(torch.cat([e[:1], prompt[:num_before], e[1:-1], prompt[num_before:], mask, e[-1:]]))
        mask_positions.append(rows[-1].shape[0] - 2)
    width = max(r.shape[0] for r in rows)
    pad = word_embeddings(torch.tensor([pad_token_id], device=input_ids.device))
    embeds = torch.stack([torch.cat([r, pad.expand(width - r.shape[0], -1)]) for r in rows])
    mask = torch.stack([(torch.arange(width, device=input_ids.device) < r.shape[0]).long() for r in rows])
    hidden = body(inputs_embeds=embeds, attention_mask=mask, token_type_ids=torch.zeros_like(mask)).last_hidden_state
    if transform is not None:
        hidden = transform(hidden)
    scores = hidden @ class_embeddings.T  # [B, S, C]: every position, as a per-token classifier does
    if bias is not None:
        scores = scores + bias
    return scores[torch.arange(len(rows)), torch.tensor(mask_positions)]
