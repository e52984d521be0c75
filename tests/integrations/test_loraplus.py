"""LoRA+ (``FastPeftModel.create_optimizer(loraplus_lr_ratio=...)``) against peft's
``create_loraplus_optimizer`` on tiny Llama and BERT models."""

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft.optimizers import create_loraplus_optimizer  # noqa: E402

import fastpeft  # noqa: E402
from tests.integrations.helpers import batch, lora_config, peft_to_fastpeft_name, tiny_model, twins  # noqa: E402
from tests.utils import assert_close  # noqa: E402


def _groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        out.append(([peft_to_fastpeft_name(names[id(p)]) for p in group["params"]], hyper))
    return out


CASES = [
    ("llama", {}),
    ("bert", {}),  # classifier head (modules_to_save): weight in A, bias in the no-decay B group
    ("llama", {"loraplus_weight_decay": 0.1, "loraplus_lr_embedding": 1e-5, "betas": (0.8, 0.9)}),
    ("bert", {"loraplus_weight_decay": 0.01, "eps": 1e-6}),
]


@pytest.mark.parametrize("arch,extra", CASES)
def test_param_groups_match_peft(arch, extra):
    peft_model, fast = twins(tiny_model(arch), lora_config(arch))
    ref = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **dict(extra))
    opt = fast.create_optimizer(lr=1e-3, loraplus_lr_ratio=16, **dict(extra))
    assert type(opt) is torch.optim.AdamW
    assert _groups_by_name(fast, opt) == _groups_by_name(peft_model, ref)
    # The groups hold the model's own parameters (by identity), every trainable one exactly once.
    grouped = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in fast.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    b_group = opt.param_groups[2]["params"]
    assert b_group and all(p is fast.get_parameter(n) for n, p in zip(_groups_by_name(fast, opt)[2][0], b_group))
    assert opt.param_groups[2]["lr"] == 16e-3 and opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_curve_matches_peft(arch):
    peft_model, fast = twins(tiny_model(arch), lora_config(arch))
    ref = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.01)  # fmt: skip
    opt = fast.create_optimizer(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    inputs = batch(arch)
    losses = {"peft": [], "fast": []}
    for _ in range(4):
        for key, model, optimizer in (("peft", peft_model, ref), ("fast", fast, opt)):
            optimizer.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            losses[key].append(loss.detach())
    assert_close(torch.stack(losses["fast"]), torch.stack(losses["peft"]), scale=100)
    assert losses["fast"][-1] < losses["fast"][0]


def test_bad_arguments_are_named():
    fast = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    with pytest.raises(ValueError, match="lr="):
        fast.create_optimizer(loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        fast.create_optimizer(lr=1e-3, loraplus_lr_ratio=-1)
    with pytest.raises(ValueError, match="loraplus_lr_embedding"):
        fast.create_optimizer(lr=1e-3, loraplus_lr_embedding=1e-5)
    with pytest.raises(TypeError, match="optimizer_cls"):
        fast.create_optimizer(dict, lr=1e-3, loraplus_lr_ratio=16)
    ia3 = fastpeft.get_peft_model(tiny_model("llama"), peft.IA3Config(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="loraplus_lr_ratio is for LoRA"):
        ia3.create_optimizer(lr=1e-3, loraplus_lr_ratio=16)


def test_plain_create_optimizer_unchanged():
    fast = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    opt = fast.create_optimizer(lr=1e-3)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    opt = fast.create_optimizer(torch.optim.SGD, lr=1e-3)
    assert type(opt) is torch.optim.SGD
