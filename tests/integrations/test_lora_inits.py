"""peft's initialisations (``init_lora_weights`` = "gaussian", "pissa", "pissa_niter_K", "olora",
"loftq") through ``fastpeft.get_peft_model``: peft's own init code runs on the base weights, then the
fused layers train; base weights, factors, outputs, gradients and checkpoints match peft's."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.nn import LoRALinear  # noqa: E402
from tests.integrations.helpers import assert_parity, batch, lora_config, peft_to_fastpeft_name, tiny_model, tiny_model_4bit  # noqa: E402
from tests.utils import assert_close  # noqa: E402

ARCHS = ["llama", "qwen2", "bert"]


def _frozen_state(model) -> dict:
    """Every non-adapter tensor of the model (the base weights), by fastpeft's name."""
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        out[peft_to_fastpeft_name(name).replace(".base_layer.", ".").removeprefix("base_model.model.")] = t
    return out


def _adapter_state(model) -> dict:
    return {peft_to_fastpeft_name(n): p for n, p in model.named_parameters() if "lora_" in n}


def _twins(model, config, seed=0):
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    torch.manual_seed(seed)
    fast = fastpeft.get_peft_model(copy.deepcopy(model), config)
    return peft_model, fast


def _assert_same_init(peft_model, fast, base_changed_from=None):
    base_p, base_f = _frozen_state(peft_model), _frozen_state(fast)
    assert set(base_p) == set(base_f)
    for name in base_p:
        assert torch.equal(base_f[name], base_p[name]), name
    ad_p, ad_f = _adapter_state(peft_model), _adapter_state(fast)
    assert set(ad_p) == set(ad_f) and ad_p
    for name in ad_p:
        assert torch.equal(ad_f[name], ad_p[name]), name
    assert all(p.dtype == torch.float32 for p in ad_f.values())
    if base_changed_from is not None:
        original = _frozen_state(base_changed_from)
        changed = [n for n in base_f if not torch.equal(base_f[n], original[n])]
        assert changed and all(n.endswith(".weight") for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "gaussian"])
def test_dense_init_matches_peft(arch, init):
    model = tiny_model(arch)
    peft_model, fast = _twins(model, lora_config(arch, init_lora_weights=init))
    assert sum(isinstance(m, LoRALinear) for m in fast.modules()) > 0
    _assert_same_init(peft_model, fast, base_changed_from=None if init == "gaussian" else model)
    if init != "gaussian":  # the factors are nonzero: the adapter changes outputs and trains both A and B
        assert_parity(peft_model, fast, batch(arch), scale=20)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_plus_adapter_gives_the_original_output(init):
    model = tiny_model("llama")
    fast = fastpeft.get_peft_model(copy.deepcopy(model), lora_config("llama", init_lora_weights=init))
    inputs = batch("llama")
    fast.eval()
    model.eval()
    with torch.no_grad():
        assert_close(fast(**inputs).logits, model(**inputs).logits, scale=1e4)


def test_checkpoints_both_ways_with_peft(tmp_path):
    """As in peft, loading a PiSSA checkpoint re-runs PiSSA on the given base, then loads the factors."""
    model = tiny_model("qwen2")
    config = lora_config("qwen2", init_lora_weights="pissa")
    peft_model, fast = _twins(model, config)
    with torch.no_grad():
        for p in list(_adapter_state(fast).values()) + list(_adapter_state(peft_model).values()):
            p.add_(0.01)
    inputs = batch("qwen2")
    fast.save_pretrained(tmp_path / "fast")
    peft_model.save_pretrained(tmp_path / "peft")
    loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fast")
    loaded_fast = fastpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    for m in (fast, peft_model, loaded_peft, loaded_fast):
        m.eval()
    with torch.no_grad():
        assert_close(loaded_peft(**inputs).logits, fast(**inputs).logits, scale=20)
        assert_close(loaded_fast(**inputs).logits, peft_model(**inputs).logits, scale=20)
    _assert_same_init(loaded_peft, loaded_fast)


def test_merge_and_unload_gives_peft_merged_weights():
    model = tiny_model("llama")
    peft_model, fast = _twins(model, lora_config("llama", init_lora_weights="olora"))
    merged_p, merged_f = peft_model.merge_and_unload(), fast.merge_and_unload()
    sd_p, sd_f = merged_p.state_dict(), merged_f.state_dict()
    for name in sd_p:
        assert_close(sd_f[name], sd_p[name], scale=10, msg=name)


def test_olora_on_nf4_matches_peft(tmp_path):
    model = tiny_model_4bit("llama", tmp_path)
    config = lora_config("llama", init_lora_weights="olora")
    peft_model, fast = _twins(model, config)
    assert all(m.is_4bit for m in fast.modules() if isinstance(m, LoRALinear))
    _assert_same_init(peft_model, fast)
    assert_parity(peft_model, fast, batch("llama"), scale=20)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
def test_pissa_on_nf4_raises_before_touching_the_model(init, tmp_path):
    model = tiny_model_4bit("llama", tmp_path)
    before = {n: t.clone() for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    with pytest.raises(NotImplementedError, match="PiSSA on dense base layers only"):
        fastpeft.get_peft_model(model, lora_config("llama", init_lora_weights=init))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert not any(isinstance(m, (LoRALinear, peft.tuners.lora.LoraLayer)) for m in model.modules())
    # peft refuses PiSSA on quantized weights too (its pissa_init raises TypeError)
    with pytest.raises(TypeError, match="PiSSA"):
        peft.get_peft_model(tiny_model_4bit("llama", tmp_path), lora_config("llama", init_lora_weights=init))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_loftq_without_a_gpu_raises_before_touching_the_model():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    config = lora_config("llama", init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4))
    with pytest.raises(NotImplementedError, match="loftq"):
        fastpeft.get_peft_model(model, config)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft's loftq_init needs CUDA")
def test_loftq_matches_peft():
    model = tiny_model("llama")
    config = lora_config("llama", init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4))
    peft_model, fast = _twins(model, config)
    _assert_same_init(peft_model, fast, base_changed_from=model)
    assert_parity(peft_model, fast, batch("llama"), scale=20)


def test_eva_and_other_inits_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="init_lora_weights='eva'"):
        fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama", init_lora_weights="eva"))
    with pytest.raises(NotImplementedError, match="init_lora_weights='orthogonal'"):
        fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama", init_lora_weights="orthogonal"))


def test_add_adapter_refuses_peft_inits():
    fast = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa'"):
        fast.add_adapter("second", lora_config("llama", init_lora_weights="pissa"))


def test_pissa_with_a_targeted_embedding_matches_peft():
    """peft's PiSSA changes the linear bases only; its embedding LoRA keeps the usual init."""
    model = tiny_model("llama")
    peft_model, fast = _twins(model, lora_config("llama", target_modules=["embed_tokens", "q_proj"],
                                                 init_lora_weights="pissa"))  # fmt: skip
    from fastpeft.nn import LoRAEmbedding

    assert isinstance(fast.base_model.model.model.embed_tokens, LoRAEmbedding)
    _assert_same_init(peft_model, fast, base_changed_from=model)
    assert_parity(peft_model, fast, batch("llama"), scale=20)
