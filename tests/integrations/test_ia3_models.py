"""fastpeft.get_peft_model with peft IA3Configs against peft on tiny Llama, Qwen2 and BERT models (dense and NF4)."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.nn import IA3Linear  # noqa: E402
from tests.integrations.helpers import batch, loss_and_grads, tiny_model, tiny_model_4bit  # noqa: E402

ARCHS = ["llama", "qwen2", "bert"]
# fp32 tolerances: dense bases run the same GEMMs as peft; 4-bit bases dequantize through another kernel.
DENSE = dict(rtol=1e-5, atol=1e-5)
NF4 = dict(rtol=1e-4, atol=1e-4)


def ia3_config(arch, **kwargs):
    kwargs.setdefault("task_type", "SEQ_CLS" if arch == "bert" else "CAUSAL_LM")
    return peft.IA3Config(**kwargs)


def randomize_ia3(model, seed=3):
    """peft and fastpeft start every vector at ones; tests need vectors that change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def ia3_twins(model, config):
    """(peft model, fastpeft model) over copies of ``model`` with identical, randomised (IA)^3 vectors."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    randomize_ia3(peft_model)
    fast = fastpeft.get_peft_model(copy.deepcopy(model), config)
    fast._assign_adapter(peft.get_peft_model_state_dict(peft_model))
    return peft_model, fast


def adapted_layers(model):
    """{module path in the transformers model: is_feedforward} of every (IA)^3 layer, peft's or fastpeft's."""
    from peft.tuners.ia3 import IA3Layer

    return {
        name.removeprefix("base_model.model."): m.is_feedforward
        for name, m in model.named_modules()
        if isinstance(m, (IA3Layer, IA3Linear))
    }


def check_parity(peft_model, fast, arch, tol):
    assert adapted_layers(fast) == adapted_layers(peft_model) and adapted_layers(fast)
    inputs = batch(arch)
    logits_p, loss_p, grads_p = loss_and_grads(peft_model, inputs)
    logits_f, loss_f, grads_f = loss_and_grads(fast, inputs)
    torch.testing.assert_close(logits_f, logits_p, **tol)
    torch.testing.assert_close(loss_f, loss_p, **tol)
    assert set(grads_f) == set(grads_p) and any(n.endswith("ia3_l") for n in grads_f)
    for name in grads_p:
        assert grads_p[name].abs().max() > 0, name
        torch.testing.assert_close(grads_f[name], grads_p[name], **tol, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_parity_with_peft_default_modules(arch):
    # target_modules / feedforward_modules None: peft's defaults for the model type.
    peft_model, fast = ia3_twins(tiny_model(arch), ia3_config(arch))
    assert fast.peft_config.target_modules == peft_model.peft_config["default"].target_modules
    assert fast.peft_config.feedforward_modules == peft_model.peft_config["default"].feedforward_modules
    assert all(type(m) is IA3Linear and not m.is_4bit for m in fast.modules() if isinstance(m, IA3Linear))
    assert fast.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]
    check_parity(peft_model, fast, arch, DENSE)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_nf4_parity_with_peft(arch, tmp_path):
    peft_model, fast = ia3_twins(tiny_model_4bit(arch, tmp_path), ia3_config(arch))
    assert all(m.is_4bit for m in fast.modules() if isinstance(m, IA3Linear))
    check_parity(peft_model, fast, arch, NF4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules="all-linear", feedforward_modules=["down_proj"], exclude_modules=["o_proj"]),
        dict(target_modules=r".*\.(k_proj|up_proj|down_proj)", feedforward_modules=r".*\.(up|down)_proj"),
        dict(target_modules=["q_proj", "v_proj", "gate_proj"], feedforward_modules=["gate_proj"]),
    ],
    ids=["all-linear", "regex", "list"],
)
def test_module_selection_follows_peft(kwargs):
    peft_model, fast = ia3_twins(tiny_model("llama"), ia3_config("llama", **kwargs))
    layers = adapted_layers(fast)
    assert not any(name.endswith("o_proj") or name == "lm_head" for name in layers)
    assert any(layers.values()) and not all(layers.values())  # both sides present
    check_parity(peft_model, fast, "llama", DENSE)


def test_parameter_names_and_shapes_are_peft_s():
    peft_model, fast = ia3_twins(tiny_model("llama"), ia3_config("llama"))
    ours = {k: tuple(v.shape) for k, v in fast.adapter_state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(peft_model).items()}
    assert ours == theirs
    assert ours["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"] == (32, 1)  # output side: (out, 1)
    assert ours["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] == (1, 128)  # feed-forward: (1, in)


def test_init_ia3_weights():
    fast = fastpeft.get_peft_model(tiny_model("llama"), ia3_config("llama"))
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in fast.named_parameters() if n.endswith("ia3_l"))
    inputs = batch("llama")
    fast.eval()
    torch.testing.assert_close(fast(**inputs).logits, tiny_model("llama")(**inputs).logits, **DENSE)
    fast = fastpeft.get_peft_model(tiny_model("llama"), ia3_config("llama", init_ia3_weights=False))
    assert all(not torch.equal(p, torch.ones_like(p)) for n, p in fast.named_parameters() if n.endswith("ia3_l"))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_save_with_fastpeft_load_with_peft_and_back(arch, tmp_path):
    base = tiny_model(arch)
    peft_model, fast = ia3_twins(base, ia3_config(arch))
    inputs = batch(arch)
    fast.save_pretrained(tmp_path / "fast")
    loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast")
    assert adapted_layers(loaded_peft) == adapted_layers(fast)
    fast.eval()
    loaded_peft.eval()
    torch.testing.assert_close(loaded_peft(**inputs).logits, fast(**inputs).logits, **DENSE)

    peft_model.save_pretrained(tmp_path / "peft")
    loaded_fast = fastpeft.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert adapted_layers(loaded_fast) == adapted_layers(peft_model)
    peft_model.eval()
    loaded_fast.eval()
    torch.testing.assert_close(loaded_fast(**inputs).logits, peft_model(**inputs).logits, **DENSE)


def test_nf4_checkpoint_round_trip(tmp_path):
    peft_model, fast = ia3_twins(tiny_model_4bit("llama", tmp_path), ia3_config("llama"))
    fast.save_pretrained(tmp_path / "fast")
    loaded = fastpeft.from_pretrained(tiny_model_4bit("llama", tmp_path), str(tmp_path / "fast"))
    inputs = batch("llama")
    for model in (fast, loaded, peft_model):
        model.eval()
    torch.testing.assert_close(loaded(**inputs).logits, fast(**inputs).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(**inputs).logits, peft_model(**inputs).logits, **NF4)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_equals_peft(arch):
    peft_model, fast = ia3_twins(tiny_model(arch), ia3_config(arch))
    inputs = batch(arch)
    fast.eval()
    peft_model.eval()
    unmerged = fast(**inputs).logits
    merged = fast.merge_and_unload()
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    peft_merged = peft_model.merge_and_unload()
    logits = merged(**inputs).logits
    torch.testing.assert_close(logits, peft_merged(**inputs).logits, **DENSE)
    torch.testing.assert_close(logits, unmerged, rtol=1e-4, atol=1e-4)  # scaled weights round differently


def test_unload_restores_the_base_model():
    base = tiny_model("qwen2")
    _, fast = ia3_twins(base, ia3_config("qwen2"))
    plain = fast.unload()
    assert not any(isinstance(m, IA3Linear) for m in plain.modules())
    inputs = batch("qwen2")
    torch.testing.assert_close(plain(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)


def _fingerprint(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
    }


def _assert_unchanged(model, fingerprint):
    modules, params = fingerprint
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    assert set(n for n, _ in model.named_parameters()) == set(params)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1], n


def test_merge_on_4bit_raises_before_changing_anything(tmp_path):
    _, fast = ia3_twins(tiny_model_4bit("llama", tmp_path), ia3_config("llama"))
    inputs = batch("llama")
    fast.eval()
    before = fast(**inputs).logits
    fingerprint = _fingerprint(fast)
    with pytest.raises(NotImplementedError, match="dense base layers.*4-bit base.*Nothing was merged"):
        fast.merge_and_unload()
    _assert_unchanged(fast, fingerprint)
    assert torch.equal(fast(**inputs).logits, before)


def test_unsupported_options_and_modules_raise_before_touching_the_model():
    model = tiny_model("llama")
    fingerprint = _fingerprint(model)
    with pytest.raises(NotImplementedError, match="fan_in_fan_out=True"):
        fastpeft.get_peft_model(model, ia3_config("llama", fan_in_fan_out=True))
    config = ia3_config("llama")
    config.layers_to_transform = [0]  # an option of other peft versions' configs
    with pytest.raises(NotImplementedError, match=r"layers_to_transform=\[0\]"):
        fastpeft.get_peft_model(model, config)
    with pytest.raises(NotImplementedError, match=r"embed_tokens \(Embedding\)"):
        fastpeft.get_peft_model(model, ia3_config("llama", target_modules=["k_proj", "embed_tokens"],
                                                  feedforward_modules=[]))  # fmt: skip
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.get_peft_model(model, ia3_config("llama", target_modules=["nonexistent"], feedforward_modules=[]))
    _assert_unchanged(model, fingerprint)

    custom = torch.nn.Sequential(torch.nn.Linear(8, 8))  # no model type: peft has no defaults for it
    fingerprint = _fingerprint(custom)
    with pytest.raises(ValueError, match="IA3Config.target_modules is None.*model type None"):
        fastpeft.get_peft_model(custom, peft.IA3Config())
    _assert_unchanged(custom, fingerprint)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_steps_follow_peft(arch):
    peft_model, fast = ia3_twins(tiny_model(arch), ia3_config(arch))
    losses = {}
    for key, model in (("peft", peft_model), ("fast", fast)):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[key] = []
        for step in range(4):
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch(arch, seed=step)).loss
            loss.backward()
            optimizer.step()
            losses[key].append(loss.item())
    assert losses["fast"][-1] != losses["fast"][0]
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["peft"]), **DENSE)
    trained = {n: p for n, p in peft.get_peft_model_state_dict(peft_model).items()}
    for name, p in fast.adapter_state_dict().items():
        torch.testing.assert_close(p, trained[name], rtol=1e-4, atol=1e-5, msg=name)
