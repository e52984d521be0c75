"""Probing (frozen encoder + trained head on one layer) through fastpeft.get_peft_model on a tiny BERT.

The reference is the plain practice it replaces: the same model with every parameter frozen, a full
forward with ``output_hidden_states=True`` (encoder in eval mode), the chosen hidden state pooled by hand
and an ``nn.Linear`` / MLP head with the same weights.
"""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import ProbingConfig  # noqa: E402
from fastpeft.integrations import CheckpointError  # noqa: E402
from tests.utils import assert_close, saved_tensor_bytes, saved_tensors  # noqa: E402

VOCAB, D, LAYERS = 96, 32, 3


def bert(seed=0, hidden=D, num_labels=3):
    torch.manual_seed(seed)  # default dropout 0.1: the probe must run the encoder in eval mode
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64,
                                                    num_hidden_layers=LAYERS, num_attention_heads=4,
                                                    max_position_embeddings=32, num_labels=num_labels))  # fmt: skip


def batch(b=4, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding
    mask[3, 2:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 3, (b,), generator=g))


def reference_logits(model, head: nn.Module, layer, pooling, data):
    """The plain practice: full forward, all hidden states, pool by hand, head."""
    model.eval()
    out = model.bert(input_ids=data["input_ids"], attention_mask=data["attention_mask"], output_hidden_states=True)
    h = out.hidden_states[layer]
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        m = data["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
    return head(pooled)


def reference_head(fast):
    """nn.Linear / MLP with the fastpeft head's weights."""
    net = fast.probe_head.net
    linears = [m for m in net if isinstance(m, nn.Linear)]
    copies = [nn.Linear(lin.in_features, lin.out_features) for lin in linears]
    with torch.no_grad():
        for c, lin in zip(copies, linears):
            c.weight.copy_(lin.weight)
            c.bias.copy_(lin.bias)
    return copies[0] if len(copies) == 1 else nn.Sequential(copies[0], nn.ReLU(), copies[1])


@pytest.mark.parametrize("layer, head, pooling", [
    (-1, "linear", "cls"), (-1, "mlp", "mean"), (1, "linear", "mean"), (2, "mlp", "cls"), (0, "linear", "mean"),
])  # fmt: skip
def test_matches_plain_frozen_model_outputs_and_gradients(layer, head, pooling):
    fast = fastpeft.get_peft_model(bert(), ProbingConfig(layer=layer, head=head, pooling=pooling))
    fast.train()  # the encoder still runs in eval mode (no dropout); the head follows the model's mode
    ref_model = bert()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ref = reference_head(fast)
    data = batch()
    out = fast(**data)
    assert out.logits.shape == (4, 3)
    logits_ref = reference_logits(ref_model, ref, layer, pooling, data)
    assert_close(out.logits, logits_ref, scale=10)
    loss_ref = nn.functional.cross_entropy(logits_ref, data["labels"])
    assert_close(out.loss, loss_ref, scale=10)
    params = list(fast.probe_head.parameters())
    grads = torch.autograd.grad(out.loss, params)
    grads_ref = torch.autograd.grad(loss_ref, list(ref.parameters()))
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=10)
    assert [p for p in fast.parameters() if p.requires_grad] == params  # the encoder is frozen


def test_backward_keeps_only_the_heads_activations():
    fast = fastpeft.get_peft_model(bert(), ProbingConfig(layer=2, head="mlp", pooling="mean"))
    data = batch()
    params = list(fast.parameters())
    nbytes, shapes, out = saved_tensor_bytes(lambda: fast(**data).loss, exclude=params)
    assert shapes and all(len(s) <= 2 for s in shapes), shapes  # no [B, T, d] activation of the encoder
    # Exactly what the head alone saves on the pooled features.
    features = torch.randn(4, D)
    head_bytes, head_shapes, _ = saved_tensor_bytes(
        lambda: nn.functional.cross_entropy(fast.probe_head(features).float(), data["labels"]), exclude=params)
    assert (nbytes, sorted(shapes)) == (head_bytes, sorted(head_shapes))
    # Frozen parameters alone do not stop autograd once the embeddings output requires grad (what
    # gradient checkpointing's enable_input_require_grads does): the plain practice then keeps encoder
    # activations, the probe (no_grad) still keeps only the head's.
    plain = bert()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.enable_input_require_grads()
    saved, _ = saved_tensors(lambda: reference_logits(plain, nn.Linear(D, 3), 2, "mean", data).sum())
    assert any(t.dim() == 3 for t in saved)
    fast.base_model.model.enable_input_require_grads()
    assert saved_tensor_bytes(lambda: fast(**data).loss, exclude=params)[0] == head_bytes


def count_calls(model):
    calls = []
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    model.bert.pooler.register_forward_hook(lambda m, a, o: calls.append("pooler"))
    model.classifier.register_forward_hook(lambda m, a, o: calls.append("classifier"))
    return calls


@pytest.mark.parametrize("layer, ran", [(0, []), (1, [0]), (2, [0, 1]), (-1, [0, 1, 2])])
def test_later_layers_do_not_run_and_hooks_are_removed(layer, ran):
    model = bert()
    calls = count_calls(model)
    fast = fastpeft.get_peft_model(model, ProbingConfig(layer=layer))
    hooks_before = [dict(m._forward_hooks) for m in model.bert.encoder.layer]
    fast.train()
    fast(**batch())
    assert calls == ran
    assert [dict(m._forward_hooks) for m in model.bert.encoder.layer] == hooks_before
    assert not any(m._forward_pre_hooks for m in model.bert.encoder.layer)
    assert all(m.training for m in model.modules())  # the eval mode of the encoder was only for the call


def test_error_inside_the_encoder_leaves_no_hook_and_restores_modes():
    model = bert()
    fast = fastpeft.get_peft_model(model, ProbingConfig(layer=2))
    fast.train()
    boom = model.bert.encoder.layer[0]

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    boom.forward = fail
    with pytest.raises(RuntimeError, match="boom"):
        fast(**batch())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.bert.encoder.layer)
    assert all(m.training for m in model.modules())
    del boom.forward
    assert fast(**batch()).logits.shape == (4, 3)


def test_training_moves_only_the_head_and_checkpoint_round_trips(tmp_path):
    model = bert()
    encoder_before = {n: p.clone() for n, p in model.named_parameters()}
    fast = fastpeft.get_peft_model(model, ProbingConfig(layer=-2, head="mlp", pooling="mean", hidden=16))
    opt = fast.create_optimizer(lr=1e-2)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == (D * 16 + 16) + (16 * 3 + 3)
    data = batch()
    losses = []
    for _ in range(5):
        loss = fast(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(encoder_before[n], p) for n, p in model.named_parameters())
    fast.eval()
    expected = fast(**data).logits.detach()
    fast.save_pretrained(tmp_path / "probe")
    loaded = fastpeft.from_pretrained(bert(), str(tmp_path / "probe"))
    assert loaded.peft_config.num_labels == 3 and loaded.peft_config.hidden == 16
    torch.testing.assert_close(loaded(**data).logits, expected, rtol=0, atol=0)
    assert set(loaded.adapter_state_dict()) == {"probe_head.net.0.weight", "probe_head.net.0.bias",
                                                "probe_head.net.3.weight", "probe_head.net.3.bias"}  # fmt: skip
    with pytest.raises(CheckpointError, match="shape mismatches"):
        fastpeft.from_pretrained(bert(hidden=48), str(tmp_path / "probe"))
    with pytest.raises(NotImplementedError, match="nothing to merge"):
        loaded.merge_and_unload()
    assert loaded.unload() is loaded.base_model.model


def test_regression_head_uses_mse():
    fast = fastpeft.get_peft_model(bert(num_labels=1), ProbingConfig(pooling="mean"))
    data = {**batch(), "labels": torch.randn(4)}
    out = fast(**data)
    torch.testing.assert_close(out.loss, nn.functional.mse_loss(out.logits.squeeze(-1), data["labels"]))


@pytest.mark.parametrize("kwargs, word", [
    (dict(layer=1.5), "layer"),
    (dict(head="transformer"), "head"),
    (dict(pooling="max"), "pooling"),
    (dict(num_labels=0), "num_labels"),
    (dict(head="mlp", hidden=0), "hidden"),
    (dict(head="linear", hidden=8), "hidden"),
    (dict(activation="softmax"), "activation"),
    (dict(dropout=1.0), "dropout"),
])  # fmt: skip
def test_bad_config_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ProbingConfig(**kwargs)


@pytest.mark.parametrize("layer", [4, -5])
def test_layer_out_of_range_raises_before_touching_the_model(layer):
    model = bert()
    with pytest.raises(ValueError, match=r"layer must be in \[-4, 3\]"):
        fastpeft.get_peft_model(model, ProbingConfig(layer=layer))
    assert all(p.requires_grad for p in model.parameters())
