"""Adaptable adapters through fastpeft.get_peft_model on tiny BERT and Llama models: against the same
model running the plain-PyTorch reference layer, training of the rational coefficients and the
switches, prune(), checkpoints before and after pruning, bad input."""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft import AdaptableAdapterConfig  # noqa: E402
from fastpeft.integrations.adaptable_adapter import adaptable_adapters, prune, set_switch_temperature  # noqa: E402
from fastpeft.nn import AdaptableAdapter  # noqa: E402
from fastpeft.nn.adaptable_adapter import AdaptableAdapterReference  # noqa: E402
from tests.integrations.helpers import batch, loss_and_grads, tiny_model, tiny_model_4bit  # noqa: E402
from tests.utils import assert_close  # noqa: E402

ARCHS = ["bert", "llama"]


def config_for(arch, **kwargs):
    kwargs.setdefault("bottleneck_size", 8)
    if arch == "bert":
        kwargs.setdefault("task_type", "SEQ_CLS")
    return AdaptableAdapterConfig(**kwargs)


def randomize(fast, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in adaptable_adapters(fast):
            for name, p in a.named_parameters():
                if name in ("down_weight", "up_weight", "down_bias", "up_bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif name == "rational_coeffs":
                    p.add_(0.05 * torch.randn(p.shape, generator=g))


def with_reference_layers(fast):
    ref = copy.deepcopy(fast)
    for _, a in adaptable_adapters(ref):
        a.__class__ = AdaptableAdapterReference
    return ref


def seeded_step(model, inputs, seed=11):
    torch.manual_seed(seed)  # the same Gumbel draws in both models
    return loss_and_grads(model, inputs)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_matches_the_plain_reference(arch, placement):
    fast = fastpeft.get_peft_model(tiny_model(arch), config_for(arch, placement=placement, switch_temperature=0.7))
    randomize(fast)
    ref = with_reference_layers(fast)
    fast.train(), ref.train()
    inputs = batch(arch)
    logits_f, loss_f, grads_f = seeded_step(fast, inputs)
    logits_r, loss_r, grads_r = seeded_step(ref, inputs)
    assert_close(logits_f, logits_r, scale=10)
    assert_close(loss_f, loss_r, scale=10)
    assert set(grads_f) == set(grads_r)
    for name in grads_f:
        assert_close(grads_f[name], grads_r[name], scale=10, msg=name)
    coeff = [n for n in grads_f if n.endswith("rational_coeffs")]
    switch = [n for n in grads_f if n.endswith("switch_logits")]
    assert len(coeff) == len(switch) == len(adaptable_adapters(fast)) > 0
    assert all(grads_f[n].abs().sum() > 0 for n in coeff + switch)


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_base_with_banks_matches_reference(arch, tmp_path):
    fast = fastpeft.get_peft_model(tiny_model_4bit(arch, tmp_path), config_for(arch, num_adapters=2,
                                                                               adapter_layer_norm=True))  # fmt: skip
    randomize(fast)
    ref = with_reference_layers(fast)
    inputs = {**batch(arch), "adapter_index": torch.tensor([1, 0, 1])}
    for model in (fast, ref):
        model.train()
    (logits_f, loss_f, grads_f), (logits_r, loss_r, grads_r) = seeded_step(fast, inputs), seeded_step(ref, inputs)
    assert_close(logits_f, logits_r, scale=10)
    assert_close(loss_f, loss_r, scale=10)
    for name in grads_f:
        assert_close(grads_f[name], grads_r[name], scale=10, msg=name)


def set_switches(fast, keep):
    """keep: site name -> list of bools (one per bank entry)."""
    with torch.no_grad():
        for name, a in adaptable_adapters(fast):
            for i, on in enumerate(keep[name]):
                a.switch_logits[i] = torch.tensor([1.0, 0.0] if on else [0.0, 1.0])


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_removes_switched_off_layers_and_keeps_the_outputs(arch, tmp_path):
    fast = fastpeft.get_peft_model(tiny_model(arch), config_for(arch, placement="houlsby"))
    randomize(fast)
    sites = [n for n, _ in adaptable_adapters(fast)]
    assert len(sites) == 4
    keep = {n: [i % 2 == 0] for i, n in enumerate(sites)}
    set_switches(fast, keep)
    fast.eval()
    inputs = {k: v for k, v in batch(arch).items() if k != "labels"}
    before = fast(**inputs).logits
    report = prune(fast)
    assert report == {"kept": sites[0::2], "removed": sites[1::2]}
    assert [n for n, _ in adaptable_adapters(fast)] == sites[0::2]
    for name in sites[1::2]:  # the module is its original class again
        module = fast.base_model.model.get_submodule(name)
        assert not hasattr(module, "bottleneck_adapter") and not hasattr(type(module), "_fastpeft_base_class")
    assert all(a.switch_decided and not a.switch_logits.requires_grad for _, a in adaptable_adapters(fast))
    assert torch.equal(fast(**inputs).logits, before)
    assert fast.peft_config["default"].kept_sites == sites[0::2]
    assert prune(fast) == {"kept": sites[0::2], "removed": []}  # idempotent

    fast.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FASTPEFT_ADAPTABLE_ADAPTER" and saved["kept_sites"] == sites[0::2]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(name in key for key in tensors for name in sites[1::2])
    assert sum(key.endswith("rational_coeffs") for key in tensors) == 2
    loaded = fastpeft.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    assert [n for n, _ in adaptable_adapters(loaded)] == sites[0::2]
    assert all(a.switch_decided for _, a in adaptable_adapters(loaded))
    assert torch.equal(loaded(**inputs).logits, before)


def test_prune_keeps_a_bank_with_one_entry_on_and_skips_the_others_per_example():
    fast = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama", num_adapters=2))
    randomize(fast)
    sites = [n for n, _ in adaptable_adapters(fast)]
    set_switches(fast, {sites[0]: [True, False], sites[1]: [False, False]})
    fast.eval()
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    index = torch.tensor([0, 1, 1])
    before = fast(**inputs, adapter_index=index).logits
    assert prune(fast) == {"kept": sites[:1], "removed": sites[1:]}
    assert torch.equal(fast(**inputs, adapter_index=index).logits, before)
    # examples on the switched-off entry see the base model
    base = tiny_model("llama").eval()
    assert_close(before[1:], base(**{k: v[1:] for k, v in inputs.items()}).logits, scale=10)


def test_checkpoint_round_trip_before_pruning(tmp_path):
    config = config_for("bert", rational_init="gelu", switch_hard=True, num_adapters=2)
    fast = fastpeft.get_peft_model(tiny_model("bert"), config)
    randomize(fast)
    with torch.no_grad():
        for _, a in adaptable_adapters(fast):
            a.switch_logits.normal_()
    fast.save_pretrained(tmp_path)
    loaded = fastpeft.from_pretrained(tiny_model("bert"), str(tmp_path))
    assert loaded.peft_config == fast.peft_config
    for (_, a), (_, b) in zip(adaptable_adapters(fast), adaptable_adapters(loaded)):
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
        assert not b.switch_decided and b.switch_hard
    inputs = {**batch("bert"), "adapter_index": torch.tensor([1, 0, 1])}
    fast.eval(), loaded.eval()
    assert torch.equal(loaded(**inputs).logits, fast(**inputs).logits)


def test_set_switch_temperature_and_bad_configs():
    fast = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama"))
    set_switch_temperature(fast, 0.25)
    assert all(a.switch_temperature == 0.25 for _, a in adaptable_adapters(fast))
    assert fast.peft_config["default"].switch_temperature == 0.25
    with pytest.raises(ValueError, match="switch_temperature must be a positive number"):
        set_switch_temperature(fast, 0)
    with pytest.raises(ValueError, match="switch_temperature must be a positive number"):
        AdaptableAdapterConfig(switch_temperature=-1.0)
    with pytest.raises(ValueError, match="rational_init must be one of"):
        AdaptableAdapterConfig(rational_init="cubic")
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        AdaptableAdapterConfig(non_linearity="tanh")
    with pytest.raises(ValueError, match="switch_hard must be a bool"):
        AdaptableAdapterConfig(switch_hard="yes")
    with pytest.raises(ValueError, match="kept_sites must be a list of module names"):
        AdaptableAdapterConfig(kept_sites="model.layers.0.mlp")
    with pytest.raises(ValueError, match="has peft_type 'FASTPEFT_ADAPTABLE_ADAPTER'"):
        AdaptableAdapterConfig(peft_type="FASTPEFT_BOTTLENECK")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"kept_sites names modules that are not adapter sites.*model.layers.9.mlp"):
        fastpeft.get_peft_model(model, config_for("llama", kept_sites=["model.layers.9.mlp"]))
    assert not any(isinstance(m, AdaptableAdapter) for m in model.modules())
    plain = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.BottleneckAdapterConfig(bottleneck_size=4))
    with pytest.raises(TypeError, match="AdaptableAdapterConfig"):
        prune(plain)


def test_fixed_activation_learns_the_switch_only():
    fast = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama", non_linearity="gelu"))
    names = {n.rpartition(".")[2] for n, p in fast.named_parameters() if p.requires_grad}
    assert "switch_logits" in names and "rational_coeffs" not in names


def test_nf4_model_trains_after_an_eval_pass(tmp_path):
    """bitsandbytes repacks 4-bit weights on the first eval forward on AVX512-BF16 CPUs, after which
    its forward fails in training (in-place bias add on an autograd output). get_peft_model opts
    every 4-bit base out of the repack, also those it does not wrap (the adapter methods)."""
    import bitsandbytes as bnb

    model = tiny_model_4bit("bert", tmp_path)
    bases = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in bases:
        m.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such CPUs
    fast = fastpeft.get_peft_model(model, config_for("bert"))
    assert bases and all(m.support_avx512bf16_for_cpu is False for m in bases)
    inputs = batch("bert")
    with torch.no_grad():
        fast.eval()(**{k: v for k, v in inputs.items() if k != "labels"})
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in bases)
    fast.train()
    fast(**inputs).loss.backward()
    assert all(a.rational_coeffs.grad is not None for _, a in adaptable_adapters(fast))
