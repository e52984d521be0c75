"""LoRA on bitsandbytes LLM.int8() bases (Linear8bitLt, int8 weight CB + per-row absmax SCB).

The exact reference is plain PyTorch on the dequantized weight W = CB * SCB[:, None] / 127 (rounded
once to the compute dtype): ``lora_linear_reference(x, Int8Weight, ...)``. bitsandbytes' own 8-bit
forward is NOT that on a GPU: MatMul8bitLt also quantizes each row of x to int8 (and keeps the
columns with outliers above ``threshold`` in 16-bit), so peft's output differs from ours by that
activation quantization. Its error per output element is at most half a quantization step of the
row of x times the row's weight mass: |dy[m, o]| <= max_k |x[m, k]| / 254 * sum_k |W[o, k]|
(``activation_quant_bound``), the tolerance of the base output against peft. On the CPU,
bitsandbytes 0.50 runs MatMul8bitLt (activation quantization, fp16 inputs) in eval mode, and in
training mode MatMul8bitFp, which dequantizes the weight like we do; the parity test runs both.
Gradients of lora_A / lora_B depend only on the incoming gradient, x, A and B
(dL/dB = s * g^T (x A^T), dL/dA = s * (g B)^T x), never on the base path, so with the same g they
must match peft to fp32 tolerance; dL/dx = g W + s * (g B) A uses the dequantized weight in
bitsandbytes' backward as well (it never quantizes g against CB), so it is also compared tightly.
"""

import copy

import pytest
import torch
from torch import nn

from fastpeft.nn import LoRALinear, LoRAProjectionGroup
from fastpeft.ops import dequantize_int8, lora_linear, lora_linear_grouped, lora_linear_reference
from fastpeft.quant import Int8Weight, frozen_weight_args
from tests.utils import OneLayer, assert_all_close, assert_close, assert_error_within, devices, leaf, saved_tensor_bytes

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def linear8bit(in_f, out_f, bias=True, threshold=6.0, seed=0):
    """A Linear8bitLt (int8 weights) quantized from a random nn.Linear, on the CPU."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def int8_weight(out_f, in_f, device="cpu"):
    data = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)
    scale = torch.rand(out_f) * 0.2 + 0.01
    return Int8Weight(data=data, scale=scale).to(device)


def activation_quant_bound(x, w):
    """Largest error int8 row-wise quantization of x can cause in x W^T (see the module docstring)."""
    return x.float().abs().amax(-1, keepdim=True) / 254 * w.float().abs().sum(1)


def run(fn, x, weight, bias, A, B, scaling, p, seed, grad_out):
    leaves = [x, A, B] + ([bias] if bias is not None else [])
    y = fn(x, weight, bias, A, B, scaling, p, seed)
    return y, torch.autograd.grad(y, leaves, grad_out)


# ---- the op against the plain-PyTorch reference ------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bit_exact_with_the_reference(device, dtype):
    for out_f, in_f in [(1, 1), (37, 123), (64, 256), (0, 16)]:
        w = int8_weight(out_f, in_f, device)
        got = dequantize_int8(w, dtype=dtype)
        assert got.dtype == dtype and got.shape == (out_f, in_f)
        assert torch.equal(got, w.dequantize_reference(dtype))
        buf = torch.empty(out_f, in_f, dtype=dtype, device=device)
        assert dequantize_int8(w, out=buf) is buf and torch.equal(buf, got)
        # An out view one element into its storage is not 16-byte aligned: the scalar path.
        offset = torch.empty(out_f * in_f + 1, dtype=dtype, device=device)[1:].view(out_f, in_f)
        assert dequantize_int8(w, out=offset) is offset and torch.equal(offset, got)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [((5,), 123, 431, 1), ((2, 7), 64, 96, 16), ((33,), 128, 64, 64), ((0,), 32, 48, 4)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_on_int8_matches_reference(device, dtype, shape, bias, dropout):
    lead, in_f, out_f, r = shape
    w = int8_weight(out_f, in_f, device)
    x = leaf(torch.randn(*lead, in_f, dtype=dtype, device=device))
    b = leaf(torch.randn(out_f, dtype=dtype, device=device)) if bias else None
    A = leaf(torch.randn(r, in_f, dtype=dtype, device=device) / in_f**0.5)
    B = leaf(torch.randn(out_f, r, dtype=dtype, device=device) / r**0.5)
    seed = torch.tensor([77])
    g = torch.randn(*lead, out_f, dtype=dtype, device=device)
    y, grads = run(lora_linear, x, w, b, A, B, 0.7, dropout, seed, g)
    y_ref, grads_ref = run(lora_linear_reference, x, w, b, A, B, 0.7, dropout, seed, g)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    if dtype == torch.float32:
        return assert_all_close((y, grads), (y_ref, grads_ref))
    # Low precision: error against fp32 math on the same rounded inputs (and the same bf16-rounded
    # dequantized weight) at most 2x the plain-PyTorch low-precision path's.
    up = lambda t: None if t is None else leaf(t.detach().float())  # noqa: E731
    dense32 = w.dequantize_reference(dtype).float()
    y32, grads32 = run(lora_linear_reference, up(x), dense32, up(b), up(A), up(B), 0.7, dropout, seed, g.float())
    assert_error_within(y, y_ref, y32)
    for got, ref, ref32 in zip(grads, grads_ref, grads32):
        assert_error_within(got, ref, ref32)


@pytest.mark.parametrize("device", devices())
def test_one_input_gradient_at_a_time_and_unreached_output(device):
    w1, w2 = int8_weight(48, 64, device), int8_weight(16, 64, device)
    x = torch.randn(9, 64, device=device)
    A = [torch.randn(4, 64, device=device) / 8, torch.randn(2, 64, device=device) / 8]
    B = [torch.randn(48, 4, device=device), torch.randn(16, 2, device=device)]
    for which in range(3):  # x, A[0], B[1] alone
        xs, As, Bs = x.clone(), [a.clone() for a in A], [b.clone() for b in B]
        target = [xs, As[0], Bs[1]][which].requires_grad_(True)
        outs = lora_linear_grouped(xs, [w1, w2], None, As, Bs, [0.5, 2.0])
        (g,) = torch.autograd.grad(outs[0].sum() + outs[1].pow(2).sum(), target)
        ref_t = leaf(target)
        parts = [x, A[0], B[1]]
        parts[which] = ref_t
        ref = [lora_linear_reference(parts[0], w, None, a, b, s)
               for w, a, b, s in zip([w1, w2], [parts[1], A[1]], [B[0], parts[2]], [0.5, 2.0])]  # fmt: skip
        (g_ref,) = torch.autograd.grad(ref[0].sum() + ref[1].pow(2).sum(), ref_t)
        assert_close(g, g_ref, scale=10)
    # The second output reaches no loss: its gradient counts as zero.
    xs, As = leaf(x), [leaf(a) for a in A]
    outs = lora_linear_grouped(xs, [w1, w2], None, As, B, [0.5, 2.0])
    gx, gA1 = torch.autograd.grad(outs[0].sum(), [xs, As[1]], allow_unused=True)
    ref_x = leaf(x)
    (gx_ref,) = torch.autograd.grad(lora_linear_reference(ref_x, w1, None, A[0], B[0], 0.5).sum(), ref_x)
    assert_close(gx, gx_ref, scale=10)
    assert gA1 is None or torch.count_nonzero(gA1) == 0


# ---- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck_lora_linear_on_int8(device, requires_grad, dropout):
    opts = dict(device=device, requires_grad=requires_grad)
    ws = [int8_weight(16, 32, device), int8_weight(8, 32, device)]
    x = torch.randn(2, 5, 32, **opts)
    As = [torch.randn(4, 32, **opts), torch.randn(2, 32, **opts)]
    Bs = [torch.randn(16, 4, **opts), torch.randn(8, 2, **opts)]
    bs = [torch.randn(16, **opts), None]
    seed = torch.tensor([3]) if dropout else None
    ops = torch.ops.fastpeft
    data, scales = [w.data for w in ws], [w.scale for w in ws]
    both, first = frozen_weight_args(ws), frozen_weight_args(ws[:1])
    torch.library.opcheck(ops.lora_linear, (x, *both, bs, As, Bs, [1.0, 0.5], dropout, seed))
    torch.library.opcheck(ops.lora_linear, (x, *first, [None], As[:1], Bs[:1], [1.5], dropout, seed))
    xd = x.detach()
    _, shrink = ops.lora_linear(xd, *both, bs, [a.detach() for a in As], [b.detach() for b in Bs],
                                [1.0, 0.5], dropout, seed)  # fmt: skip
    g = [torch.randn(2, 5, 16, device=device), torch.randn(2, 5, 8, device=device)]
    for mask in ([True, True, False, True], [False, True, False, False], [True, False, False, False]):
        torch.library.opcheck(ops.lora_linear_backward,
                              (g, xd, shrink, *both, [a.detach() for a in As], [b.detach() for b in Bs],
                               [1.0, 0.5], dropout, seed, mask))  # fmt: skip
    out = torch.empty(16, 32, device=device)
    torch.library.opcheck(ops.dequantize_int8_rowwise_, (data[0], scales[0], out))


def test_no_python_autograd_is_registered_for_the_lora_op():
    # Autograd lives in C++ (csrc/lora/lora_autograd.cpp), at the Autograd key of the op itself.
    op = torch.ops.fastpeft.lora_linear.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    w = int8_weight(16, 32)
    x, A, B = torch.randn(4, 32), torch.randn(4, 32), torch.randn(16, 4)
    ops = torch.ops.fastpeft
    cases = [
        (dict(data=w.data.to(torch.uint8)), r"weights\[0\] must be Char"),
        (dict(data=w.data.float()), r"weights\[0\] must be Char"),
        (dict(data=w.data[:, :31].contiguous()), r"weights\[0\] must be \[out_features, 32\]"),
        (dict(scale=w.scale[:15]), r"scales\[0\] must be \[16\]"),
        (dict(scale=w.scale.view(16, 1)), r"scales\[0\] must be \[16\]"),
        (dict(scale=w.scale.half()), r"scales\[0\] must be Float"),
        (dict(B=torch.randn(15, 4)), r"lora_B\[0\] must be \[16, 4\]"),
    ]
    base = dict(data=w.data, scale=w.scale, B=B)
    for change, pattern in cases:
        args = {**base, **change}
        with pytest.raises(RuntimeError, match=pattern):
            ops.lora_linear(x, "int8", [args["data"], args["scale"]], [], [None], [A], [args["B"]], [1.0], 0.0, None)
    with pytest.raises(RuntimeError, match="one scale"):
        ops.lora_linear(x, "int8", [w.data], [], [None], [A], [B], [1.0], 0.0, None)
    with pytest.raises(RuntimeError, match=r"weight_tensors\[1\] \(scales\[0\]\) is required, got None"):
        ops.lora_linear(x, "int8", [w.data, None], [], [None], [A], [B], [1.0], 0.0, None)
    with pytest.raises(RuntimeError, match="weight_format must be 'dense', 'nf4', 'fp4' or 'int8', got 'int4'"):
        ops.lora_linear(x, "int4", [w.data, w.scale], [], [None], [A], [B], [1.0], 0.0, None)
    with pytest.raises(RuntimeError, match="weight_ints holds 1 values"):
        ops.lora_linear(x, "int8", [w.data, w.scale], [16], [None], [A], [B], [1.0], 0.0, None)
    with pytest.raises(RuntimeError, match="out must have data's shape"):
        ops.dequantize_int8_rowwise_(w.data, w.scale, torch.empty(16, 31))
    # The Python weight refuses the same mistakes before any op runs.
    with pytest.raises(ValueError, match="data must be int8"):
        Int8Weight(data=w.data.float(), scale=w.scale)
    with pytest.raises(ValueError, match=r"scale must be \[16\]"):
        Int8Weight(data=w.data, scale=w.scale[:3])
    with pytest.raises(ValueError, match="scale must be float32"):
        Int8Weight(data=w.data, scale=w.scale.double())
    with pytest.raises(TypeError, match="all torch.Tensor"):
        lora_linear_grouped(x, [w, torch.randn(16, 32)], None, [A, A], [B, B], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \(16, 64\) but x has 32 features"):
        lora_linear(x, int8_weight(16, 64), None, A, B, 1.0)


def test_has_fp16_weights_layers_are_refused():
    layer = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=True).to("cpu")
    with pytest.raises(TypeError, match="has_fp16_weights=True"):
        LoRALinear(layer, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        Int8Weight.from_bnb(layer)


# ---- from_bnb and LoRALinear ------------------------------------------------------------------------


def test_from_bnb_before_and_after_the_first_forward():
    layer = linear8bit(40, 24)
    assert layer.weight.SCB is not None and layer.state.SCB is None  # before any forward
    before = Int8Weight.from_bnb(layer)
    assert before.data.data_ptr() == layer.weight.data.data_ptr()  # no copy
    layer(torch.randn(2, 40))
    assert layer.weight.SCB is None and layer.state.SCB is not None  # bitsandbytes moved it
    after = Int8Weight.from_bnb(layer)
    assert torch.equal(after.data, before.data) and torch.equal(after.scale, before.scale)
    # The dequantized weight is bitsandbytes' own (its reciprocal-multiply rounding aside).
    bnb_w = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.state.SCB)
    assert_close(after.dequantize_reference(), bnb_w)


def peft_lora_8bit(base, r, alpha, dropout=0.0):
    wrapper = OneLayer(copy.deepcopy(base))
    wrapper.is_loaded_in_8bit = True  # as HF models loaded in 8-bit say, so peft picks its bnb layer
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(wrapper, config)
    return model.base_model.model.proj


def matched_pair(base, r=8, alpha=16, dropout=0.0):
    peft_layer = peft_lora_8bit(base, r, alpha, dropout)
    assert type(peft_layer).__name__ == "Linear8bitLt" and type(peft_layer).__module__ == "peft.tuners.lora.bnb"
    ours = LoRALinear(copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=dropout)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.1)
        ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    return peft_layer, ours


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_f,out_f,r", [(123, 431, 8), (64, 64, 1), (96, 32, 32)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parity_with_peft(bias, in_f, out_f, r, threshold, mode):
    base = linear8bit(in_f, out_f, bias=bias, threshold=threshold)
    peft_layer, ours = matched_pair(base, r=r, alpha=2 * r)
    peft_layer.train(mode == "train")
    ours.train(mode == "train")
    assert ours.is_int8 and not ours.is_4bit and "int8" in repr(ours)
    x, g = torch.randn(3, 7, in_f), torch.randn(3, 7, out_f)
    x[0, 0, 0] = 9.0  # an outlier column above threshold 6
    xp, xo = leaf(x), leaf(x)
    y_peft = peft_layer(xp)
    y = ours(xo)
    assert y.dtype == x.dtype
    w = Int8Weight.from_bnb(ours.base_layer).dequantize_reference()
    assert ((y - y_peft).abs() <= activation_quant_bound(x, w) + 1e-4).all()
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    gx_p, ga_p, gb_p = torch.autograd.grad(y_peft, [xp, pa, pb], g)
    gx, ga, gb = torch.autograd.grad(y, [xo, ours.lora_A.weight, ours.lora_B.weight], g)
    assert_close(ga, ga_p, scale=10)  # independent of the base path: tight
    assert_close(gb, gb_p, scale=10)
    # bitsandbytes' backward multiplies g by the dequantized weight too (in fp16 in eval mode).
    assert_close(gx, gx_p, scale=10, dtype=torch.float32 if mode == "train" else torch.float16)
    # And exactly the plain-PyTorch reference on the dequantized weight.
    y_ref = lora_linear_reference(x, Int8Weight.from_bnb(ours.base_layer), ours.base_layer.bias, ours.lora_A.weight,
                                  ours.lora_B.weight, ours.scaling)  # fmt: skip
    assert_close(y, y_ref, scale=10)


def test_bf16_input_runs_in_bf16_and_matches_the_reference():
    base = linear8bit(128, 80)
    ours = LoRALinear(base, r=8, lora_alpha=16)
    nn.init.normal_(ours.lora_B.weight, std=0.1)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    w = Int8Weight.from_bnb(base)
    args = (base.bias, ours.lora_A.weight, ours.lora_B.weight)
    y_ref = lora_linear_reference(x, w, *(t.to(torch.bfloat16) for t in args), ours.scaling)
    y32 = lora_linear_reference(x.float(), w.dequantize_reference(torch.bfloat16).float(), *args, ours.scaling)
    assert_error_within(y, y_ref, y32)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_for_backward_is_x_plus_shrink(dropout):
    M, in_f, out_f, r = 256, 128, 192, 8
    ours = LoRALinear(linear8bit(in_f, out_f), r=r, lora_alpha=16, lora_dropout=dropout)
    ours.base_layer(torch.randn(1, in_f))  # SCB now in layer.state, as in a model after step 1
    assert ours.training
    x = torch.randn(M, in_f, requires_grad=True)
    frozen = [*ours.parameters(), *ours.buffers(), ours.base_layer.state.SCB]
    ours_bytes, shapes, y = saved_tensor_bytes(lambda: ours(x), exclude=frozen)
    seed_bytes = 8 if dropout else 0
    assert ours_bytes == x.numel() * 4 + M * r * 4 + seed_bytes, shapes
    assert (out_f, in_f) not in shapes  # no dequantized weight among the saved activations
    y.sum().backward()
    assert ours.lora_A.weight.grad is not None and ours.base_layer.weight.grad is None


def test_projection_group_and_merge_refusal():
    layers = [LoRALinear(linear8bit(64, o, seed=o), r=4, lora_alpha=8) for o in (64, 32)]
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 64)
    outs = LoRAProjectionGroup(layers)(x)
    for out, layer in zip(outs, layers):
        assert_close(out, layer(x), scale=10)
    with pytest.raises(ValueError, match="cannot mix"):
        LoRAProjectionGroup([layers[0], LoRALinear(nn.Linear(64, 8), r=2, lora_alpha=2)])
    with pytest.raises(NotImplementedError, match="int8 weight cannot hold"):
        layers[0].merge()
