"""BitFit and FishMask through fastpeft.get_peft_model on tiny BERT (SEQ_CLS) and Llama models:
parameter selection, training against a dense-masked torch AdamW, bit-identical frozen entries,
the Fisher mask against fastpeft.optim.fisher_mask, checkpoints (round trip and corruption),
config errors and bitsandbytes 4-bit models. peft has neither method, so the references are
plain torch and fastpeft.optim."""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import BitFitConfig, FishMaskConfig  # noqa: E402
from fastpeft.integrations import CheckpointError  # noqa: E402
from fastpeft.integrations.checkpoint import WEIGHTS_NAME, config_to_json, load_config  # noqa: E402
from fastpeft.integrations.sparse import trained_mask  # noqa: E402
from fastpeft.optim import fisher_mask  # noqa: E402
from fastpeft.optim.masks import dense_mask_of  # noqa: E402
from tests.integrations.helpers import VOCAB, batch, tiny_model, tiny_model_4bit  # noqa: E402
from tests.utils import assert_close  # noqa: E402

P = "base_model.model."


def llama_with_biases(seed: int = 0):
    """Tiny Llama with attention and MLP biases (stock Llama has none, so BitFit has nothing)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attention_bias=True, mlp_bias=True))  # fmt: skip


def make_model(arch):
    return llama_with_biases() if arch == "llama_bias" else tiny_model(arch)


def data_arch(arch):
    return "bert" if arch == "bert" else "llama"


def calib(arch, n=4):
    return [batch(data_arch(arch), seed=100 + i, batch_size=2) for i in range(n)]


def config_for(method, arch, **kwargs):
    if arch == "bert":
        kwargs.setdefault("task_type", "SEQ_CLS")
    if method == "bitfit":
        return BitFitConfig(**kwargs)
    kwargs.setdefault("keep_ratio", 0.02)
    return FishMaskConfig(**kwargs)


def inject(method, arch, model=None, **kwargs):
    model = make_model(arch) if model is None else model
    extra = {"batches": calib(arch)} if method == "fishmask" else {}
    return fastpeft.get_peft_model(model, config_for(method, arch, **kwargs), **extra)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for n, t in before.items():
        assert torch.equal(after[n], t), n


def trainable_names(fast):
    return {n for n, p in fast.base_model.model.named_parameters() if p.requires_grad}


# ---- selection ---------------------------------------------------------------------------------


def test_bitfit_all_selects_exactly_the_biases_and_the_head():
    fast = inject("bitfit", "bert")
    params = dict(fast.base_model.model.named_parameters())
    expected = {n for n in params if n.endswith(".bias")} | {"classifier.weight"}
    assert trainable_names(fast) == expected
    assert set(trained_mask(fast)) == expected and all(v is None for v in trained_mask(fast).values())
    trainable, total = fast.get_nb_trainable_parameters()
    assert trainable == sum(params[n].numel() for n in expected)
    assert total == sum(p.numel() for p in params.values())


def test_bitfit_query_mlp2_variant():
    fast = inject("bitfit", "bert", which="query_mlp2")
    expected = {f"bert.encoder.layer.{i}.{m}.bias" for i in range(2) for m in ("attention.self.query", "output.dense")}
    assert trainable_names(fast) == expected | {"classifier.weight", "classifier.bias"}
    fast = inject("bitfit", "llama_bias", which="query_mlp2")
    modules = ("self_attn.q_proj", "mlp.down_proj")
    assert trainable_names(fast) == {f"model.layers.{i}.{m}.bias" for i in range(2) for m in modules}


def test_bitfit_on_llama_with_biases_and_without():
    fast = inject("bitfit", "llama_bias")
    params = dict(fast.base_model.model.named_parameters())
    assert trainable_names(fast) == {n for n in params if n.endswith(".bias")}
    assert len(trainable_names(fast)) == 2 * 7  # q, k, v, o, gate, up, down per layer
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matched no parameter.*Llama has none"):
        fastpeft.get_peft_model(model, BitFitConfig())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_explicit_modules_to_save_are_dense_and_counted():
    fast = inject("bitfit", "llama_bias", modules_to_save=["lm_head"])
    assert "lm_head.weight" in trainable_names(fast)
    assert trained_mask(fast)["lm_head.weight"] is None
    assert P + "lm_head.weight" in fast.adapter_state_dict()


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_fishmask_mask_equals_fisher_mask(arch, scope):
    model = tiny_model(arch)
    reference = fisher_mask(copy.deepcopy(model), calib(arch), 0.02, scope=scope,
                            dense_modules=("classifier",) if arch == "bert" else ())  # fmt: skip
    fast = inject("fishmask", arch, model=model, scope=scope)
    mask = trained_mask(fast)
    assert list(mask) == [n for n, _ in model.named_parameters() if n in reference]
    for name, idx in reference.items():
        assert (mask[name] is None) == (idx is None), name
        if idx is not None:
            assert torch.equal(mask[name], idx), name
    assert trainable_names(fast) == set(mask)
    # The trainable count is the trained entries, not the tensors that hold them.
    params = dict(model.named_parameters())
    entries = sum(params[n].numel() if idx is None else idx.numel() for n, idx in reference.items())
    assert fast.get_nb_trainable_parameters()[0] == entries < sum(params[n].numel() for n in reference)


def test_fishmask_num_samples_exclude_and_loss_fn():
    model = tiny_model("llama")
    loss_fn = lambda m, b: m(**b).logits.float().pow(2).mean()  # noqa: E731
    reference = fisher_mask(copy.deepcopy(model), calib("llama"), 0.05, loss_fn=loss_fn, num_samples=2,
                            include=lambda n, p: "embed_tokens" not in n and "lm_head" not in n)  # fmt: skip
    config = FishMaskConfig(keep_ratio=0.05, num_samples=2, exclude=("embed_tokens", "lm_head.weight"))
    fast = fastpeft.get_peft_model(model, config, batches=calib("llama"), loss_fn=loss_fn)
    mask = trained_mask(fast)
    assert set(mask) == set(reference) and not any("embed_tokens" in n or "lm_head" in n for n in mask)
    assert all(torch.equal(mask[n], reference[n]) for n in mask)


def test_fishmask_from_a_given_mask():
    model = tiny_model("llama")
    given = fisher_mask(copy.deepcopy(model), calib("llama"), 0.01)
    fast = fastpeft.get_peft_model(model, FishMaskConfig(keep_ratio=0.01), mask=given)
    mask = trained_mask(fast)
    assert mask.keys() == given.keys() and all(torch.equal(mask[n], given[n]) for n in given)
    with pytest.raises(ValueError, match="not both"):
        fastpeft.get_peft_model(tiny_model("llama"), FishMaskConfig(keep_ratio=0.01), mask=given,
                                batches=calib("llama"))  # fmt: skip
    bad = {"model.norm.weight": torch.tensor([3, 1], dtype=torch.int32)}
    with pytest.raises(ValueError, match="sorted"):
        fastpeft.get_peft_model(tiny_model("llama"), FishMaskConfig(keep_ratio=0.01), mask=bad)
    with pytest.raises(ValueError, match="does not have"):
        fastpeft.get_peft_model(tiny_model("llama"), FishMaskConfig(keep_ratio=0.01), mask={"nope.weight": None})


# ---- training ----------------------------------------------------------------------------------


def train(model, opt, arch, steps, masks=None):
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        model(**batch(data_arch(arch), seed=10 + step)).loss.backward()
        if masks is not None:  # the dense-masked practice: zero the gradient outside the mask
            params = dict(model.named_parameters())
            for name, idx in masks.items():
                params[name].grad.mul_(dense_mask_of(idx, params[name]))
        opt.step()


@pytest.mark.parametrize("method,arch", [("bitfit", "bert"), ("bitfit", "llama_bias"), ("fishmask", "bert"),
                                         ("fishmask", "llama")])  # fmt: skip
def test_training_equals_dense_masked_torch_adamw(method, arch):
    base = make_model(arch)
    before = snapshot(base)
    fast = inject(method, arch, model=copy.deepcopy(base))
    mask = trained_mask(fast)
    opt = fast.create_optimizer(lr=1e-2, weight_decay=0.0)
    assert type(opt).__name__ == "SparseMaskedAdamW"
    train(fast, opt, data_arch(arch), steps=4)

    reference = copy.deepcopy(base)
    ref_params = dict(reference.named_parameters())
    for name, p in ref_params.items():
        p.requires_grad_(name in mask)
    ref_opt = torch.optim.AdamW([ref_params[n] for n in mask], lr=1e-2, weight_decay=0.0)
    train(reference, ref_opt, data_arch(arch), steps=4, masks=mask)

    trained = dict(fast.base_model.model.named_parameters())
    changed = 0
    for name, p in ref_params.items():
        assert_close(trained[name].detach(), p.detach(), scale=10, msg=name)
        idx = mask.get(name, "frozen")
        if idx is None:
            changed += int(not torch.equal(trained[name], before[name]))
            continue
        outside = torch.ones(p.numel(), dtype=torch.bool)
        if idx != "frozen":
            outside[idx.long()] = False
            inside = idx.long()
            flat = trained[name].detach().reshape(-1)
            changed += int(not torch.equal(flat[inside], before[name].reshape(-1)[inside]))
        assert torch.equal(trained[name].detach().reshape(-1)[outside], before[name].reshape(-1)[outside]), name
    assert changed == len(mask)  # every trained tensor moved


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fishmask_masked_weight_grads_patch_the_masked_linears_and_train_like_dense_grads(arch):
    base = make_model(arch)
    # per_layer: every weight holds trained entries (a global top-2% of a tiny model is mostly embeddings)
    fast = inject("fishmask", arch, model=copy.deepcopy(base), scope="per_layer")
    dense = inject("fishmask", arch, model=copy.deepcopy(base), scope="per_layer", masked_weight_grads=False)
    mask = trained_mask(fast)
    assert mask.keys() == trained_mask(dense).keys()
    modules = dict(fast.base_model.model.named_modules())
    linears = {n.rpartition(".")[0] for n, idx in mask.items()
               if idx is not None and isinstance(modules.get(n.rpartition(".")[0]), torch.nn.Linear)}  # fmt: skip
    report = fast._injection.masked_grads
    assert len(linears) >= 6 and set(report.patched) == linears and not report.skipped
    assert dense._injection.masked_grads is None
    for model in (fast, dense):
        train(model, model.create_optimizer(lr=1e-2, weight_decay=0.0), data_arch(arch), steps=3)
    trained = dict(dense.base_model.model.named_parameters())
    for name, p in fast.base_model.model.named_parameters():
        assert_close(p.detach(), trained[name].detach(), scale=10, msg=name)
    model = fast.unload()
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_entries_outside_the_mask_stay_bit_identical_with_weight_decay():
    base = tiny_model("bert")
    before = snapshot(base)
    fast = inject("fishmask", "bert", model=base)
    mask = trained_mask(fast)
    train(fast, fast.create_optimizer(lr=1e-2, weight_decay=0.1), "bert", steps=3)
    for name, p in base.named_parameters():
        keep = torch.ones(p.numel(), dtype=torch.bool)
        if name in mask:
            keep[slice(None) if mask[name] is None else mask[name].long()] = False
        assert torch.equal(p.detach().reshape(-1)[keep], before[name].reshape(-1)[keep]), name
    # merge_and_unload / unload: the trained entries already are the base weights
    assert fast.merge_and_unload() is base and fast.unload() is base


# ---- checkpoints -------------------------------------------------------------------------------


def trained_and_saved(method, arch, folder):
    base = make_model(arch)
    fast = inject(method, arch, model=copy.deepcopy(base))
    train(fast, fast.create_optimizer(lr=1e-2), data_arch(arch), steps=2)
    fast.save_pretrained(str(folder))
    return base, fast


@pytest.mark.parametrize("method,arch", [("bitfit", "bert"), ("bitfit", "llama_bias"), ("fishmask", "bert"),
                                         ("fishmask", "llama")])  # fmt: skip
def test_checkpoint_round_trip(method, arch, tmp_path):
    from safetensors.torch import load_file

    base, fast = trained_and_saved(method, arch, tmp_path)
    mask = trained_mask(fast)
    saved = load_file(os.path.join(tmp_path, WEIGHTS_NAME))
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == f"FASTPEFT_{method.upper()}"
    expected_keys = set()
    for name, idx in mask.items():
        if idx is None:
            expected_keys.add(P + name)
        else:
            expected_keys |= {P + name + ".sparse_values", P + name + ".sparse_indices"}
            assert saved[P + name + ".sparse_indices"].dtype == torch.int32
            assert saved[P + name + ".sparse_values"].numel() == idx.numel()
    assert set(saved) == expected_keys  # only what was trained

    loaded = fastpeft.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert type(loaded.peft_config) is type(fast.peft_config) and loaded.peft_config == fast.peft_config
    assert trained_mask(loaded).keys() == mask.keys()
    inputs = batch(data_arch(arch), seed=5)
    fast.eval(), loaded.eval()
    assert torch.equal(loaded(**inputs).logits, fast(**inputs).logits)
    assert_same_state(loaded.base_model.model, snapshot(fast.base_model.model))


def rewrite(folder, tmp_path, name, edit):
    """A copy of the checkpoint in ``folder`` with its tensors changed by ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    out.mkdir()
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, out / WEIGHTS_NAME)
    return out


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _set(tensors, suffix, fn):
    key = first_key(tensors, suffix)
    tensors[key] = fn(tensors[key])


CORRUPTIONS = {
    "out_of_range": (lambda t: _set(t, ".sparse_indices", lambda i: i + 10**6), "indices in"),
    "unsorted": (lambda t: _set(t, ".sparse_indices", lambda i: i.flip(0)), "sorted"),
    "float_indices": (lambda t: _set(t, ".sparse_indices", lambda i: i.float()), "int32 or int64"),
    "values_count": (lambda t: _set(t, ".sparse_values", lambda v: v[:-1]), "shape|saved"),
    "int_values": (lambda t: _set(t, ".sparse_values", lambda v: v.to(torch.int32)), "not floating point"),
    "missing_values": (lambda t: t.pop(first_key(t, ".sparse_values")), "missing keys"),
    "unknown_param": (lambda t: t.update({P + "nope.weight.sparse_indices": torch.tensor([0])}), "names no parameter"),
    "head_shape": (lambda t: _set(t, "classifier.weight", lambda w: w[:1]), "saved"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_fishmask_checkpoint_raises_and_leaves_the_model_unchanged(corruption, tmp_path):
    base, _ = trained_and_saved("fishmask", "bert", tmp_path / "good")
    edit, message = CORRUPTIONS[corruption]
    folder = rewrite(tmp_path / "good", tmp_path, corruption, edit)
    before = snapshot(base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(CheckpointError, match=message):
        fastpeft.from_pretrained(base, str(folder))
    assert_same_state(base, before)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags


def test_mismatched_checkpoints_raise_and_leave_the_model_unchanged(tmp_path):
    _, fast = trained_and_saved("fishmask", "bert", tmp_path / "bert")
    llama = tiny_model("llama")
    before = snapshot(llama)
    with pytest.raises(CheckpointError, match="names no parameter"):
        fastpeft.from_pretrained(llama, str(tmp_path / "bert"))
    assert_same_state(llama, before)
    # load_adapter into a FishMask model with another mask: the indices differ
    other = inject("fishmask", "bert", keep_ratio=0.05)
    before = snapshot(other.base_model.model)
    with pytest.raises(CheckpointError, match="differs from this model's mask"):
        other.load_adapter(str(tmp_path / "bert"))
    assert_same_state(other.base_model.model, before)
    # a truncated file
    weights = (tmp_path / "bert" / WEIGHTS_NAME).read_bytes()
    (tmp_path / "bert" / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        fastpeft.from_pretrained(tiny_model("bert"), str(tmp_path / "bert"))
    # a BitFit checkpoint whose bias does not fit
    base, _ = trained_and_saved("bitfit", "bert", tmp_path / "bitfit")
    folder = rewrite(tmp_path / "bitfit", tmp_path, "short_bias", lambda t: _set(t, "query.bias", lambda b: b[:-1]))
    before = snapshot(base)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        fastpeft.from_pretrained(base, str(folder))
    assert_same_state(base, before)


# ---- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(keep_ratio=0.0), "keep_ratio must be in"),
    (dict(keep_ratio=1.5), "keep_ratio must be in"),
    (dict(keep_ratio=float("nan")), "keep_ratio must be a number"),
    (dict(keep_ratio=True), "keep_ratio must be a number"),
    (dict(keep_ratio=0.1, scope="layer"), "scope must be"),
    (dict(keep_ratio=0.1, num_samples=0), "num_samples must be"),
    (dict(keep_ratio=0.1, exclude="embed_tokens"), "exclude must be a list"),
    (dict(keep_ratio=0.1, peft_type="LORA"), "peft_type"),
    (dict(keep_ratio=0.1, masked_weight_grads=1), "masked_weight_grads must be a bool"),
])  # fmt: skip
def test_bad_fishmask_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FishMaskConfig(**kwargs)


def test_bad_bitfit_configs_and_missing_batches():
    with pytest.raises(ValueError, match="which must be 'all' or 'query_mlp2'"):
        BitFitConfig(which="attention")
    with pytest.raises(ValueError, match="modules_to_save must be a list"):
        BitFitConfig(modules_to_save="classifier")
    config = BitFitConfig()
    config.which = "attention"  # mutated after construction: the injector checks again
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="which must be"):
        fastpeft.get_peft_model(model, config)
    with pytest.raises(ValueError, match="needs calibration batches"):
        fastpeft.get_peft_model(model, FishMaskConfig(keep_ratio=0.1))
    assert all(p.requires_grad for p in model.parameters())


def test_configs_round_trip_through_json(tmp_path):
    configs = (
        BitFitConfig(which="query_mlp2", modules_to_save=["classifier"], task_type="SEQ_CLS"),
        FishMaskConfig(keep_ratio=0.01, num_samples=8, scope="per_layer", exclude=("embed_tokens",)),
    )
    for config in configs:
        (tmp_path / "adapter_config.json").write_text(config_to_json(config))
        assert load_config(str(tmp_path)) == config
    data = FishMaskConfig(keep_ratio=0.01).to_dict()
    data["keep_ratio"] = 2.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not describe a valid FASTPEFT_FISHMASK config.*keep_ratio"):
        load_config(str(tmp_path))


# ---- bitsandbytes 4-bit ------------------------------------------------------------------------


def packed_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


def test_bitfit_on_a_4bit_model_trains_biases_and_round_trips(tmp_path):
    model = tiny_model_4bit("bert", tmp_path)
    packed = packed_weights(model)
    assert packed
    fast = fastpeft.get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    params = dict(fast.base_model.model.named_parameters())
    assert trainable_names(fast) == {n for n in params if n.endswith(".bias")} | {"classifier.weight"}
    train(fast, fast.create_optimizer(lr=1e-2), "bert", steps=2)
    assert all(torch.equal(params[n], w) for n, w in packed.items())
    fast.save_pretrained(str(tmp_path / "ckpt"))
    loaded = fastpeft.from_pretrained(tiny_model_4bit("bert", tmp_path), str(tmp_path / "ckpt"))
    inputs = batch("bert", seed=5)
    fast.eval(), loaded.eval()
    assert torch.equal(loaded(**inputs).logits, fast(**inputs).logits)


def test_fishmask_on_a_4bit_model_raises_unless_quantized_weights_are_skipped(tmp_path):
    model = tiny_model_4bit("llama", tmp_path)
    before = snapshot(model)
    message = r"quantized \(4-bit\).*model\.layers\.0\.mlp\.down_proj.*skip_quantized"
    with pytest.raises(NotImplementedError, match=message):
        fastpeft.get_peft_model(model, FishMaskConfig(keep_ratio=0.05), batches=calib("llama"))
    assert_same_state(model, before)
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())

    packed = packed_weights(model)
    fast = fastpeft.get_peft_model(model, FishMaskConfig(keep_ratio=0.05, skip_quantized=True), batches=calib("llama"))
    mask = trained_mask(fast)
    assert mask and not set(mask) & set(packed)
    train(fast, fast.create_optimizer(lr=1e-2), "llama", steps=2)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in packed.items())
    fast.save_pretrained(str(tmp_path / "ckpt"))
    loaded = fastpeft.from_pretrained(tiny_model_4bit("llama", tmp_path), str(tmp_path / "ckpt"))
    inputs = batch("llama", seed=5)
    assert torch.equal(loaded(**inputs).logits, fast(**inputs).logits)
