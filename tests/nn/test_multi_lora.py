"""MultiLoRALinear: peft's mixed-adapter batches, adding/removing adapters, training, memory, errors."""

import copy

import pytest
import torch
from torch import nn

from fastpeft.nn import MultiLoRALinear
from fastpeft.ops import dequantize_4bit_reference, plan_multi_lora
from fastpeft.quant import Quant4bitWeight
from tests.utils import OneLayer, assert_close, assert_error_within, saved_tensor_bytes

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

# name -> (r, lora_alpha, use_rslora): mixed ranks, rsLoRA included
ADAPTERS = {"chat": (8, 16, False), "sql": (1, 4, True), "code": (64, 32, False)}


def linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32):
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=True)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.clone())
    return layer.to("cpu")


def dequantized_linear(layer4bit):
    """A dense nn.Linear holding a 4-bit layer's exact dequantized weight (and its bias)."""
    w = dequantize_4bit_reference(Quant4bitWeight.from_bnb(layer4bit.weight), torch.float32)
    dense = nn.Linear(w.shape[1], w.shape[0], bias=layer4bit.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if layer4bit.bias is not None:
            dense.bias.copy_(layer4bit.bias)
    return dense


def peft_multi(base, adapters=ADAPTERS):
    """A peft model with several LoRA adapters on one layer, B made nonzero."""
    wrapper = OneLayer(copy.deepcopy(base))
    wrapper.is_loaded_in_4bit = isinstance(base, bnb.nn.Linear4bit)
    model = None
    for name, (r, alpha, rslora) in adapters.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"])
        if model is None:
            model = peft.get_peft_model(wrapper, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name in adapters:
            layer.lora_B[name].weight.normal_(0, 0.1)
    return model, layer


def ours_from_peft(base, peft_layer, adapters=ADAPTERS):
    ours = MultiLoRALinear(copy.deepcopy(base))
    for name, (r, alpha, rslora) in adapters.items():
        ours.add_adapter(name, r, alpha, use_rslora=rslora)
    ours.load_state_dict({k: v for k, v in peft_layer.state_dict().items() if k.startswith("lora_")}, strict=False)
    return ours


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_mixed_batch_inference_matches_peft_adapter_names(kind):
    in_f, out_f = (123, 77) if kind == "dense" else (128, 96)  # bnb's CPU kernel needs whole blocks
    base = nn.Linear(in_f, out_f) if kind == "dense" else linear4bit(in_f, out_f)
    # peft's adapter_names batches run in eval mode only, where bitsandbytes' CPU 4-bit matmul takes
    # an inexact fast path on some CPUs (errors ~1e-2): give peft the exactly dequantized base
    # (what bitsandbytes' training path multiplies by) so the comparison is of the adapters.
    model, peft_layer = peft_multi(base if kind == "dense" else dequantized_linear(base))
    ours = ours_from_peft(base, peft_layer)
    for name in ADAPTERS:
        assert ours.scaling[name] == peft_layer.scaling[name]
    model.eval()
    ours.eval()
    names = ["code", "__base__", "chat", "sql", "chat", "code", "sql"]
    x = torch.randn(len(names), 5, in_f)
    with torch.no_grad():
        y_peft = model(x, adapter_names=names)
        y = ours(x, names)
    assert_close(y, y_peft, scale=10)
    # peft's state dict keys are ours: lora_A.<name>.weight, lora_B.<name>.weight
    assert {k for k in peft_layer.state_dict() if k.startswith("lora_")} == set(ours.state_dict()) - {
        k for k in ours.state_dict() if k.startswith("base_layer.")
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mixed_batch_within_error_of_peft(dtype):
    base = nn.Linear(256, 192).to(dtype)
    model, peft_layer = peft_multi(base)
    ours = ours_from_peft(base, peft_layer)
    model.eval()
    names = ["chat", "sql", "code", "__base__"]
    x = torch.randn(4, 9, 256, dtype=dtype)
    with torch.no_grad():
        y_peft = model(x, adapter_names=names)
        y = ours(x, names)
        ref32 = nn.functional.linear(x.float(), base.weight.float(), base.bias.float())
        for i, name in enumerate(names[:3]):
            A, B = ours.lora_A[name].weight, ours.lora_B[name].weight
            ref32[i] += ours.scaling[name] * (x[i].float() @ A.t() @ B.t())
    assert y.dtype == dtype
    assert_error_within(y, y_peft, ref32)


def test_adapters_added_and_removed_without_touching_the_rest():
    layer = MultiLoRALinear(nn.Linear(48, 40))
    base_weight = layer.base_layer.weight
    for name, (r, alpha, rslora) in ADAPTERS.items():
        layer.add_adapter(name, r, alpha, use_rslora=rslora)
        nn.init.normal_(layer.lora_B[name].weight)
    x = torch.randn(3, 48)
    y = layer(x, ["chat", "sql", "code"])
    assert layer.add_adapter("math", 16, 16) == 3  # index of the new adapter
    nn.init.normal_(layer.lora_B["math"].weight)
    assert torch.equal(layer(x, ["chat", "sql", "code"]), y)  # existing adapters unchanged
    y_math = layer(x, ["math"] * 3)
    layer.remove_adapter("chat")
    assert layer.adapter_names == ["sql", "code", "math"]
    # (another batch size may round the base GEMM differently, hence assert_close)
    assert_close(layer(x[1:], ["sql", "code"]), y[1:])
    assert_close(layer(x[1:], torch.tensor([0, 1])), y[1:])  # indices follow adapter_names
    assert torch.equal(layer(x, ["math"] * 3), y_math)
    assert layer.base_layer.weight is base_weight and not base_weight.requires_grad
    assert set(dict(layer.named_parameters())) == {
        "base_layer.weight", "base_layer.bias", "lora_A.sql.weight", "lora_B.sql.weight", "lora_A.code.weight",
        "lora_B.code.weight", "lora_A.math.weight", "lora_B.math.weight",
    }  # fmt: skip
    layer.add_adapter("chat", 2, 2)  # a name can come back, as a new adapter at the end
    assert layer.adapter_names == ["sql", "code", "math", "chat"]


def test_empty_bank_is_the_base_layer():
    layer = MultiLoRALinear(nn.Linear(24, 16))
    x = torch.randn(3, 4, 24, requires_grad=True)
    y = layer(x, ["__base__"] * 3)
    assert torch.equal(y, layer.base_layer(x))
    y.sum().backward()
    assert_close(x.grad, layer.base_layer.weight.sum(0).expand(3, 4, 24))
    with pytest.raises(RuntimeError, match="adapter_index holds 0 but 0 adapters are loaded"):
        layer(x, torch.zeros(3, dtype=torch.int64))


def test_training_mixed_batch_equals_each_example_alone():
    layer = MultiLoRALinear(nn.Linear(64, 32))
    for name, (r, alpha, rslora) in ADAPTERS.items():
        layer.add_adapter(name, r, alpha, use_rslora=rslora)
        nn.init.normal_(layer.lora_B[name].weight, std=0.1)
    params = [p for p in layer.parameters() if p.requires_grad]
    names = ["chat", "code", "code", "__base__", "sql", "chat"]
    x = torch.randn(len(names), 7, 64, requires_grad=True)
    g = torch.randn(len(names), 7, 32)
    y = layer(x, names)
    grads = torch.autograd.grad(y, [x, *params], g)
    alone = [torch.autograd.grad(layer(x[i : i + 1], [n]), [x, *params], g[i : i + 1], materialize_grads=True,
                                 allow_unused=True) for i, n in enumerate(names)]  # fmt: skip
    y_alone = torch.cat([layer(x[i : i + 1], [n]) for i, n in enumerate(names)])
    assert_close(y, y_alone, scale=10)
    for k, got in enumerate(grads):
        assert_close(got, sum(a[k] for a in alone), scale=10)


def test_sgd_step_trains_each_adapter_on_its_own_examples():
    layer = MultiLoRALinear(nn.Linear(16, 8))
    layer.add_adapter("a", 4, 4)
    layer.add_adapter("b", 2, 2)
    before = {k: v.detach().clone() for k, v in layer.named_parameters()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(4, 16), ["a", "a", "__base__", "a"]).square().sum().backward()
    opt.step()
    after = dict(layer.named_parameters())
    assert not torch.equal(after["lora_B.a.weight"], before["lora_B.a.weight"])  # B starts at 0: grad of B moves first
    assert torch.equal(after["lora_A.b.weight"], before["lora_A.b.weight"])  # b saw no example
    assert torch.equal(after["lora_B.b.weight"], before["lora_B.b.weight"])


def test_per_token_index_and_shared_plan():
    layer = MultiLoRALinear(nn.Linear(32, 24))
    for name, (r, alpha, rslora) in ADAPTERS.items():
        layer.add_adapter(name, r, alpha, use_rslora=rslora)
        nn.init.normal_(layer.lora_B[name].weight)
    x = torch.randn(2, 6, 32)
    per_token = torch.randint(-1, 3, (2, 6))
    y = layer(x, per_token)
    plan = plan_multi_lora(per_token, rows=12, num_adapters=3)
    assert torch.equal(layer(x, plan), y)
    for t in range(6):  # token t of example 0 alone with its adapter
        idx = per_token[0, t : t + 1]
        assert_close(layer(x[0, t : t + 1], idx), y[0, t : t + 1], scale=10)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_saved_for_backward_is_x_shrink_and_plan(kind):
    base = nn.Linear(128, 64) if kind == "dense" else linear4bit(128, 64)
    layer = MultiLoRALinear(base)
    for name, (r, alpha, rslora) in ADAPTERS.items():
        layer.add_adapter(name, r, alpha, use_rslora=rslora)
    x = torch.randn(4, 50, 128, requires_grad=True)
    frozen = [*layer.parameters(), *layer.buffers()]
    if kind == "nf4":
        st = layer.base_layer.weight.quant_state
        frozen += [st.absmax, st.state2.absmax, st.state2.code, st.offset]
    plan = plan_multi_lora(torch.tensor([0, 2, -1, 1]), rows=200, num_adapters=3)
    saved, shapes, y = saved_tensor_bytes(lambda: layer(x, plan), exclude=frozen + [plan.sorted_rows, plan.offsets])
    assert saved == x.numel() * 4 + 200 * 64 * 4, shapes  # x and the [M, max rank] shrink, nothing else
    y.sum().backward()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer = MultiLoRALinear(nn.Linear(32, 48))
    layer.add_adapter("a", 4, 8)
    layer.add_adapter("b", 2, 2)
    for name in ("a", "b"):
        nn.init.normal_(layer.lora_B[name].weight)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(5, 32, requires_grad=True)
    index = torch.tensor([1, 0, -1, 1, 0])
    params = [x, layer.lora_A["a"].weight, layer.lora_B["b"].weight]
    y_c = compiled(x, index)
    grads_c = torch.autograd.grad(y_c.sum(), params)
    y = layer(x, index)
    grads = torch.autograd.grad(y.sum(), params)
    assert_close(y_c, y)
    for got, ref in zip(grads_c, grads):
        assert_close(got, ref)


def test_dropout_in_training_only():
    layer = MultiLoRALinear(nn.Linear(64, 64))
    layer.add_adapter("a", 8, 8, lora_dropout=0.5)
    layer.add_adapter("b", 8, 8)
    for name in ("a", "b"):
        nn.init.normal_(layer.lora_B[name].weight)
    x = torch.randn(4, 64)
    layer.eval()
    assert torch.equal(layer(x, ["a"] * 4), layer(x, ["a"] * 4))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x, ["a"] * 4)
    torch.manual_seed(1)
    assert torch.equal(layer(x, ["a"] * 4), y1)
    assert not torch.equal(layer(x, ["a"] * 4), y1)
    assert torch.equal(layer(x, ["b"] * 4), layer(x, ["b"] * 4))  # b has no dropout


def test_bad_arguments():
    layer = MultiLoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", 2, 2)
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        layer.add_adapter("a", 2, 2)
    with pytest.raises(ValueError, match="r must be an int >= 1, got 0"):
        layer.add_adapter("z", 0, 2)
    with pytest.raises(ValueError, match="adapter name must be a non-empty str without '.'"):
        layer.add_adapter("x.y", 2, 2)
    with pytest.raises(ValueError, match="adapter name must be"):
        layer.add_adapter("__base__", 2, 2)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        layer.add_adapter("z", 2, 2, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"no adapter named 'q'; adapters: \['a'\]"):
        layer(torch.randn(2, 8), ["a", "q"])
    with pytest.raises(ValueError, match="no adapter named 'q'"):
        layer.remove_adapter("q")
    with pytest.raises(RuntimeError, match="adapter_index holds 1 but 1 adapters are loaded"):
        layer(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"MultiLoRALinear: x must be \[\.\.\., 8\], got \[3, 9\]"):
        layer(torch.randn(3, 9), [0, 0, 0])
    with pytest.raises(TypeError, match="wraps torch.nn.Linear, bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt, got Conv1d"):
        MultiLoRALinear(nn.Conv1d(8, 8, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_cuda_layer_matches_cpu(kind):
    base = nn.Linear(128, 96) if kind == "dense" else linear4bit(128, 96)
    layer = MultiLoRALinear(base)
    for name, (r, alpha, rslora) in ADAPTERS.items():
        layer.add_adapter(name, r, alpha, use_rslora=rslora)
        nn.init.normal_(layer.lora_B[name].weight, std=0.1)
    names = ["chat", "sql", "__base__", "code", "code", "chat"]
    x = torch.randn(len(names), 3, 128, requires_grad=True)
    y_cpu = layer(x, names)
    g_cpu = torch.autograd.grad(y_cpu.sum(), [x, *[p for p in layer.parameters() if p.requires_grad]])
    layer_cuda = layer.to("cuda")
    x_cuda = x.detach().cuda().requires_grad_(True)
    y_cuda = layer_cuda(x_cuda, names)
    g_cuda = torch.autograd.grad(y_cuda.sum(), [x_cuda, *[p for p in layer_cuda.parameters() if p.requires_grad]])
    assert_close(y_cuda.cpu(), y_cpu, scale=100)
    for a, b in zip(g_cuda, g_cpu):
        assert_close(a.cpu(), b, scale=100)
