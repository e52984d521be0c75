"""The main job's cloze methods (``--method pet`` and ``--method warp``), as ``finetune_minilm.Task``s.

The shipped all-MiniLM-L6-v2 has no MLM head (its package holds the BERT body only), so it is
loaded as a bare ``BertModel`` and the mask position's last hidden state is scored against the tied
word embeddings' rows (a dot product).

* ``pet``: PET / LM-BFF. Each text goes through ``TEMPLATE``; the label words are the topic names.
  The encoder is the NF4 base with fastpeft LoRA on every projection (as ``--method lora``); the
  logits are ``fastpeft.prompting.cloze_label_scores`` (mask position only, 4 label-word rows). The
  peer: the same LoRA weights in peft + bitsandbytes, scored the plain way (hidden states of every
  position times the full 30522-word embedding matrix, then gathered).
* ``warp``: WARP on the frozen dense encoder: 4 prompt tokens before the input, 4 after it, then
  [MASK]; class embeddings start as the topic names' word embeddings. The peer: the same weights
  in the plain per-example implementation (``fastpeft.nn.warp.warp_logits_reference``).
"""

from __future__ import annotations


from torch import nn

from minilm_model import model_path, nf4_config

# The topic names of finetune_minilm.LABELS, in its order: each is one token of MiniLM's vocabulary.
LABEL_WORDS = ["sports", "food", "technology", "weather"]
TEMPLATE = "{text} This is about {mask}."


def load_body(device: str, quantize: bool):
    """MiniLM as a bare BertModel (no pooler), its linear layers in NF4 when ``quantize``."""
    from transformers import AutoTokenizer, BertModel

    quant = nf4_config(device) if quantize else None
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the checkpoint's pooler weights are unused on purpose: no report
    try:
        model = BertModel.from_pretrained(model_path(), add_pooling_layer=False, quantization_config=quant,
                                          device_map={"": device})  # fmt: skip
    finally:
        logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(model_path())


def pet_config(args):
    import peft

    from minilm_methods import LORA_TARGETS

    # No task_type: the model is a bare encoder; the verbalizer is the head.
    return peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=LORA_TARGETS)


def warp_config(args):
    from transformers import AutoTokenizer

    import fastpeft

    before = args.virtual_tokens // 2
    return fastpeft.WarpConfig.from_tokenizer(AutoTokenizer.from_pretrained(model_path()), LABEL_WORDS,
                                              num_before=before, num_after=args.virtual_tokens - before)  # fmt: skip


class PetTask:
    """PET on MiniLM: template in, verbalizer scores out (fastpeft: mask position only; peer: full vocabulary)."""

    peer_name = "peft+bnb, full-vocab logits"

    def __init__(self, args):
        from fastpeft.prompting import Template

        self.template, self.verbalizer = Template(TEMPLATE), None

    def load_model(self, device, quantize):
        from fastpeft.prompting import Verbalizer

        model, tokenizer = load_body(device, quantize)
        self.verbalizer = Verbalizer(LABEL_WORDS, tokenizer)
        return model, tokenizer

    def encode(self, tokenizer, texts):
        return self.template.encode(tokenizer, texts)

    def logits(self, model, enc):
        from fastpeft.prompting import cloze_label_scores

        return cloze_label_scores(model, self.verbalizer, **enc)

    def peer_logits(self, model, enc):
        from fastpeft.prompting.reference import cloze_label_scores_reference

        return cloze_label_scores_reference(model, self.verbalizer, **enc)

    def peer_model(self, method, base, fast_model, config):
        from minilm_methods import peer_model

        return peer_model(method, base, fast_model, config)


class PlainWarp(nn.Module):
    """The peer: the frozen encoder and its own copies of fastpeft's initial WARP weights, run by
    ``warp_logits_reference`` (per-example concatenation, class scores at every position)."""

    def __init__(self, body: nn.Module, fast_model, config):
        super().__init__()
        from fastpeft.integrations.warp import CLASS_KEY, PROMPT_KEY, BIAS_KEY

        self.body, self.config = body.requires_grad_(False), config
        tensors = {k: v.detach().clone() for k, v in fast_model.adapter_state_dict().items()}
        self.prompts = nn.Parameter(tensors[PROMPT_KEY])
        self.class_embeddings = nn.Parameter(tensors[CLASS_KEY])
        self.bias = nn.Parameter(tensors[BIAS_KEY]) if BIAS_KEY in tensors else None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        from fastpeft.nn.warp import warp_logits_reference

        c = self.config
        prompts = self.prompts.view(c.num_prompts, c.num_virtual_tokens, -1)
        logits = warp_logits_reference(self.body, None, self.body.get_input_embeddings(), prompts,
                                       self.class_embeddings, self.bias, input_ids, attention_mask, c.num_before,
                                       c.mask_token_id, pad_token_id=c.pad_token_id)  # fmt: skip
        return SequenceClassifierOutput(logits=logits)


class WarpTask:
    """WARP on MiniLM: the tokenizer's batches, ``model(**enc).logits`` are the class scores."""

    peer_name = None  # "plain_warp", the Method's peer

    def __init__(self, args):
        pass

    def load_model(self, device, quantize):
        return load_body(device, quantize)

    def encode(self, tokenizer, texts):
        return None

    def logits(self, model, enc):
        return model(**enc).logits

    def peer_logits(self, model, enc):
        return model(**enc).logits

    def peer_model(self, method, base, fast_model, config):
        return PlainWarp(base, fast_model, config)
