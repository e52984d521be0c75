"""Bottleneck adapters (Houlsby / Pfeiffer) through fastpeft.get_peft_model on tiny BERT and Llama models.

peft has no bottleneck adapters and the ``adapters`` library does not install with transformers 5.17,
so the reference is the same model with a plain-PyTorch adapter ``h + up(act(down(LN?(h)))) * scaling``
written into its modules by hand (for BERT pfeiffer, the adapters library's SeqBn placement: the
adapter reads ``LayerNorm(h + input)`` and adds onto ``h``).
"""

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft import BottleneckAdapterConfig  # noqa: E402
from fastpeft.integrations import CheckpointError  # noqa: E402
from fastpeft.integrations.adapter import adapter_index  # noqa: E402
from fastpeft.nn import BottleneckAdapter  # noqa: E402
from tests.integrations.helpers import batch, loss_and_grads, tiny_model, tiny_model_4bit  # noqa: E402
from tests.utils import assert_close  # noqa: E402

ARCHS = ["bert", "llama"]
PLACEMENTS = ["pfeiffer", "houlsby"]
ACT = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "swish": nn.functional.silu}


def config_for(arch, **kwargs):
    kwargs.setdefault("bottleneck_size", 8)
    if arch == "bert":
        kwargs.setdefault("task_type", "SEQ_CLS")
    return BottleneckAdapterConfig(**kwargs)


def randomize_adapters(fast, seed=3):
    """Trained-looking adapters (the default init is near the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in fast.modules():
            if isinstance(m, BottleneckAdapter):
                for name, p in m.named_parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name == "ln_weight" else 0.0))


# ---- the plain-PyTorch reference ----------------------------------------------------------------------


class RefAdapter(nn.Module):
    """f(h) = up(act(down(LN?(h)))) * scaling with nn.Linear / nn.LayerNorm, from bank entry ``index``."""

    def __init__(self, fused: BottleneckAdapter, index=0):
        super().__init__()
        d, r = fused.hidden_size, fused.bottleneck_size
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
        self.ln = nn.LayerNorm(d) if fused.ln_before else None
        self.act, self.scaling = ACT[fused.activation], fused.scaling
        with torch.no_grad():
            self.down.weight.copy_(fused.down_weight[index])
            self.down.bias.copy_(fused.down_bias[index])
            self.up.weight.copy_(fused.up_weight[index])
            self.up.bias.copy_(fused.up_bias[index])
            if self.ln is not None:
                self.ln.weight.copy_(fused.ln_weight[index])
                self.ln.bias.copy_(fused.ln_bias[index])

    def forward(self, h):
        return self.up(self.act(self.down(self.ln(h) if self.ln is not None else h))) * self.scaling


class RefPostNormOutput(nn.Module):
    """BertSelfOutput / BertOutput with the adapter before the residual LayerNorm (SeqBn or DoubleSeqBn)."""

    def __init__(self, original, adapter, seq_bn):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = original.dense, original.dropout, original.LayerNorm
        self.adapter, self.seq_bn = adapter, seq_bn

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        h = h + self.adapter(self.LayerNorm(h + input_tensor) if self.seq_bn else h)
        return self.LayerNorm(h + input_tensor)


class RefSublayer(nn.Module):
    """A decoder MLP / self-attention whose output h becomes h + f(h)."""

    def __init__(self, inner, adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.adapter(out[0]), *out[1:])
        return out + self.adapter(out)


def reference(base, fast, placement, index=0):
    """``base`` (an unadapted copy) with RefAdapters holding ``fast``'s weights; returns (model, names)
    where names maps fast's adapter parameter names to the reference's."""
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    names = {}
    for name, m in fast.base_model.model.named_modules():
        if not isinstance(m, BottleneckAdapter):
            continue
        site = name.rpartition(".")[0]
        parent_name, _, child = site.rpartition(".")
        parent, original = ref.get_submodule(parent_name), ref.get_submodule(site)
        adapter = RefAdapter(m, index)
        if hasattr(original, "LayerNorm"):  # BERT: SeqBn (pfeiffer) or DoubleSeqBn (houlsby)
            setattr(parent, child, RefPostNormOutput(original, adapter, seq_bn=placement == "pfeiffer"))
        else:
            setattr(parent, child, RefSublayer(original, adapter))
        ref_site = site + ".adapter"
        prefix = f"base_model.model.{name}."
        pairs = {"down_weight": "down.weight", "down_bias": "down.bias", "up_weight": "up.weight",
                 "up_bias": "up.bias", "ln_weight": "ln.weight", "ln_bias": "ln.bias"}  # fmt: skip
        for ours, theirs in pairs.items():
            if getattr(m, ours) is not None:
                names[prefix + ours] = f"{ref_site}.{theirs}"
    for n, p in fast.base_model.model.named_parameters():  # modules_to_save (the classifier) train in both
        if p.requires_grad and "bottleneck_adapter" not in n:
            ref.get_parameter(n).requires_grad_(True)
            names["base_model.model." + n] = n
    return ref, names


def check_against_reference(fast, ref, names, arch, scale=10, index=None):
    inputs = batch(arch)
    extra = {} if index is None else {"adapter_index": index}
    logits_f, loss_f, grads_f = loss_and_grads(fast, {**inputs, **extra})
    logits_r, loss_r, grads_r = loss_and_grads(ref, inputs)
    assert_close(logits_f, logits_r, scale=scale)
    assert_close(loss_f, loss_r, scale=scale)
    assert set(grads_f) == set(names) and grads_f
    for name, ref_name in names.items():
        assert_close(grads_f[name].reshape(grads_r[ref_name].shape), grads_r[ref_name], scale=scale, msg=name)


def fingerprint(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})  # fmt: skip


def assert_unchanged(model, print_):
    modules, params = print_
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert set(dict(model.named_parameters())) == set(params)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n][0]) and p.requires_grad == params[n][1], n


# ---- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_plain_reference(arch, placement):
    base = tiny_model(arch)
    fast = fastpeft.get_peft_model(copy.deepcopy(base), config_for(arch, placement=placement))
    randomize_adapters(fast)
    sites = {n.rpartition(".")[0] for n, m in fast.named_modules() if isinstance(m, BottleneckAdapter)}
    per_layer = 2 if placement == "houlsby" else 1
    assert len(sites) == 2 * per_layer
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert all("bottleneck_adapter" in n or ".classifier." in n for n in trainable)
    assert any(".classifier." in n for n in trainable) == (arch == "bert")
    ref, names = reference(base, fast, placement)
    check_against_reference(fast, ref, names, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_norm_gelu_and_scaling_match_reference(arch):
    base = tiny_model(arch)
    config = config_for(arch, placement="houlsby", non_linearity="gelu", adapter_layer_norm=True, scaling=0.5)
    fast = fastpeft.get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(fast)
    ref, names = reference(base, fast, "houlsby")
    assert any("ln_weight" in n for n in names)
    check_against_reference(fast, ref, names, arch)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_initialisation_is_near_identity(arch, placement):
    base = tiny_model(arch).eval()
    inputs = batch(arch)
    expected = base(**inputs).logits
    exact = fastpeft.get_peft_model(copy.deepcopy(base), config_for(arch, placement=placement, init_weights="zero_up"))
    assert torch.equal(exact.eval()(**inputs).logits, expected)
    # the adapters library's default ("bert": N(0, 0.02) weights, zero biases) starts close to the base
    near = fastpeft.get_peft_model(copy.deepcopy(base), config_for(arch, placement=placement))
    logits = near.eval()(**inputs).logits
    assert not torch.equal(logits, expected)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_adapter_index_equals_each_example_alone(arch):
    config = config_for(arch, placement="houlsby", num_adapters=3, adapter_layer_norm=True)
    fast = fastpeft.get_peft_model(tiny_model(arch), config).eval()
    randomize_adapters(fast)
    inputs = {k: v for k, v in batch(arch).items() if k != "labels"}
    index = torch.tensor([2, 0, 2])
    mixed = fast(**inputs, adapter_index=index).logits
    for b in range(3):
        alone = fast(**{k: v[b : b + 1] for k, v in inputs.items()}, adapter_index=index[b : b + 1]).logits
        assert_close(mixed[b : b + 1], alone, scale=10)
    other = fast(**inputs, adapter_index=torch.tensor([1, 1, 1])).logits
    assert not torch.allclose(other[0], mixed[0], atol=1e-3)  # the index picks different adapters
    # bank entry i equals a single-adapter reference holding entry i
    ref, _ = reference(tiny_model(arch), fast, "houlsby", index=1)
    assert_close(other, ref.eval()(**inputs).logits, scale=10)


def test_adapter_index_errors():
    fast = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama", num_adapters=2))
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    with pytest.raises(ValueError, match="num_adapters=2: pass adapter_index"):
        fast(**inputs)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        fast(**inputs, adapter_index=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        fast(**inputs, adapter_index=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        fast(**{k: v[:2] for k, v in inputs.items()}, adapter_index=torch.tensor([0, 1, 1]))
    single = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama"))
    with pytest.raises(ValueError, match="needs a config with num_adapters > 1"):
        single(**inputs, adapter_index=torch.tensor([0, 0, 0]))


def test_generate_with_adapter_index_context():
    fast = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama", num_adapters=2)).eval()
    randomize_adapters(fast)
    prompt = batch("llama")["input_ids"][:2, :5]
    with adapter_index(fast, torch.tensor([0, 1])):
        both = fast.generate(prompt, max_new_tokens=4, do_sample=False)
    for b in range(2):
        with adapter_index(fast, torch.tensor([b])):
            alone = fast.generate(prompt[b : b + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(both[b : b + 1], alone)


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_model_matches_reference(arch, tmp_path):
    base = tiny_model_4bit(arch, tmp_path)
    fast = fastpeft.get_peft_model(copy.deepcopy(base), config_for(arch, placement="houlsby"))
    assert all(m.down_weight.dtype == torch.float32 for m in fast.modules() if isinstance(m, BottleneckAdapter))
    randomize_adapters(fast)
    ref, names = reference(base, fast, "houlsby")
    check_against_reference(fast, ref, names, arch)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, reentrant):
    fast = fastpeft.get_peft_model(tiny_model(arch), config_for(arch, placement="houlsby", num_adapters=2))
    randomize_adapters(fast)
    fast.train()
    inputs = {**batch(arch), "adapter_index": torch.tensor([1, 0, 1])}
    _, loss, grads = loss_and_grads(fast, inputs)
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert fast.base_model.model.is_gradient_checkpointing
    _, loss_ckpt, grads_ckpt = loss_and_grads(fast, inputs)
    assert_close(loss_ckpt, loss)
    assert set(grads_ckpt) == set(grads)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], scale=10, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(arch, tmp_path):
    config = config_for(arch, placement="houlsby", adapter_layer_norm=True, num_adapters=2, non_linearity="swish")
    fast = fastpeft.get_peft_model(tiny_model(arch), config).eval()
    randomize_adapters(fast)
    fast.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FASTPEFT_BOTTLENECK" and saved["non_linearity"] == "swish"
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    trained = {"base_model.model." + n for n, p in fast.base_model.model.named_parameters() if p.requires_grad}
    assert set(tensors) == trained
    site = "model.layers.0.self_attn" if arch == "llama" else "bert.encoder.layer.0.attention.output"
    assert tensors[f"base_model.model.{site}.bottleneck_adapter.down_weight"].shape == (2, 8, 64)
    loaded = fastpeft.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    assert loaded.peft_config == fast.peft_config
    inputs = {**batch(arch), "adapter_index": torch.tensor([1, 0, 1])}
    assert torch.equal(loaded(**inputs).logits, fast(**inputs).logits)


def test_mismatched_or_corrupted_checkpoints_raise_and_leave_the_model_unchanged(tmp_path):
    fast = fastpeft.get_peft_model(tiny_model("llama"), config_for("llama"))
    fast.save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    config_text = (tmp_path / "good" / "adapter_config.json").read_text()

    def variant(name, weights_bytes=weights, config=config_text):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(weights_bytes)
        (folder / "adapter_config.json").write_text(config)
        return str(folder)

    cases = {
        variant("truncated", weights[: len(weights) // 2]): "not a readable safetensors file",
        variant("other_size", config=config_text.replace('"bottleneck_size": 8', '"bottleneck_size": 4')):
            "shape mismatches",
        variant("houlsby", config=config_text.replace('"pfeiffer"', '"houlsby"')): "missing keys",
        variant("bad_placement", config=config_text.replace('"pfeiffer"', '"diagonal"')): "placement must be one of",
        variant("unknown_field", config=config_text.replace('"scaling"', '"scale"')): "not describe a valid",
    }
    target = tiny_model("llama")
    print_ = fingerprint(target)
    for folder, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            fastpeft.from_pretrained(target, folder)
        assert_unchanged(target, print_)


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_restores_the_base_model_and_merge_raises(arch):
    base = tiny_model(arch).eval()
    inputs = batch(arch)
    expected = base(**inputs).logits
    print_ = fingerprint(base)
    model = copy.deepcopy(base)
    fast = fastpeft.get_peft_model(model, config_for(arch, placement="houlsby")).eval()
    randomize_adapters(fast)
    assert not torch.allclose(fast(**inputs).logits, expected, atol=1e-3)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        fast.merge_and_unload()
    plain = fast.unload()
    assert plain is model
    assert [(n, type(m)) for n, m in plain.named_modules()] == print_[0]
    assert set(dict(plain.named_parameters())) == set(print_[1])
    assert torch.equal(plain(**inputs).logits, expected)
    fastpeft.get_peft_model(plain, config_for(arch))  # can be adapted again


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        BottleneckAdapterConfig(non_linearity="tanh")
    with pytest.raises(ValueError, match="placement must be one of"):
        BottleneckAdapterConfig(placement="parallel")
    with pytest.raises(ValueError, match="bottleneck_size must be an int >= 1"):
        BottleneckAdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="reduction_factor must be a number > 0"):
        BottleneckAdapterConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="num_adapters must be an int >= 1"):
        BottleneckAdapterConfig(num_adapters=0)
    with pytest.raises(ValueError, match="init_weights must be one of"):
        BottleneckAdapterConfig(init_weights="xavier")
    assert BottleneckAdapterConfig(**BottleneckAdapterConfig(placement="houlsby").to_dict()).placement == "houlsby"


def test_bad_setups_raise_before_touching_the_model():
    model = tiny_model("llama")
    print_ = fingerprint(model)
    with pytest.raises(ValueError, match="leaves no bottleneck for hidden size 64"):
        fastpeft.get_peft_model(model, BottleneckAdapterConfig(reduction_factor=128))
    config = BottleneckAdapterConfig(bottleneck_size=4)
    config.non_linearity = "tanh"  # changed after construction
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        fastpeft.get_peft_model(model, config)
    assert_unchanged(model, print_)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has neither"):
        fastpeft.get_peft_model(gpt2, BottleneckAdapterConfig())
    adapted = fastpeft.get_peft_model(tiny_model("llama"), BottleneckAdapterConfig())
    with pytest.raises(ValueError, match="already hold a bottleneck adapter"):
        fastpeft.get_peft_model(adapted.base_model.model, BottleneckAdapterConfig())
