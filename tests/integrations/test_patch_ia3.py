"""fastpeft.patch / unpatch on peft (IA)^3 models: same parameters, same outputs and gradients, skips reported."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from tests.integrations.helpers import batch, loss_and_grads, recorded_ops, tiny_model, tiny_model_4bit  # noqa: E402
from tests.integrations.test_ia3_models import DENSE, NF4, ia3_config, randomize_ia3  # noqa: E402

IA3Layer = peft.tuners.ia3.IA3Layer


def peft_ia3(model, config):
    peft_model = peft.get_peft_model(model, config)
    randomize_ia3(peft_model)
    return peft_model


def fastpeft_ops(model, inputs):
    """The fastpeft ops one forward of ``model`` dispatches, in order."""
    return [n for n in recorded_ops(model, inputs) if "fastpeft" in n]


def check_same_training_signal(patched, reference, arch, tol):
    inputs = batch(arch)
    logits_r, loss_r, grads_r = loss_and_grads(reference, inputs)
    logits_p, loss_p, grads_p = loss_and_grads(patched, inputs)
    torch.testing.assert_close(logits_p, logits_r, **tol)
    torch.testing.assert_close(loss_p, loss_r, **tol)
    assert set(grads_p) == set(grads_r) and any(".ia3_l" in n for n in grads_p)
    for name in grads_r:
        torch.testing.assert_close(grads_p[name], grads_r[name], **tol, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_patch_matches_peft_and_unpatch_restores(arch):
    peft_model = peft_ia3(tiny_model(arch), ia3_config(arch))
    reference = copy.deepcopy(peft_model)
    inputs = batch(arch)
    peft_model.eval()
    expected = peft_model(**inputs).logits
    params = {n: p for n, p in peft_model.named_parameters()}
    layers = [n for n, m in peft_model.named_modules() if isinstance(m, IA3Layer)]

    report = fastpeft.patch(peft_model)
    assert report.patched == layers and not report.skipped
    assert set(report.families.values()) == {"IA3"}
    assert f"{len(layers)} layers fused (IA3 {len(layers)}), 0 left to peft" in report.summary()
    assert all(p is params[n] for n, p in peft_model.named_parameters())  # the same parameter objects
    assert fastpeft_ops(peft_model, inputs).count("fastpeft.ia3_linear.default") == len(layers)
    torch.testing.assert_close(peft_model(**inputs).logits, expected, **DENSE)
    peft_model.train()
    check_same_training_signal(peft_model, reference, arch, DENSE)
    assert fastpeft.patch(peft_model, warn=False).patched == []  # patching twice changes nothing

    assert fastpeft.unpatch(peft_model) == len(layers)
    peft_model.eval()
    assert fastpeft_ops(peft_model, inputs) == []
    assert torch.equal(peft_model(**inputs).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_patch_nf4_layers(arch, tmp_path):
    peft_model = peft_ia3(tiny_model_4bit(arch, tmp_path), ia3_config(arch))
    layers = [n for n, m in peft_model.named_modules() if isinstance(m, IA3Layer)]
    assert all(type(peft_model.get_submodule(n)).__module__ == "peft.tuners.ia3.bnb" for n in layers)
    reference = copy.deepcopy(peft_model)
    report = fastpeft.patch(peft_model)
    assert report.patched == layers and not report.skipped
    assert fastpeft_ops(peft_model, batch(arch)).count("fastpeft.ia3_linear.default") == len(layers)
    check_same_training_signal(peft_model, reference, arch, NF4)


class _Mixed(torch.nn.Module):
    """A Conv2d, a transformers Conv1D (fan_in_fan_out) and a Linear: peft adapts all three with (IA)^3."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.c1d = Conv1D(8, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, image):
        return self.lin(self.c1d(x)) + self.conv(image).mean()


def test_patch_reports_every_layer_it_cannot_fuse():
    config = peft.IA3Config(target_modules=["conv", "c1d", "lin"], feedforward_modules=["lin"])
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # peft's own warning for the Conv1D
        peft_model = peft_ia3(_Mixed(), config)
    x, image = torch.randn(2, 5, 8), torch.randn(2, 3, 4, 4)
    expected = peft_model(x, image)
    with pytest.warns(UserWarning, match=r"1 layers fused \(IA3 1\), 2 left to peft"):
        report = fastpeft.patch(peft_model)
    assert report.patched == ["base_model.model.lin"]
    assert report.skipped == {
        "base_model.model.conv": "Conv2d (IA)^3 layers are not fused (only Linear / Linear4bit / Linear8bitLt)",
        "base_model.model.c1d": "fan_in_fan_out=True (base layer Conv1D)",
    }
    torch.testing.assert_close(peft_model(x, image), expected, **DENSE)
    assert fastpeft.unpatch(peft_model) == 1


def test_several_active_adapters_and_disabled_adapters():
    model = tiny_model("llama")
    peft_model = peft.get_peft_model(model, ia3_config("llama"), adapter_name="one")
    peft_model.add_adapter("two", ia3_config("llama"))
    randomize_ia3(peft_model)
    peft_model.base_model.set_adapter(["one", "two"])  # peft multiplies the active adapters' vectors
    inputs = batch("llama")
    peft_model.eval()
    expected = peft_model(**inputs).logits
    with peft_model.disable_adapter():
        base = peft_model(**inputs).logits
    reference = copy.deepcopy(peft_model)
    n_layers = len(fastpeft.patch(peft_model).patched)
    assert fastpeft_ops(peft_model, inputs).count("fastpeft.ia3_linear.default") == n_layers == 6
    torch.testing.assert_close(peft_model(**inputs).logits, expected, **DENSE)
    with peft_model.disable_adapter():  # peft's own path
        assert fastpeft_ops(peft_model, inputs) == []
        assert torch.equal(peft_model(**inputs).logits, base)
    peft_model.train()
    reference.train()
    check_same_training_signal(peft_model, reference, "llama", DENSE)
    assert sum(p.grad is not None for n, p in peft_model.named_parameters() if ".ia3_l.two" in n) == n_layers


def test_patched_model_trains_like_peft():
    peft_model = peft_ia3(tiny_model("llama"), ia3_config("llama"))
    reference = copy.deepcopy(peft_model)
    fastpeft.patch(peft_model)
    losses = {}
    for key, model in (("patched", peft_model), ("peft", reference)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[key] = []
        for step in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch("llama", seed=step)).loss
            loss.backward()
            optimizer.step()
            losses[key].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["peft"]), **DENSE)
