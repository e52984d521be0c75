"""Prompt learning through fastpeft.get_peft_model: peft-format checkpoints both ways, corrupted
checkpoints, prompt-tuning initialisations and configuration errors."""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.integrations import CheckpointError  # noqa: E402
from tests.integrations.helpers import tiny_model  # noqa: E402
from tests.integrations.prompt_helpers import P, batch, config, prompt_module, tiny_tokenizer, twins  # noqa: E402
from tests.utils import assert_close  # noqa: E402

# (arch, kind): every config type, causal and SEQ_CLS (the classifier travels in the checkpoint)
CASES = [("llama", "prompt_tuning"), ("bert", "prompt_tuning"), ("llama", "p_tuning_mlp"), ("bert", "p_tuning_lstm"),
         ("qwen2", "prefix"), ("bert", "prefix"), ("llama", "prefix_projection"),
         ("bert", "prefix_projection")]  # fmt: skip


def _perturb_classifier(model):
    """SEQ_CLS: make the trained classifier differ from the base model's, so loading must carry it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.add_(0.1)


def _logits(model, arch):
    model.eval()
    return model(**batch(arch)).logits


@pytest.mark.parametrize("arch,kind", CASES)
def test_fastpeft_checkpoint_loads_in_peft_and_fastpeft(arch, kind, tmp_path):
    base = tiny_model(arch)
    _, ours = twins(base, config(kind, arch))
    _perturb_classifier(ours)
    ours.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["inference_mode"] is True and saved["peft_type"] == config(kind, arch).peft_type.value
    assert ours.peft_config.inference_mode is False  # the live config is not changed by saving
    want = _logits(ours, arch)
    loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close(_logits(loaded_peft, arch), want, scale=10)
    loaded_fast = fastpeft.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close(_logits(loaded_fast, arch), want, scale=10)


@pytest.mark.parametrize("arch,kind", CASES)
def test_peft_checkpoint_loads_in_fastpeft(arch, kind, tmp_path):
    base = tiny_model(arch)
    theirs, _ = twins(base, config(kind, arch))
    _perturb_classifier(theirs)
    theirs.save_pretrained(str(tmp_path))
    want = _logits(theirs, arch)
    loaded = fastpeft.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close(_logits(loaded, arch), want, scale=10)
    # and back: what fastpeft saves again is what peft saved
    loaded.save_pretrained(str(tmp_path / "again"))
    from safetensors.torch import load_file

    first, second = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(
        str(tmp_path / "again" / "adapter_model.safetensors"))  # fmt: skip
    assert set(first) == set(second)
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix"])
def test_load_adapter_into_a_trainable_model(kind, tmp_path):
    base = tiny_model("llama")
    theirs, _ = twins(base, config(kind))
    theirs.save_pretrained(str(tmp_path))
    target = fastpeft.get_peft_model(copy.deepcopy(base), config(kind))
    target.load_adapter(str(tmp_path))
    want = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(prompt_module(target).embedding.weight, want)
    assert prompt_module(target).embedding.weight.requires_grad


@pytest.mark.parametrize("kind", ["p_tuning_mlp", "prefix_projection"])
def test_encoder_output_checkpoints_are_refused_by_trainable_encoders(kind, tmp_path):
    base = tiny_model("llama")
    theirs, _ = twins(base, config(kind))
    theirs.save_pretrained(str(tmp_path))
    target = fastpeft.get_peft_model(copy.deepcopy(base), config(kind))
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(CheckpointError, match="output of the reparameterising encoder.*inference_mode=True"):
        target.load_adapter(str(tmp_path))
    for n, p in target.named_parameters():
        assert torch.equal(p, before[n]), n
    # with inference_mode=True (what the saved config says) it loads as a fixed table
    fixed = fastpeft.get_peft_model(copy.deepcopy(base), config(kind, inference_mode=True))
    fixed.load_adapter(str(tmp_path))
    got, want = _logits(fixed, "llama"), _logits(theirs, "llama")
    keep = batch("llama")["attention_mask"].bool()
    if kind.startswith("prefix"):  # padded query rows differ under prefix tuning
        got, want = got[keep], want[keep]
    assert_close(got, want, scale=10)


def _fingerprint(model):
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    return [n for n, _ in model.named_modules()], params, model.config._attn_implementation


def _assert_unchanged(model, fingerprint):
    modules, params, attn = fingerprint
    assert [n for n, _ in model.named_modules()] == modules and model.config._attn_implementation == attn
    assert "prepare_inputs_for_generation" not in model.__dict__
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1], n


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix"])
def test_corrupted_checkpoints_raise_and_leave_the_model_unchanged(kind, tmp_path):
    _, ours = twins(tiny_model("llama"), config(kind))
    ours.save_pretrained(str(tmp_path / "good"))
    weights = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    text = (tmp_path / "good" / "adapter_config.json").read_text()

    def variant(name, weights_bytes=weights, config_text=text):
        folder = tmp_path / name
        folder.mkdir()
        if weights_bytes is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights_bytes)
        (folder / "adapter_config.json").write_text(config_text)
        return str(folder)

    cases = {
        variant("truncated", weights[: len(weights) // 2]): "not a readable safetensors file",
        variant("garbage", b"\x01" * 64): "not a readable safetensors file",
        variant("no_weights", None): "no adapter_model.safetensors",
        variant("bad_json", config_text=text[:30]): "is not valid JSON",
        variant("longer", config_text=text.replace(f'"num_virtual_tokens": {P}', '"num_virtual_tokens": 7')):
            "shape mismatches",
    }  # fmt: skip
    target = tiny_model("llama")
    fingerprint = _fingerprint(target)
    for folder, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            fastpeft.from_pretrained(target, folder)
        _assert_unchanged(target, fingerprint)
    other = fastpeft.get_peft_model(tiny_model("llama"), config(kind, num_virtual_tokens=7))
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(CheckpointError, match="shape mismatches"):
        other.load_adapter(str(tmp_path / "good"))
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_prompt_tuning_initialisations_match_peft(tmp_path):
    base = tiny_model("llama")
    words = base.get_input_embeddings().weight
    folder = tiny_tokenizer(tmp_path / "tok")
    text = config("prompt_tuning", prompt_tuning_init="TEXT", prompt_tuning_init_text="w5 w9 w3",
                  tokenizer_name_or_path=folder)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(text))
    ours = fastpeft.get_peft_model(copy.deepcopy(base), text)
    table = prompt_module(ours).embedding.weight
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    torch.testing.assert_close(table, words[[5, 9, 3, 5]])  # repeated to P = 4, as peft does
    vocab = config("prompt_tuning", prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(vocab))
    torch.manual_seed(3)
    ours = fastpeft.get_peft_model(copy.deepcopy(base), vocab)
    table = prompt_module(ours).embedding.weight
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    assert all((words - row).abs().sum(1).min() == 0 for row in table)  # every row is a word's embedding
    rand = fastpeft.get_peft_model(copy.deepcopy(base), config("prompt_tuning"))
    weight = prompt_module(rand).embedding.weight
    assert weight.shape == (P, 64) and 0.3 < weight.std() < 3  # N(0, 1), as peft's nn.Embedding


def _edited(cfg, **fields):
    """``cfg`` with fields set after construction (as an edited or hand-written config would have)."""
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def test_bad_configs_raise_before_touching_the_model():
    model = tiny_model("llama")
    fingerprint = _fingerprint(model)
    bad = {
        "task_type": (_edited(config("prompt_tuning"), task_type="TOKEN_CLS"), NotImplementedError),
        "prompt_tuning_init_text": (_edited(config("prompt_tuning"), prompt_tuning_init="TEXT"), ValueError),
        "prompt_tuning_init='BOGUS'": (_edited(config("prompt_tuning"), prompt_tuning_init="BOGUS"),
                                       NotImplementedError),
        "encoder_num_layers": (config("p_tuning_mlp", encoder_num_layers=3), ValueError),
        "encoder_reparameterization_type": (_edited(config("p_tuning_mlp"), encoder_reparameterization_type="GRU"),
                                            ValueError),
        "num_layers=5": (config("prefix", num_layers=5), ValueError),
        "num_virtual_tokens must be": (_edited(config("prompt_tuning"), num_virtual_tokens=0), ValueError),
        "num_transformer_submodules=2": (config("prompt_tuning", num_transformer_submodules=2), NotImplementedError),
        "init_weights must be": (_edited(config("prefix"), init_weights="ones"), ValueError),
    }  # fmt: skip
    for message, (cfg, error) in bad.items():
        with pytest.raises(error, match=message):
            fastpeft.get_peft_model(model, cfg)
        _assert_unchanged(model, fingerprint)


def test_prefix_tuning_init_zero():
    _, ours = twins(tiny_model("llama"), config("prefix", init_weights="zero"))
    assert prompt_module(ours).embedding.weight.abs().max() == 0
