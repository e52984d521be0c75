"""LoRA on embeddings (peft's ``lora.Embedding``) through ``fastpeft.get_peft_model`` and
``fastpeft.patch`` on tiny Llama and BERT: parity with peft, checkpoints both ways, merge, LoRA+."""

import copy
import importlib
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft.optimizers import create_loraplus_optimizer  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.nn import LoRAEmbedding, LoRALinear  # noqa: E402
from tests.integrations.helpers import assert_parity, batch, lora_config, peft_to_fastpeft_name, tiny_model, tiny_model_4bit  # noqa: E402
from tests.utils import assert_close  # noqa: E402

patch_module = importlib.import_module("fastpeft.integrations.patch")
patch_embedding = importlib.import_module("fastpeft.integrations.patch_lora_embedding")

TARGETS = {"llama": ["embed_tokens", "q_proj", "v_proj"], "qwen2": ["embed_tokens", "q_proj", "v_proj"],
           "bert": ["word_embeddings", "query", "value"]}
EMBEDDING = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "bert": "bert.embeddings.word_embeddings"}


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.normal_(0, 0.05)


def _twins(arch, model=None, **config):
    model = tiny_model(arch) if model is None else model
    cfg = lora_config(arch, target_modules=TARGETS[arch], **config)
    peft_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    _randomize(peft_model)
    fast = fastpeft.get_peft_model(copy.deepcopy(model), cfg)
    fast._assign_adapter(peft.get_peft_model_state_dict(peft_model))
    return model, peft_model, fast


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_get_peft_model_parity(arch):
    _, peft_model, fast = _twins(arch)
    layer = fast.base_model.model.get_submodule(EMBEDDING[arch])
    assert isinstance(layer, LoRAEmbedding)
    assert sum(isinstance(m, LoRALinear) for m in fast.modules()) == 4
    assert fast.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]
    grads = assert_parity(peft_model, fast, batch(arch))
    name = f"base_model.model.{EMBEDDING[arch]}.lora_embedding_A"
    assert grads[name].abs().sum() > 0


def test_nf4_model_parity(tmp_path):
    """The embedding stays dense in a 4-bit model; the projections are NF4."""
    _, peft_model, fast = _twins("llama", model=tiny_model_4bit("llama", tmp_path))
    assert isinstance(fast.base_model.model.model.embed_tokens, LoRAEmbedding)
    assert all(m.is_4bit for m in fast.modules() if isinstance(m, LoRALinear))
    assert_parity(peft_model, fast, batch("llama"))


def test_same_init_as_peft_with_the_same_seed():
    model = tiny_model("llama")
    cfg = lora_config("llama", target_modules=TARGETS["llama"])
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    torch.manual_seed(3)
    fast = fastpeft.get_peft_model(copy.deepcopy(model), cfg)
    ref = {peft_to_fastpeft_name(k): v for k, v in peft_model.named_parameters() if "lora_" in k}
    own = {k: v for k, v in fast.named_parameters() if "lora_" in k}
    assert set(ref) == set(own)
    assert all(torch.equal(own[k], ref[k]) for k in ref)


def test_checkpoints_both_ways(tmp_path):
    model, peft_model, fast = _twins("llama")
    inputs = batch("llama")
    fast.save_pretrained(tmp_path / "fast")
    peft_model.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    saved_f = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    saved_p = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(saved_f) == set(saved_p)  # peft also saves the targeted embed_tokens' base weight
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved_f
    assert all(torch.equal(saved_f[k], saved_p[k]) for k in saved_p)
    loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fast")
    loaded_fast = fastpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    assert isinstance(loaded_fast.base_model.model.model.embed_tokens, LoRAEmbedding)
    for m in (fast, peft_model, loaded_peft, loaded_fast):
        m.eval()
    with torch.no_grad():
        assert_close(loaded_peft(**inputs).logits, fast(**inputs).logits, scale=10)
        assert_close(loaded_fast(**inputs).logits, peft_model(**inputs).logits, scale=10)


def test_merge_and_unload_matches_peft():
    _, peft_model, fast = _twins("bert")
    merged_p, merged_f = peft_model.merge_and_unload(), fast.merge_and_unload()
    assert type(merged_f.bert.embeddings.word_embeddings) is torch.nn.Embedding
    sd_p, sd_f = merged_p.state_dict(), merged_f.state_dict()
    assert set(sd_p) == set(sd_f)
    for name in sd_p:
        assert_close(sd_f[name], sd_p[name], scale=10, msg=name)


def test_loraplus_embedding_group_matches_peft():
    _, peft_model, fast = _twins("llama")
    ref = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8,
                                    loraplus_lr_embedding=1e-5)  # fmt: skip
    opt = fast.create_optimizer(lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5)
    names_p = {id(p): peft_to_fastpeft_name(n) for n, p in peft_model.named_parameters()}
    names_f = {id(p): n for n, p in fast.named_parameters()}
    for gp, gf in zip(ref.param_groups, opt.param_groups, strict=True):
        assert [names_p[id(p)] for p in gp["params"]] == [names_f[id(p)] for p in gf["params"]]
        assert gp["lr"] == gf["lr"] and gp["weight_decay"] == gf["weight_decay"]
    assert len(opt.param_groups[1]["params"]) == 2 and opt.param_groups[1]["lr"] == 1e-5


def test_lifecycle_calls_refused_with_embedding_layers():
    _, _, fast = _twins("llama")
    with pytest.raises(NotImplementedError, match="embedding LoRA"):
        fast.add_adapter("other", lora_config("llama", target_modules=["q_proj"]))


def test_bad_embedding_base_raises_before_touching_the_model():
    model = tiny_model("llama")
    model.model.embed_tokens.max_norm = 1.0
    with pytest.raises(NotImplementedError, match="embed_tokens.*max_norm"):
        fastpeft.get_peft_model(model, lora_config("llama", target_modules=TARGETS["llama"]))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_patch_fuses_peft_embedding_layers(arch):
    model = tiny_model(arch)
    cfg = lora_config(arch, target_modules=TARGETS[arch])
    reference = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    _randomize(reference)
    patched = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = fastpeft.patch(patched)
    embedding_name = f"base_model.model.{EMBEDDING[arch]}"
    assert embedding_name in report.patched and not report.skipped
    assert_parity(reference, patched, batch(arch))
    layer = patched.get_submodule(embedding_name)
    calls = []
    original = patch_embedding.lora_embedding_forward
    try:
        patch_embedding.lora_embedding_forward = lambda *a: calls.append(1) or original(*a)
        patched(**batch(arch))
        assert calls
        assert patch_module.explain(patched)[embedding_name] is None
        # peft's states run peft's forward: disabled adapters, adapter_names= mixed batches, merged
        with patched.disable_adapter():
            calls.clear()
            patched(**batch(arch))
            assert not calls
            assert patch_module.explain(patched)[embedding_name] == "adapters are disabled"
        ids = batch(arch)["input_ids"]
        calls.clear()
        mixed = layer(ids, adapter_names=["default"] * ids.shape[0])
        assert not calls
        assert_close(mixed, reference.get_submodule(embedding_name)(ids))
        layer.merge()
        assert patch_module.explain(patched)[embedding_name] == "adapters are merged into the base weight"
        layer.unmerge()
    finally:
        patch_embedding.lora_embedding_forward = original
    assert fastpeft.unpatch(patched) == len(report.patched)
    assert "forward" not in layer.__dict__


def test_checkpoint_without_the_base_embedding_loads():
    """peft's save_embedding_layers=False leaves the base embedding out; the adapter still loads."""
    model, peft_model, fast = _twins("llama")
    state = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert not any("base_layer" in k for k in state)
    fast._assign_adapter(state)
    with pytest.raises(fastpeft.integrations.checkpoint.CheckpointError, match="missing keys"):
        fast._assign_adapter({k: v for k, v in state.items() if "lora_embedding_B" not in k})


def test_merge_on_nf4_model_raises_before_the_embedding_changes(tmp_path):
    _, _, fast = _twins("llama", model=tiny_model_4bit("llama", tmp_path))
    weight = fast.base_model.model.model.embed_tokens.base_layer.weight.clone()
    with pytest.raises(NotImplementedError, match="dense base"):
        fast.merge_and_unload()
    layer = fast.base_model.model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and not layer.merged
    assert torch.equal(layer.base_layer.weight, weight)
