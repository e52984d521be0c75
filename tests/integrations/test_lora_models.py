"""fastpeft.get_peft_model against peft on tiny Llama, Qwen2 and BERT models (dense and NF4)."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.nn import LoRALinear  # noqa: E402
from tests.integrations.helpers import assert_checkpoints_both_ways, assert_parity, batch, lora_config, loss_and_grads, recorded_ops, tiny_model, tiny_model_4bit, twins  # noqa: E402
from tests.utils import assert_close  # noqa: E402

ARCHS = ["llama", "qwen2", "bert"]


def check_parity(peft_model, fast, arch, scale=10):
    assert_parity(peft_model, fast, batch(arch), scale=scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_parity_with_peft(arch):
    peft_model, fast = twins(tiny_model(arch), lora_config(arch))
    n_lora = sum(isinstance(m, LoRALinear) for m in fast.modules())
    n_peft = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert n_lora == n_peft > 0
    trainable, total = fast.get_nb_trainable_parameters()
    peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()
    assert trainable == peft_trainable
    # peft also keeps the original of every modules_to_save module beside its trained copy.
    copies = sum(p.numel() for n, p in peft_model.named_parameters() if ".original_module." in n)
    assert total == peft_total - copies
    check_parity(peft_model, fast, arch)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_nf4_parity_with_peft(arch, tmp_path):
    model = tiny_model_4bit(arch, tmp_path)
    peft_model, fast = twins(model, lora_config(arch))
    assert all(m.is_4bit for m in fast.modules() if isinstance(m, LoRALinear))
    check_parity(peft_model, fast, arch)


def test_rank_and_alpha_patterns_and_rslora():
    config = lora_config("llama", rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 3}, use_rslora=True)
    peft_model, fast = twins(tiny_model("llama"), config)
    layers = {n: m for n, m in fast.named_modules() if isinstance(m, LoRALinear)}
    assert layers["base_model.model.model.layers.0.self_attn.q_proj"].r == 4
    assert layers["base_model.model.model.layers.1.mlp.down_proj"].lora_alpha == 3
    check_parity(peft_model, fast, "llama")


def test_print_trainable_parameters(capsys):
    fast = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    fast.print_trainable_parameters()
    trainable, total = fast.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    assert trainable == sum(p.numel() for n, p in fast.named_parameters() if "lora_" in n)


def test_save_with_fastpeft_load_with_peft_and_back(tmp_path):
    base = tiny_model("bert")
    peft_model, fast = twins(base, lora_config("bert"))
    assert_checkpoints_both_ways(base, peft_model, fast, batch("bert"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def _model_fingerprint(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
    }


def _assert_unchanged(model, fingerprint):
    modules, params = fingerprint
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1], n


def test_corrupted_checkpoints_raise_and_leave_the_model_unchanged(tmp_path):
    base = tiny_model("llama")
    _, fast = twins(base, lora_config("llama"))
    fast.save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    config_text = (tmp_path / "good" / "adapter_config.json").read_text()

    def variant(name, weights_bytes=weights, config=config_text):
        folder = tmp_path / name
        folder.mkdir()
        if weights_bytes is not None:
            (folder / "adapter_model.safetensors").write_bytes(weights_bytes)
        if config is not None:
            (folder / "adapter_config.json").write_text(config)
        return str(folder)

    cases = {
        variant("truncated", weights[: len(weights) // 2]): "not a readable safetensors file",
        variant("garbage", b"\x00" * 64): "not a readable safetensors file",
        variant("no_weights", None): "no adapter_model.safetensors",
        variant("bad_json", config=config_text[:40]): "is not valid JSON",
        variant("no_config", config=None): "no adapter_config.json",
        variant("other_rank", config=config_text.replace('"r": 8', '"r": 4')): "shape mismatches",
    }
    target = tiny_model("llama")
    fingerprint = _model_fingerprint(target)
    for folder, message in cases.items():
        with pytest.raises(fastpeft.integrations.CheckpointError, match=message):
            fastpeft.from_pretrained(target, folder)
        _assert_unchanged(target, fingerprint)
    # load_adapter into an existing model also refuses without touching its weights
    other = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama", r=4))
    fingerprint = _model_fingerprint(other)
    with pytest.raises(fastpeft.integrations.CheckpointError, match="shape mismatches"):
        other.load_adapter(str(tmp_path / "good"))
    _assert_unchanged(other, fingerprint)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    (tmp_path / "adapter_config.json").write_text(lora_config("llama").to_json_string() if hasattr(
        lora_config("llama"), "to_json_string") else '{"peft_type": "LORA", "r": 8}')  # fmt: skip
    with pytest.raises(fastpeft.integrations.CheckpointError, match="does not load pickles"):
        fastpeft.from_pretrained(tiny_model("llama"), str(tmp_path))


def test_save_is_atomic(tmp_path, monkeypatch):
    _, fast = twins(tiny_model("llama"), lora_config("llama"))
    fast.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    import safetensors.torch

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with torch.no_grad():
        next(p for n, p in fast.named_parameters() if "lora_A" in n).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        fast.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_merge_and_unload_and_unload():
    model = tiny_model("llama")
    peft_model, fast = twins(model, lora_config("llama"))
    inputs = batch("llama")
    fast.eval()
    expected = fast(**inputs).logits
    merged = fast.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert_close(merged(**inputs).logits, expected, scale=100)
    _, fast2 = twins(tiny_model("llama"), lora_config("llama"))
    plain = fast2.unload()
    assert_close(plain(**inputs).logits, tiny_model("llama")(**inputs).logits)


def test_unsupported_options_and_modules_raise_before_touching_the_model():
    model = tiny_model("llama")
    fingerprint = _model_fingerprint(model)
    with pytest.raises(NotImplementedError, match="lora_bias=True"):
        fastpeft.get_peft_model(model, lora_config("llama", lora_bias=True))
    with pytest.raises(NotImplementedError, match=r"rotary_emb \(LlamaRotaryEmbedding\)"):
        fastpeft.get_peft_model(model, lora_config("llama", target_modules=["q_proj", "rotary_emb"]))
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.get_peft_model(model, lora_config("llama", target_modules=["nonexistent"]))
    with pytest.raises(NotImplementedError, match=r"supports \[.*'LORA'.*\] configs, got LoHaConfig"):
        fastpeft.get_peft_model(model, peft.LoHaConfig(target_modules=["q_proj"]))  # a method fastpeft lacks
    _assert_unchanged(model, fingerprint)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = lora_config("llama", lora_dropout=0.1)
    _, fast = twins(tiny_model("llama"), config)
    fast.train()
    inputs = batch("llama")
    torch.manual_seed(5)
    _, loss, grads = loss_and_grads(fast, inputs)
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert fast.base_model.model.is_gradient_checkpointing
    torch.manual_seed(5)
    _, loss_ckpt, grads_ckpt = loss_and_grads(fast, inputs)
    assert_close(loss_ckpt, loss)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], scale=10, msg=name)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    _, fast = twins(tiny_model("llama"), lora_config("llama"))
    inputs = batch("llama")
    logits, loss, grads = loss_and_grads(fast, inputs)
    compiled = torch.compile(fast, backend="aot_eager")
    logits_c, loss_c, grads_c = loss_and_grads(compiled, inputs)
    assert_close(logits_c, logits, scale=10)
    for name in grads:
        assert_close(grads_c[name], grads[name], scale=10, msg=name)


def test_hf_trainer_trains_the_adapter_only(tmp_path):
    from transformers import Trainer, TrainingArguments

    fast = fastpeft.get_peft_model(tiny_model("llama"), lora_config("llama"))
    frozen_before = {n: p.detach().clone() for n, p in fast.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in fast.named_parameters() if p.requires_grad}
    data = [{k: v[0] for k, v in batch("llama", seed=s, batch_size=1).items()} for s in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)  # fmt: skip
    Trainer(model=fast, args=args, train_dataset=data).train()
    for n, p in fast.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in fast.named_parameters() if n in lora_before)


def test_patch_and_unpatch_a_peft_model():
    peft_model, _ = twins(tiny_model("qwen2"), lora_config("qwen2", lora_dropout=0.0))
    inputs = batch("qwen2")
    peft_model.eval()
    expected = peft_model(**inputs).logits
    assert not any("fastpeft" in n for n in recorded_ops(peft_model, inputs))

    report = fastpeft.patch(peft_model)
    n_layers = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert len(report.patched) == n_layers and not report.skipped
    n_ops = n_layers - sum(len(g) - 1 for g in report.groups)  # q/k/v and gate/up run as one op each
    assert report.groups and sum("fastpeft.lora_linear" in n for n in recorded_ops(peft_model, inputs)) == n_ops
    assert_close(peft_model(**inputs).logits, expected, scale=10)

    assert fastpeft.unpatch(peft_model) == n_layers
    assert not any("fastpeft" in n for n in recorded_ops(peft_model, inputs))
    assert torch.equal(peft_model(**inputs).logits, expected)


def test_patch_reports_every_layer_it_cannot_fuse():
    config = lora_config("llama", target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = tiny_model("llama")
    model.model.embed_tokens.max_norm = 1.0  # embedding LoRA is fused, but not over max_norm embeddings
    peft_model = peft.get_peft_model(model, config)
    with pytest.warns(UserWarning, match="2 x|1 x"):
        report = fastpeft.patch(peft_model)
    assert len(report.patched) == 4  # q and v in 2 layers
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "max_norm" in report.skipped["base_model.model.model.embed_tokens"]
    with_bias = peft.get_peft_model(tiny_model("llama"), lora_config("llama", lora_bias=True))
    report = fastpeft.patch(with_bias, warn=False)
    assert not report.patched and all("lora_bias=True" in r for r in report.skipped.values())


def test_patched_model_trains_like_peft():
    peft_model, _ = twins(tiny_model("llama"), lora_config("llama"))
    reference = copy.deepcopy(peft_model)
    fastpeft.patch(peft_model)
    inputs = batch("llama")
    _, loss_p, grads_p = loss_and_grads(reference, inputs)
    _, loss_f, grads_f = loss_and_grads(peft_model, inputs)
    assert_close(loss_f, loss_p)
    for name in grads_p:
        assert_close(grads_f[name], grads_p[name], scale=10, msg=name)
