"""MAD-X invertible adapters on tiny transformers models (BertForMaskedLM, BertForSequenceClassification,
LlamaForCausalLM built from configs): placement, reversibility, MAD-X stacks with bottleneck adapters,
checkpoints and errors.

The reference is the same model with the plain-PyTorch coupling block of tests/nn/test_invertible_adapter.py
(the adapters library's NICE/GLOW blocks) hooked in by hand: forward on the embeddings block's output,
rev=True on the MLM head's input; for MAD-X, the bottleneck adapters come from fastpeft's bottleneck-adapter
path (tested against its own reference in test_adapter_models.py) with the same weights.
"""

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import BottleneckAdapterConfig, InvertibleAdapterConfig  # noqa: E402
from fastpeft.integrations import CheckpointError  # noqa: E402
from fastpeft.integrations.invertible_adapter import install_invertible_adapter, remove_invertible_adapter  # noqa: E402
from fastpeft.nn import BottleneckAdapter, InvertibleAdapter  # noqa: E402
from tests.nn.test_invertible_adapter import RefGLOW, RefNICE  # noqa: E402
from tests.utils import assert_close  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32)  # fmt: skip


def bert_mlm(seed=0):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **COMMON))


def inputs(batch=3, seq=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, VOCAB, (batch, seq), generator=g))


def randomize(module, seed=5, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def reference_blocks(adapter: InvertibleAdapter):
    """Plain-PyTorch coupling blocks holding bank entries of ``adapter``."""
    refs = []
    for i in range(adapter.num_adapters):
        ref = RefNICE(adapter.hidden) if adapter.kind == "nice" else RefGLOW(adapter.hidden, clamp=adapter.clamp)
        f, g = (ref.F, ref.G) if adapter.kind == "nice" else (ref.s2, ref.s1)
        with torch.no_grad():
            for net, seq in (("f", f), ("g", g)):
                for part, lin in zip(("down", "up"), (seq[0], seq[2])):
                    lin.weight.copy_(getattr(adapter, f"{net}_{part}_weight")[i])
                    lin.bias.copy_(getattr(adapter, f"{net}_{part}_bias")[i])
        refs.append(ref)
    return nn.ModuleList(refs)


def hook_reference(model, refs, index=None, head=True):
    """The plain practice: the coupling blocks applied by hand on the embeddings output and the head input."""

    def apply(x, rev):
        if index is None:
            return refs[0](x, rev=rev)
        return torch.cat([refs[int(i)](x[b : b + 1], rev=rev) for b, i in enumerate(index)])

    model.ref_blocks = refs
    model.bert.embeddings.register_forward_hook(lambda m, a, out: apply(out, False))
    if head:
        model.cls.register_forward_pre_hook(lambda m, a: (apply(a[0], True),))
    return model


def loss_logits_grads(model, batch, params, **kw):
    out = model(**batch, **kw)
    grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach(), out.logits.detach(), grads


# ---- placement and reversibility -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nice", "glow"])
def test_install_changes_forward_and_remove_restores_it(kind):
    model = bert_mlm().eval()
    batch = inputs()
    before = model(**batch).logits.detach()
    adapter = InvertibleAdapter(32, kind=kind)
    randomize(adapter)
    assert install_invertible_adapter(model, adapter) == ("bert.embeddings", "cls")
    assert not torch.allclose(model(**batch).logits, before, atol=1e-3)
    remove_invertible_adapter(model)
    assert not hasattr(model, "invertible_adapter")
    assert not model.bert.embeddings._forward_hooks and not model.cls._forward_pre_hooks
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


def test_inverse_on_head_cancels_forward_when_the_encoder_is_skipped():
    """With the encoder layers removed the MLM head sees exactly the embedding output: forward then inverse
    is the identity, so the logits equal the plain model's (MAD-X's reason for the inverse)."""
    model = bert_mlm().eval()
    model.bert.encoder.layer = nn.ModuleList()
    batch = inputs()
    before = model(**batch).logits.detach()
    adapter = InvertibleAdapter(32, kind="glow")
    randomize(adapter)
    install_invertible_adapter(model, adapter)
    assert_close(model(**batch).logits, before, scale=10)
    remove_invertible_adapter(model)
    install_invertible_adapter(model, adapter, inverse_at_head=False)  # forward alone: a different model
    assert not torch.allclose(model(**batch).logits, before, atol=1e-3)


@pytest.mark.parametrize("kind", ["nice", "glow"])
def test_get_peft_model_matches_plain_reference(kind):
    model, ref_model = bert_mlm(), bert_mlm()
    fast = fastpeft.get_peft_model(model, InvertibleAdapterConfig(kind=kind, reduction_factor=2))
    adapter = fast.base_model.model.invertible_adapter
    randomize(adapter)
    refs = reference_blocks(adapter)
    hook_reference(ref_model, refs)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ref_params = [p for r in refs for p in r.parameters()]
    for p in ref_params:
        p.requires_grad_(True)
    batch = inputs()
    params = [p for p in fast.parameters() if p.requires_grad]
    assert {n.split(".")[-1] for n, p in fast.named_parameters() if p.requires_grad} == {
        f"{net}_{part}_{w}" for net in "fg" for part in ("down", "up") for w in ("weight", "bias")}
    loss, logits, grads = loss_logits_grads(fast, batch, params)
    loss_r, logits_r, grads_r = loss_logits_grads(ref_model, batch, ref_params)
    assert_close(logits, logits_r, scale=10)
    assert_close(loss, loss_r, scale=10)
    named = dict(zip([n.split(".")[-1] for n, p in fast.named_parameters() if p.requires_grad], grads))
    ref_named = {}
    for (net, seq) in (("f", refs[0].F if kind == "nice" else refs[0].s2), ("g", refs[0].G if kind == "nice" else refs[0].s1)):
        for part, lin in zip(("down", "up"), (seq[0], seq[2])):
            i = next(k for k, q in enumerate(ref_params) if q is lin.weight)
            ref_named[f"{net}_{part}_weight"], ref_named[f"{net}_{part}_bias"] = grads_r[i], grads_r[i + 1]
    for name, g in named.items():
        assert_close(g[0], ref_named[name], scale=10, msg=name)
    base = fast.unload()
    assert not hasattr(base, "invertible_adapter")
    torch.testing.assert_close(base(**batch).logits, bert_mlm()(**batch).logits, rtol=0, atol=0)


# ---- MAD-X: invertible + language (bottleneck) adapters, banks ---------------------------------------------


def madx_config(**kw):
    return InvertibleAdapterConfig(num_adapters=2, bottleneck_adapter=BottleneckAdapterConfig(
        bottleneck_size=8, num_adapters=2, placement="pfeiffer"), **kw)  # fmt: skip


def test_madx_stack_matches_bottleneck_path_plus_plain_coupling():
    fast = fastpeft.get_peft_model(bert_mlm(), madx_config())
    for m in fast.modules():
        if isinstance(m, (BottleneckAdapter, InvertibleAdapter)):
            randomize(m)
    # The reference: fastpeft's bottleneck-adapter model with the same adapter weights, coupling by hand.
    ref = fastpeft.get_peft_model(bert_mlm(), BottleneckAdapterConfig(bottleneck_size=8, num_adapters=2))
    own = {k: v for k, v in fast.adapter_state_dict().items() if "bottleneck_adapter" in k}
    assert set(own) == set(ref.adapter_state_dict())
    ref._assign_adapter(own)
    refs = reference_blocks(fast.base_model.model.invertible_adapter)
    index = torch.tensor([1, 0, 1])
    hook_reference(ref.base_model.model, refs, index)
    batch = inputs()
    params = [p for n, p in fast.named_parameters() if p.requires_grad and "bottleneck_adapter" in n]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    loss, logits, grads = loss_logits_grads(fast, batch, params, adapter_index=index)
    loss_r, logits_r, grads_r = loss_logits_grads(ref, batch, ref_params, adapter_index=index)
    assert_close(logits, logits_r, scale=10)
    for g, g_r in zip(grads, grads_r):
        assert_close(g, g_r, scale=10)
    # A mixed-language batch equals each example run alone with its language.
    for b in range(3):
        alone = fast(**{k: v[b : b + 1] for k, v in batch.items()}, adapter_index=index[b : b + 1]).logits
        assert_close(alone[0], logits[b], scale=10)


def test_madx_checkpoint_round_trip_and_bad_checkpoint(tmp_path):
    fast = fastpeft.get_peft_model(bert_mlm(), madx_config(kind="glow"))
    for m in fast.modules():
        if isinstance(m, (BottleneckAdapter, InvertibleAdapter)):
            randomize(m)
    batch, index = inputs(), torch.tensor([0, 1, 1])
    expected = fast(**batch, adapter_index=index).logits.detach()
    fast.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FASTPEFT_INVERTIBLE_ADAPTER" and saved["bottleneck_adapter"]["num_adapters"] == 2
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.tmp"))
    loaded = fastpeft.from_pretrained(bert_mlm(), str(tmp_path / "ckpt"))
    torch.testing.assert_close(loaded(**batch, adapter_index=index).logits, expected, rtol=0, atol=0)
    assert isinstance(loaded.peft_config.bottleneck_config(), BottleneckAdapterConfig)
    # A model of another hidden size: CheckpointError, and the model is left as it was.
    torch.manual_seed(0)
    other = BertForMaskedLM(BertConfig(**{**COMMON, "hidden_size": 48, "num_attention_heads": 4})).eval()
    before = other(**batch).logits.detach()
    with pytest.raises(CheckpointError, match="shape mismatches"):
        fastpeft.from_pretrained(other, str(tmp_path / "ckpt"))
    assert not hasattr(other, "invertible_adapter")
    torch.testing.assert_close(other(**batch).logits, before, rtol=0, atol=0)
    # A truncated weights file.
    data = (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "ckpt" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        fastpeft.from_pretrained(bert_mlm(), str(tmp_path / "ckpt"))


def test_sequence_classification_model_gets_no_inverse_and_trains_classifier():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=3, **COMMON))
    fast = fastpeft.get_peft_model(model, InvertibleAdapterConfig(task_type="SEQ_CLS"))
    assert len(fast.base_model.model.bert.embeddings._forward_hooks) == 1
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("invertible_adapter" in n for n in trainable)
    assert any("classifier" in k for k in fast.adapter_state_dict())
    with pytest.raises(ValueError, match="inverse_at_head=True"):
        fastpeft.get_peft_model(BertForSequenceClassification(BertConfig(**COMMON)),
                                InvertibleAdapterConfig(inverse_at_head=True))  # fmt: skip


def test_llama_uses_input_embeddings_and_lm_head():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **COMMON)).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    before = model(input_ids=ids).logits.detach()
    adapter = InvertibleAdapter(32)
    randomize(adapter)
    assert install_invertible_adapter(model, adapter) == ("model.embed_tokens", "lm_head")
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-3)
    remove_invertible_adapter(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


# ---- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, word", [
    (dict(kind="real_nvp"), "kind"),
    (dict(reduction_factor=0), "reduction_factor"),
    (dict(num_adapters=0), "num_adapters"),
    (dict(non_linearity="softmax"), "non_linearity"),
    (dict(clamp=-1.0), "clamp"),
    (dict(inverse_at_head="yes"), "inverse_at_head"),
    (dict(bottleneck_adapter=BottleneckAdapterConfig(num_adapters=2)), "num_adapters"),
    (dict(bottleneck_adapter={"placement": "middle"}), "placement"),
    (dict(bottleneck_adapter={"no_such_field": 1}), "bottleneck_adapter"),
    (dict(bottleneck_adapter=BottleneckAdapterConfig(task_type="SEQ_CLS")), "task_type"),
])  # fmt: skip
def test_bad_config_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        InvertibleAdapterConfig(**kwargs)


def test_runtime_errors_leave_model_usable():
    model = bert_mlm()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="reduction_factor"):  # half of 32 is 16: a factor of 32 leaves nothing
        fastpeft.get_peft_model(model, InvertibleAdapterConfig(reduction_factor=32))
    assert not hasattr(model, "invertible_adapter") and not model.bert.embeddings._forward_hooks
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    fast = fastpeft.get_peft_model(model, madx_config())
    with pytest.raises(ValueError, match="adapter_index"):
        fast(**inputs())
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        fast(**inputs(), adapter_index=torch.tensor([0, 1, 2]))
    with pytest.raises(NotImplementedError, match="merged"):
        fast.merge_and_unload()
    with pytest.raises(ValueError, match="already has an invertible adapter"):
        install_invertible_adapter(fast.base_model.model, InvertibleAdapter(32))
    copy.deepcopy(fast)  # hooks and the index slot copy with the model
