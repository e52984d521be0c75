"""Grouped LoRA projections in get_peft_model (fastpeft.integrations.grouping): q/k/v and gate/up run
as one fused op each, with peft's names, outputs and gradients."""

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.integrations import grouping  # noqa: E402
from fastpeft.nn import LoRALinear  # noqa: E402
from tests.integrations.helpers import assert_parity, batch, lora_config, loss_and_grads, recorded_ops, tiny_model, tiny_model_4bit, twins, unlabelled  # noqa: E402
from tests.utils import assert_close  # noqa: E402

LAYERS = 2  # of the tiny models


def expected_groups():
    return [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(LAYERS)] + [
        [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")] for i in range(LAYERS)
    ]


def lora_calls(model, inputs) -> int:
    return sum("fastpeft.lora_linear" in op for op in recorded_ops(model, inputs))


def model_of(arch, kind, tmp_path):
    return tiny_model(arch) if kind == "dense" else tiny_model_4bit(arch, tmp_path)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_model_matches_peft_and_runs_grouped(arch, kind, tmp_path):
    model = model_of(arch, kind, tmp_path)
    config = lora_config(arch)
    peft_model, fast = twins(model, config)
    inner = fast.base_model.model
    assert sorted(grouping.projection_groups(inner)) == sorted(expected_groups())
    fast.train()
    peft_model.train()
    inputs = batch(arch)
    assert_parity(peft_model, fast, inputs)
    # One fused op per group and per ungrouped projection (o, down): 4 a layer, not 7.
    assert lora_calls(fast, inputs) == 4 * LAYERS
    ungrouped = fastpeft.get_peft_model(copy.deepcopy(model), config, group_projections=False)
    assert grouping.projection_groups(ungrouped.base_model.model) == []
    assert lora_calls(ungrouped, inputs) == 7 * LAYERS


def test_names_state_dict_and_checkpoints_are_unchanged(tmp_path):
    model, config = tiny_model("llama"), lora_config("llama")
    grouped = fastpeft.get_peft_model(copy.deepcopy(model), config)
    plain = fastpeft.get_peft_model(copy.deepcopy(model), config, group_projections=False)
    assert [n for n, _ in grouped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(grouped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in grouped.named_modules()] == [n for n, _ in plain.named_modules()]
    assert list(grouped.adapter_state_dict()) == list(plain.adapter_state_dict())
    peft_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    # peft's checkpoint keys (get_peft_model_state_dict drops the adapter name), as fastpeft's.
    assert set(grouped.adapter_state_dict()) == set(peft.get_peft_model_state_dict(peft_model))
    grouped.save_pretrained(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a")
    inputs = unlabelled(batch("llama"))
    assert_close(loaded(**inputs).logits, grouped(**inputs).logits, scale=10)
    again = fastpeft.from_pretrained(copy.deepcopy(model), tmp_path / "a")
    assert sorted(grouping.projection_groups(again.base_model.model)) == sorted(expected_groups())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_peft(reentrant):
    peft_model, fast = twins(tiny_model("llama"), lora_config("llama"))
    kwargs = {"use_reentrant": reentrant}
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    peft_model.base_model.model.enable_input_require_grads()
    fast.train()
    peft_model.train()
    inputs = batch("llama")
    assert_parity(peft_model, fast, inputs)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    _, fast = twins(tiny_model("llama"), lora_config("llama"))
    inputs = batch("llama")
    logits, _, grads = loss_and_grads(fast, inputs)
    compiled = torch.compile(fast, backend="aot_eager")
    logits_c, _, grads_c = loss_and_grads(compiled, inputs)
    assert_close(logits_c, logits, scale=10)
    for name in grads:
        assert_close(grads_c[name], grads[name], scale=10, msg=name)
    # A gated MLP compiles into one graph with its group.
    mlp = fast.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    torch._dynamo.reset()
    assert_close(torch.compile(mlp, backend="eager", fullgraph=True)(x), mlp(x))


class Parallel(nn.Module):
    """Three projections of one input, called in a given order."""

    def __init__(self, order):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (LoRALinear(nn.Linear(16, n), r=4, lora_alpha=8) for n in (8, 12, 4))
        for m in (self.a, self.b, self.c):
            nn.init.normal_(m.lora_B.weight, std=0.1)
        self.order = order

    def forward(self, x):
        outs = {name: getattr(self, name)(x) for name in self.order}
        return torch.cat([outs[n] for n in "abc"], -1)


@pytest.mark.parametrize("order", ["abc", "cba", "bac"])
def test_any_call_order_and_fresh_inputs_give_the_members_outputs(order):
    plain = Parallel(order)
    grouped = copy.deepcopy(plain)
    x = torch.randn(3, 16)
    assert grouping.group_projections(grouped, {"x": x}) == [list(order)]
    for _ in range(2):  # twice: nothing stale carries over
        x = torch.randn(3, 16, requires_grad=True)
        assert_close(grouped(x), plain(x))
        gx, = torch.autograd.grad(grouped(x).square().sum(), x)
        gx_plain, = torch.autograd.grad(plain(x).square().sum(), x)
        assert_close(gx, gx_plain)
    # A member alone on another input than the one handed over runs the group again.
    y = torch.randn(3, 16)
    grouped.a(x)
    assert_close(grouped.b(y), plain.b(y))


def test_merged_and_disabled_adapters_under_grouping():
    peft_model, fast = twins(tiny_model("llama"), lora_config("llama"))
    inputs = unlabelled(batch("llama"))
    base = copy.deepcopy(fast.base_model.model)
    with fast.disable_adapter():
        with peft_model.disable_adapter():
            assert_close(fast(**inputs).logits, peft_model(**inputs).logits, scale=10)
    fast.merge_adapter()
    assert lora_calls(fast, inputs) == 0
    assert_close(fast(**inputs).logits, peft_model(**inputs).logits, scale=10)
    fast.unmerge_adapter()
    assert_close(fast(**inputs).logits, base(**inputs).logits, scale=10)


def test_dropout_shares_one_mask_per_group():
    config = lora_config("llama", lora_dropout=0.5)
    fast = fastpeft.get_peft_model(tiny_model("llama"), config)
    fast.train()
    inputs = batch("llama")
    assert lora_calls(fast, inputs) == 4 * LAYERS  # grouped with dropout too
    loss = fast(**inputs).loss
    loss.backward()
    assert all(p.grad is not None for n, p in fast.named_parameters() if p.requires_grad)


def test_bad_options_and_models_without_example_inputs():
    with pytest.raises(TypeError, match="group_projections"):
        fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"), group_projections="yes")
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    config = peft.LoraConfig(r=2, target_modules=["0", "1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fastpeft.get_peft_model(net, config)
    assert any("dummy_inputs" in str(w.message) for w in caught)
    assert grouping.projection_groups(fast.base_model.model) == []


def test_copies_and_pickles_keep_their_own_groups(tmp_path):
    _, fast = twins(tiny_model("llama"), lora_config("llama"))
    inputs = unlabelled(batch("llama"))
    attn = fast.base_model.model.model.layers[0].self_attn
    attn.q_proj(torch.randn(2, 3, 64, requires_grad=True) * 1)  # leaves k and v a hand-over (graph tensors)
    twin = copy.deepcopy(fast)
    path = tmp_path / "model.pt"
    torch.save(fast.base_model.model, path)
    loaded = torch.load(path, weights_only=False)
    for other in (twin.base_model.model, loaded):
        q = other.model.layers[0].self_attn.q_proj
        assert q.__dict__["_shared_input_group"].layers[0] is q  # the copy's own layers
        assert sorted(grouping.projection_groups(other)) == sorted(expected_groups())
        assert_close(other(**inputs).logits, fast(**inputs).logits)


@pytest.mark.parametrize("group", [True, False])
def test_model_level_memory_rules_against_peft(group):
    """fastpeft.memory on a whole training step: without dropout fastpeft saves exactly what peft saves
    (x and the tokens x r shrink per projection; grouping saves x once and one stacked shrink, the
    same bytes); with dropout fastpeft adds one 8-byte seed per fused op where peft also saves a
    dropped x and a mask per projection."""
    from fastpeft.memory import measure_step

    inputs = batch("llama")
    tokens = inputs["input_ids"].numel()
    saved = {}
    for dropout in (0.0, 0.1):
        config = lora_config("llama", lora_dropout=dropout)
        # fused_loss=False: this compares the projections' memory; the fused loss saves less elsewhere
        peft_model, fast = twins(tiny_model("llama"), config, fused_loss=False)
        if not group:
            fast = fastpeft.get_peft_model(tiny_model("llama"), config, group_projections=False, fused_loss=False)
        peft_model.train()
        fast.train()
        mp, mf = (measure_step(lambda m=m: m(**inputs).loss.backward(), exclude=[m]) for m in (peft_model, fast))
        saved[dropout] = (mp.saved_bytes, mf.saved_bytes)
        assert mf.peak_bytes <= mp.peak_bytes
    assert saved[0.0][1] == saved[0.0][0]
    fused_ops = (4 if group else 7) * LAYERS
    assert saved[0.1][1] == saved[0.0][1] + 8 * fused_ops
    dropped_x = LAYERS * tokens * (6 * 64 + 128) * 4  # q k v o gate up read 64 features, down 128
    assert saved[0.1][0] - saved[0.1][1] >= dropped_x
