"""fastpeft LoRA on tiny Llama and BERT models loaded with BitsAndBytesConfig(load_in_8bit=True).

These run on the CPU with the models in training mode (no dropout is configured, so that is
deterministic), where bitsandbytes 0.50's Linear8bitLt forward (MatMul8bitFp) multiplies x by the
dequantized weight, as fastpeft does; fastpeft and peft then differ only by the rounding of
W = CB * SCB / 127 (bitsandbytes multiplies by 1/127, fastpeft divides by 127), so the fp32
tolerances of the dense tests apply. In eval mode on the CPU, and always on a GPU, bitsandbytes
(MatMul8bitLt) also quantizes the activations to int8; the per-layer bound for that difference is in
tests/nn/test_lora_8bit.py, and end to end it is far above fp32 tolerance (~4e-3 in the logits
here), so it is not compared at model level.
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

import fastpeft  # noqa: E402
from fastpeft.nn import LoRALinear  # noqa: E402
from tests.integrations.helpers import assert_parity, batch, lora_config, loss_and_grads, recorded_ops, tiny_model_8bit, twins  # noqa: E402
from tests.utils import assert_close  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_int8_parity_with_peft(arch, tmp_path):
    model = tiny_model_8bit(arch, tmp_path)
    n_int8 = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    assert n_int8 > 0
    peft_model, fast = twins(model, lora_config(arch))
    layers = [m for m in fast.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.is_int8 for m in layers)
    assert all(type(m).__name__ == "Linear8bitLt" for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    inputs = batch(arch)
    peft_model.train()
    fast.train()
    assert_parity(peft_model, fast, inputs)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_int8_trains_and_saves_a_peft_checkpoint(arch, tmp_path):
    fast = fastpeft.get_peft_model(tiny_model_8bit(arch, tmp_path), lora_config(arch))
    frozen = {n: p.detach().clone() for n, p in fast.named_parameters() if not p.requires_grad}
    assert any(p.dtype == torch.int8 for p in frozen.values())
    trainable = [p for p in fast.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = batch(arch)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = fast(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for n, p in fast.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the int8 base (and everything frozen) untouched
    fast.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_model_8bit(arch, tmp_path), tmp_path / "adapter")
    fast.train()  # bitsandbytes' dequantizing CPU path (see the module docstring); no dropout configured
    loaded.train()
    with torch.no_grad():
        unlabelled = {k: v for k, v in inputs.items() if k != "labels"}  # the fused loss builds no logits
        assert_close(loaded(**unlabelled).logits, fast(**unlabelled).logits, scale=10)


def test_patch_fuses_int8_lora_layers(tmp_path):
    peft_model = peft.get_peft_model(tiny_model_8bit("llama", tmp_path), lora_config("llama"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(peft_model)
    inputs = batch("llama")
    report = fastpeft.patch(peft_model)
    n_layers = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert len(report.patched) == n_layers > 0 and not report.skipped
    peft_model.eval()
    n_ops = n_layers - sum(len(g) - 1 for g in report.groups)  # q/k/v and gate/up run as one op each
    assert report.groups and sum("fastpeft.lora_linear" in n for n in recorded_ops(peft_model, inputs)) == n_ops
    peft_model.train()
    reference.train()
    _, loss_p, grads_p = loss_and_grads(reference, inputs)
    _, loss_f, grads_f = loss_and_grads(peft_model, inputs)
    assert_close(loss_f, loss_p, scale=10)
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], scale=10, msg=name)
    assert fastpeft.unpatch(peft_model) == n_layers


def test_has_fp16_weights_layers_are_reported_not_fused():
    layer = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=True).to("cpu")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    model = Tiny()
    model.is_loaded_in_8bit = True
    with pytest.raises(NotImplementedError, match=r"proj \(bitsandbytes Linear8bitLt with has_fp16_weights=True"):
        fastpeft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["proj"]))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["proj"]))
    report = fastpeft.patch(peft_model, warn=False)
    assert not report.patched and "has_fp16_weights=True" in report.skipped["base_model.model.proj"]
