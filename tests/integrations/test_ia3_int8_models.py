"""fastpeft (IA)^3 through get_peft_model on tiny models loaded with load_in_8bit, against peft.

As in test_lora_8bit_models.py: on the CPU in training mode bitsandbytes 0.50's Linear8bitLt
multiplies x by the dequantized weight, as fastpeft does, so outputs and gradients agree at fp32
tolerance (bitsandbytes rounds W = CB * SCB / 127 through a multiplication by 1/127).
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

import fastpeft  # noqa: E402
from fastpeft.nn import IA3Linear  # noqa: E402
from tests.integrations.helpers import assert_parity, batch, tiny_model_8bit  # noqa: E402


def ia3_config(arch):
    return peft.IA3Config(task_type="SEQ_CLS" if arch == "bert" else "CAUSAL_LM")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_int8_ia3_parity_with_peft(arch, tmp_path):
    model = tiny_model_8bit(arch, tmp_path)
    peft_model = peft.get_peft_model(copy.deepcopy(model), ia3_config(arch))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    fast = fastpeft.get_peft_model(model, ia3_config(arch))
    fast._assign_adapter(peft.get_peft_model_state_dict(peft_model))
    layers = [m for m in fast.modules() if isinstance(m, IA3Linear)]
    assert layers and all(m.base_kind == "int8" for m in layers)
    inputs = batch(arch)
    peft_model.train()
    fast.train()
    grads = assert_parity(peft_model, fast, inputs)
    assert any(n.endswith("ia3_l") for n in grads)


def test_int8_ia3_merge_refused_before_changing_anything(tmp_path):
    fast = fastpeft.get_peft_model(tiny_model_8bit("llama", tmp_path), ia3_config("llama"))
    before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    with pytest.raises(NotImplementedError, match="int8 base"):
        fast.merge_and_unload()
    assert all(torch.equal(p, before[n]) for n, p in fast.named_parameters())
