"""fastpeft.patch groups the patched LoRA layers that read the same input (q/k/v, gate/up) into one
fused op, checks every member on each call, and falls back to one op per layer when they differ."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.integrations import grouping  # noqa: E402
from tests.integrations.helpers import assert_parity, batch, lora_config, recorded_ops, tiny_model, twins, unlabelled  # noqa: E402
from tests.utils import assert_close  # noqa: E402

LORA_OP = "fastpeft.lora_linear.default"
P = "base_model.model.model.layers."


def patched_twins(**patch_kwargs):
    peft_model, _ = twins(tiny_model("llama"), lora_config("llama"))
    reference = copy.deepcopy(peft_model)
    report = fastpeft.patch(peft_model, warn=False, **patch_kwargs)
    return peft_model, reference, report


def test_qkv_and_gate_up_run_as_one_op_with_peft_numbers():
    peft_model, reference, report = patched_twins()
    short = [[n.removeprefix(P) for n in g] for g in report.groups]
    assert short == [["0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"],
                     ["0.mlp.gate_proj", "0.mlp.up_proj"],
                     ["1.self_attn.q_proj", "1.self_attn.k_proj", "1.self_attn.v_proj"],
                     ["1.mlp.gate_proj", "1.mlp.up_proj"]]  # fmt: skip
    inputs = batch("llama")
    assert recorded_ops(peft_model, unlabelled(inputs)).count(LORA_OP) == 2 * 4  # qkv, o, gate/up, down
    assert_parity(reference, peft_model, inputs)
    # names and parameters are untouched
    assert [n for n, _ in peft_model.named_parameters()] == [n for n, _ in reference.named_parameters()]


def test_a_member_that_must_run_peft_makes_the_group_run_alone():
    peft_model, reference, _ = patched_twins()
    k_proj = peft_model.get_submodule(P + "0.self_attn.k_proj")
    handle = k_proj.base_layer.register_forward_hook(lambda m, i, o: None)  # hooks run on peft's path only
    inputs = batch("llama")
    with pytest.warns(UserWarning, match="hooks"):
        ops = recorded_ops(peft_model, unlabelled(inputs))
    assert ops.count(LORA_OP) == 5 + 4  # layer 0: q, v alone (k on peft's path), o, gate/up, down; layer 1: 4
    assert_parity(reference, peft_model, inputs)
    handle.remove()
    assert recorded_ops(peft_model, unlabelled(inputs)).count(LORA_OP) == 8


def test_disabled_adapters_and_switched_off_grouping():
    peft_model, reference, _ = patched_twins()
    inputs = unlabelled(batch("llama"))
    with peft_model.disable_adapter(), reference.disable_adapter():
        assert recorded_ops(peft_model, inputs).count(LORA_OP) == 0
        with torch.no_grad():
            assert_close(peft_model(**inputs).logits, reference(**inputs).logits)
    report = fastpeft.patch(peft_model, warn=False, group_projections=False)
    assert report.groups == [] and recorded_ops(peft_model, inputs).count(LORA_OP) == 14
    assert fastpeft.patch(peft_model, warn=False).groups  # grouped again
    assert fastpeft.unpatch(peft_model) == 14
    assert not any(grouping._GROUP in m.__dict__ for m in peft_model.modules())
    with pytest.raises(TypeError, match="group_projections must be"):
        fastpeft.patch(peft_model, group_projections="yes")
