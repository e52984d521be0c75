"""Tiny custom models (MLP, conv + Conv1D + linear, MLP with bitsandbytes 4-bit layers) and the
comparison of a patched peft model with its unpatched twin, for the adapter lifecycle tests."""

import zlib

import torch
from torch import nn

# fp32 everywhere; the fused op sums in another order than peft's three matmuls.
TOL = dict(rtol=1e-4, atol=1e-5)


class MLP(nn.Module):
    """fc1 -> relu -> fc2 -> relu -> fc3, on [batch, 8] inputs. (The widths avoid in_features 16 and 32,
    where fastpeft's NF4 dequantization differs from bitsandbytes' on the CPU: see the report of issue 17.)"""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvStack(nn.Module):
    """A 1x1 Conv2d, a transformers Conv1D (weight stored [in, out]) and a Linear, on [batch, 3, 2, 2]."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.c1d = Conv1D(16, 16)
        self.lin = nn.Linear(16, 4)

    def forward(self, x):
        h = self.conv(x).flatten(1)
        return self.lin(torch.relu(self.c1d(h)))


def _to_4bit(linear: nn.Linear):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """``"linear"``: MLP; ``"nf4"``: the MLP with fc1 and fc2 in bitsandbytes NF4; ``"conv"``: ConvStack."""
    torch.manual_seed(seed)
    if kind == "conv":
        return ConvStack()
    model = MLP()
    if kind == "nf4":
        model.fc1, model.fc2 = _to_4bit(model.fc1), _to_4bit(model.fc2)
    return model


def inputs(kind: str, seed: int = 1, batch: int = 4) -> torch.Tensor:
    """A batch for ``make_model(kind)``."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 2, 2) if kind == "conv" else (batch, 8)
    return torch.randn(shape, generator=g)


def randomize(model: nn.Module, adapter: str) -> None:
    """Give ``adapter``'s weights values that change the output (peft starts LoRA B at 0 and (IA)^3
    at 1), the same in every model holding the same names: each tensor is seeded from its name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}." not in name + "." or not any(k in name for k in ("lora_", "ia3_l", "hada_", "lokr_")):
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)


def fastpeft_ops(model, *args, **kwargs) -> list:
    """The fastpeft ops one forward of ``model`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "fastpeft" in str(func):
                names.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder():
        model(*args, **kwargs)
    return names


def outputs_and_grads(model, x, **kwargs):
    """(output, {name: grad}) of one forward/backward of ``(model(x) ** 2).mean()``; grads cleared after."""
    out = model(x, **kwargs)
    if not out.requires_grad:  # nothing trains (adapters disabled or frozen)
        return out.detach(), {}
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_same(patched, reference, x, train=True, tol=TOL, **kwargs):
    """Same output (and, with ``train``, the same gradients on the same parameters) as the reference."""
    if train:
        out_p, grads_p = outputs_and_grads(patched, x, **kwargs)
        out_r, grads_r = outputs_and_grads(reference, x, **kwargs)
        assert set(grads_p) == set(grads_r), sorted(set(grads_p) ^ set(grads_r))
        for name in grads_r:
            torch.testing.assert_close(grads_p[name], grads_r[name], **tol, msg=name)
    else:
        with torch.no_grad():
            out_p, out_r = patched(x, **kwargs), reference(x, **kwargs)
    torch.testing.assert_close(out_p, out_r, **tol)
    return out_p


def assert_same_state(patched, reference):
    """The same state_dict (keys and values) and the same trainable flags."""
    sp, sr = patched.state_dict(), reference.state_dict()
    assert list(sp) == list(sr)
    for k in sr:
        if sr[k].dtype.is_floating_point:
            torch.testing.assert_close(sp[k], sr[k], rtol=0, atol=0, msg=k)
    assert {n: p.requires_grad for n, p in patched.named_parameters()} == {
        n: p.requires_grad for n, p in reference.named_parameters()
    }
