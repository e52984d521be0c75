"""LoRALinear: parity with HF peft (dense and bitsandbytes 4-bit), memory, merge, compile, errors."""

import copy
import math

import pytest
import torch
from torch import nn

from fastpeft.nn import LoRALinear, LoRAProjectionGroup
from tests.utils import OneLayer, assert_close, assert_error_within, devices, saved_tensor_bytes

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def peft_lora(base, r, alpha, dropout=0.0, use_rslora=False):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, target_modules=["proj"])
    wrapper = OneLayer(copy.deepcopy(base))
    # peft picks its bitsandbytes LoRA layer when the model says so, as HF models loaded in 4-bit do.
    wrapper.is_loaded_in_4bit = isinstance(base, bnb.nn.Linear4bit)
    model = peft.get_peft_model(wrapper, config)
    return model, model.base_model.model.proj


def linear4bit(in_f, out_f, quant_type="nf4", nested=True, bias=True, compute_dtype=torch.float32):
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=nested)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, blocksize=64)  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.clone())
    return layer.to("cpu")


def matched_pair(base, r=8, alpha=16, use_rslora=False, dropout=0.0):
    """A peft LoRA layer and a fastpeft LoRALinear over copies of ``base`` with the same, nonzero weights."""
    model, peft_layer = peft_lora(base, r, alpha, dropout=dropout, use_rslora=use_rslora)
    ours = LoRALinear(copy.deepcopy(base), r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.1)  # peft initialises B to zero
        ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    return model, peft_layer, ours


def forward_backward(module, x, grad, params):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, [x, *params], grad)
    return y, grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("in_f,out_f,r", [(123, 431, 8), (64, 64, 1), (96, 32, 64)])
def test_dense_parity_with_peft(bias, use_rslora, in_f, out_f, r):
    base = nn.Linear(in_f, out_f, bias=bias)
    _, peft_layer, ours = matched_pair(base, r=r, alpha=2 * r, use_rslora=use_rslora)
    assert ours.scaling == peft_layer.scaling["default"]
    x, g = torch.randn(3, 7, in_f), torch.randn(3, 7, out_f)
    y_peft, (gx_p, ga_p, gb_p) = forward_backward(
        peft_layer, x, g, [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    )
    y, (gx, ga, gb) = forward_backward(ours, x, g, [ours.lora_A.weight, ours.lora_B.weight])
    assert_close(y, y_peft, scale=10)
    for got, ref in [(gx, gx_p), (ga, ga_p), (gb, gb_p)]:
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_4bit_parity_with_peft(quant_type, nested):
    # in_features a multiple of the blocksize: bitsandbytes' CPU kernel is only right there
    # (see tests/ops/test_quant4bit.py::bnb_dequantize).
    base = linear4bit(128, 96, quant_type, nested)
    _, peft_layer, ours = matched_pair(base, r=8, alpha=16)
    assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"
    assert ours.is_4bit
    x, g = torch.randn(2, 5, 128), torch.randn(2, 5, 96)
    y_peft, grads_peft = forward_backward(
        peft_layer, x, g, [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    )
    y, grads = forward_backward(ours, x, g, [ours.lora_A.weight, ours.lora_B.weight])
    assert_close(y, y_peft, scale=10)
    for got, ref in zip(grads, grads_peft):
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dense_parity_with_peft(dtype):
    # peft keeps adapters in float32 and adds an fp32 LoRA branch to the low-precision base output;
    # fastpeft casts the adapter to the compute dtype. Both must be within 2x of the low-precision
    # error against float32 math on the same weights.
    base = nn.Linear(256, 192).to(dtype)
    _, peft_layer, ours = matched_pair(base, r=16, alpha=32)
    x = torch.randn(4, 33, 256, dtype=dtype)
    y_peft = peft_layer(x)
    y = ours(x)
    assert y.dtype == dtype and y_peft.dtype == dtype
    ref32 = nn.functional.linear(x.float(), base.weight.float(), base.bias.float()) + ours.scaling * (
        x.float() @ ours.lora_A.weight.t() @ ours.lora_B.weight.t()
    )
    assert_error_within(y, y_peft, ref32)


def test_state_dict_maps_to_peft_one_to_one():
    base = nn.Linear(64, 48)
    model, peft_layer, ours = matched_pair(base, r=4, alpha=8)
    adapter_sd = peft.get_peft_model_state_dict(model)  # the keys peft saves in adapter_model.safetensors
    assert set(adapter_sd) == {"base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"}
    ours_sd = ours.state_dict()
    for key, value in adapter_sd.items():
        assert torch.equal(ours_sd[key.removeprefix("base_model.model.proj.")], value)
    fresh = LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8)
    fresh.load_state_dict({k.removeprefix("base_model.model.proj."): v for k, v in adapter_sd.items()}, strict=False)
    x = torch.randn(5, 64)
    assert_close(fresh(x), peft_layer(x))


def test_initialisation_matches_peft():
    layer = LoRALinear(nn.Linear(100, 30), r=6, lora_alpha=12)
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) on fan_in=100
    assert layer.lora_A.weight.shape == (6, 100) and layer.lora_B.weight.shape == (30, 6)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.dtype == torch.float32  # peft's autocast_adapter_dtype default
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert layer.scaling == 2.0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_saved_for_backward_is_x_plus_shrink(kind, dropout):
    M, in_f, out_f, r = 256, 128, 192, 8
    base = nn.Linear(in_f, out_f) if kind == "dense" else linear4bit(in_f, out_f)
    _, peft_layer, ours = matched_pair(base, r=r, alpha=16, dropout=dropout)
    assert peft_layer.training and ours.training
    x = torch.randn(M, in_f, requires_grad=True)
    frozen = [*ours.parameters(), *ours.buffers()]
    if kind == "nf4":
        st = ours.base_layer.weight.quant_state
        frozen += [st.absmax, st.state2.absmax, st.state2.code, st.offset]
    ours_bytes, shapes, y = saved_tensor_bytes(lambda: ours(x), exclude=frozen)
    seed_bytes = 8 if dropout else 0
    assert ours_bytes == x.numel() * 4 + M * r * 4 + seed_bytes, shapes
    assert (out_f, in_f) not in shapes  # no (dequantized) weight among the saved activations
    y.sum().backward()  # and backward still works from what was saved
    peft_frozen = [*peft_layer.parameters(), *peft_layer.buffers()] + (frozen[-4:] if kind == "nf4" else [])
    peft_bytes, _, _ = saved_tensor_bytes(lambda: peft_layer(x), exclude=peft_frozen)
    # Without dropout peft also saves just x and the rank-r activation (its extra cost is transient
    # M x out temporaries, measured as peak memory in benchmarks/bench_lora.py); with dropout it also
    # keeps an M x in dropout tensor, which fastpeft regenerates from its 8-byte seed.
    if dropout:
        assert peft_bytes >= ours_bytes - seed_bytes + x.numel() * 4
    else:
        assert peft_bytes == ours_bytes


def test_merge_and_unmerge():
    layer = LoRALinear(nn.Linear(64, 48), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 64)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y, scale=10)
    assert not torch.equal(layer.base_layer.weight, w0)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base_layer.weight, w0, scale=10)
    assert_close(layer(x), y, scale=10)
    with pytest.raises(NotImplementedError, match="merge\\(\\) needs a dense base layer"):
        LoRALinear(linear4bit(64, 32), r=2, lora_alpha=2).merge()


def test_projection_group_equals_separate_layers():
    layers = [LoRALinear(nn.Linear(64, o), r=r, lora_alpha=2 * r) for o, r in [(64, 4), (32, 8), (32, 8)]]
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight)
    group = LoRAProjectionGroup(layers)
    x = torch.randn(2, 6, 64, requires_grad=True)
    outs = group(x)
    sep = [layer(x) for layer in layers]
    params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    gs = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, [x, *params], gs)
    grads_sep = torch.autograd.grad(sep, [x, *params], gs)
    for a, b in zip((*outs, *grads), (*sep, *grads_sep)):
        assert_close(a, b, scale=10)
    assert sum(p.numel() for p in group.parameters()) == sum(p.numel() for layer in layers for p in layer.parameters())


def test_4bit_output_in_input_dtype_and_compute_dtype_respected():
    base = linear4bit(128, 64, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, lora_alpha=4)
    y = layer(torch.randn(3, 128))
    assert y.dtype == torch.float32  # bitsandbytes returns the input dtype; compute ran in bf16
    ref = base(torch.randn(3, 128))
    assert ref.dtype == torch.float32


def test_training_mode_controls_dropout():
    layer = LoRALinear(nn.Linear(64, 64), r=8, lora_alpha=8, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(10, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), y1)  # torch.manual_seed makes the dropout mask repeatable
    assert not torch.equal(layer(x), y1)


def test_autocast_uses_the_autocast_dtype():
    layer = LoRALinear(nn.Linear(64, 32), r=4, lora_alpha=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 64))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_compile_fullgraph(dropout):
    torch._dynamo.reset()
    layer = LoRALinear(nn.Linear(32, 48), r=4, lora_alpha=8, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B.weight)
    layer.eval() if dropout == 0 else layer.train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 32, requires_grad=True)
    torch.manual_seed(3)
    y_c = compiled(x)
    y_c.sum().backward()
    gx_c, ga_c = x.grad.clone(), layer.lora_A.weight.grad.clone()
    x.grad = None
    layer.lora_A.weight.grad = None
    torch.manual_seed(3)
    y = layer(x)
    y.sum().backward()
    assert_close(y_c, y)
    assert_close(gx_c, x.grad)
    assert_close(ga_c, layer.lora_A.weight.grad)


def test_torch_compile_inductor_fullgraph():
    # Inductor draws the dropout seed with its own RNG (not eager's), so compare without dropout.
    torch._dynamo.reset()
    layer = LoRALinear(nn.Linear(32, 48), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 32, requires_grad=True)
    y_c = compiled(x)
    (gx_c,) = torch.autograd.grad(y_c.sum(), x)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert_close(y_c, y)
    assert_close(gx_c, gx)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r must be an int >= 1, got 0"):
        LoRALinear(nn.Linear(8, 8), r=0, lora_alpha=1)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got -0.1"):
        LoRALinear(nn.Linear(8, 8), r=2, lora_alpha=1, lora_dropout=-0.1)
    with pytest.raises(TypeError, match="wraps torch.nn.Linear, bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt, got Conv1d"):
        LoRALinear(nn.Conv1d(8, 8, 1), r=2, lora_alpha=1)
    with pytest.raises(ValueError, match="same in_features"):
        LoRAProjectionGroup([LoRALinear(nn.Linear(8, 8), 2, 2), LoRALinear(nn.Linear(16, 8), 2, 2)])
    with pytest.raises(ValueError, match="same lora_dropout"):
        LoRAProjectionGroup([LoRALinear(nn.Linear(8, 8), 2, 2, 0.1), LoRALinear(nn.Linear(8, 8), 2, 2)])
    layer = LoRALinear(nn.Linear(8, 8), 2, 2)
    with pytest.raises(ValueError, match=r"LoRALinear: x must be \[\.\.\., 8\], got \[3, 9\]"):
        layer(torch.randn(3, 9))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_cuda_layer_matches_cpu(kind):
    base = nn.Linear(128, 96) if kind == "dense" else linear4bit(128, 96)
    layer = LoRALinear(base, r=8, lora_alpha=16, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B.weight)
    layer.eval()
    x = torch.randn(4, 128)
    y_cpu = layer(x)
    layer_cuda = layer.to("cuda")
    assert_close(layer_cuda(x.cuda()).cpu(), y_cpu, scale=100)


@pytest.mark.cuda
@pytest.mark.parametrize("device", devices())
def test_cuda_parity_with_peft_4bit(device):
    base = linear4bit(256, 128).to(device)
    _, peft_layer, ours = matched_pair(base, r=16, alpha=16)
    x, g = torch.randn(8, 256, device=device), torch.randn(8, 128, device=device)
    y_p, grads_p = forward_backward(peft_layer, x, g, [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight])
    y, grads = forward_backward(ours, x, g, [ours.lora_A.weight, ours.lora_B.weight])
    assert_close(y, y_p, scale=100)
    for a, b in zip(grads, grads_p):
        assert_close(a, b, scale=100)
