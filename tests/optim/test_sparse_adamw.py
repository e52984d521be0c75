"""SparseMaskedAdamW against torch.optim.AdamW with dense-masked gradients over hundreds of
steps, state_dict save/reload mid-run, exact state bytes, AMP and bad masks."""

import copy
import io

import pytest
import torch
from torch import nn

from fastpeft.optim import SparseMaskedAdamW, random_mask, state_bytes_formula
from fastpeft.optim.masks import dense_mask_of
from tests.utils import assert_close, devices


class TinyMLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(48, 64, dtype=dtype)
        self.fc2 = nn.Linear(64, 10, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batch(step, device, dtype=torch.float32):
    """The data of a step, the same for every run (a function of the step number only)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 48, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(32, 10, generator=gen).to(device=device, dtype=dtype)
    return x, y


def make_model_and_mask(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = TinyMLP(dtype).to(device)
    mask = random_mask(model, keep_ratio=0.05, include=lambda n, p: n.endswith("weight"), seed=seed)
    mask["fc1.bias"] = None  # one dense (fully trained) tensor among the masked ones
    return model, mask


def train(model, opt, steps, device, start=0, before_step=None, scaler=None):
    for step in range(start, start + steps):
        x, y = batch(step, device, next(model.parameters()).dtype)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).float().pow(2).mean()
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


def dense_masked_adamw(model, mask, **kw):
    """The reference practice: torch AdamW on every parameter, gradients multiplied by a dense mask."""
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in mask)
    dense = {n: dense_mask_of(mask[n], params[n]) for n in mask}
    opt = torch.optim.AdamW([params[n] for n in mask], foreach=False, **kw)

    def apply_masks():
        for n, m in dense.items():
            params[n].grad.mul_(m)

    return opt, apply_masks


@pytest.mark.parametrize("device", devices())
def test_matches_dense_masked_torch_adamw_over_300_steps(device):
    model, mask = make_model_and_mask(device)
    ref_model = copy.deepcopy(model)
    opt = SparseMaskedAdamW.from_mask(model, mask, lr=3e-3, weight_decay=0.0)
    ref_opt, apply_masks = dense_masked_adamw(ref_model, mask, lr=3e-3, weight_decay=0.0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 300, device)
    train(ref_model, ref_opt, 300, device, before_step=apply_masks)
    ref = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p, ref[n], scale=10, msg=f"{n} after 300 steps")
        if n in mask and mask[n] is not None:
            moved = (p.detach() != start[n]).sum().item()
            assert 0 < moved <= mask[n].numel()  # trained entries moved, nothing else did


@pytest.mark.parametrize("device", devices())
def test_weight_decay_leaves_untrained_entries_bit_identical(device):
    model, mask = make_model_and_mask(device)
    ref_model = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SparseMaskedAdamW.from_mask(model, mask, lr=1e-2, weight_decay=0.1)
    train(model, opt, 50, device)
    for n, p in model.named_parameters():
        if n not in mask:
            assert torch.equal(p, start[n])  # frozen parameter
        elif mask[n] is not None:
            frozen = dense_mask_of(mask[n], p) == 0
            assert torch.equal(p.detach()[frozen], start[n][frozen])
    # The dense-masked practice decays the untrained entries too: that is what this optimizer fixes.
    ref_opt, apply_masks = dense_masked_adamw(ref_model, mask, lr=1e-2, weight_decay=0.1)
    train(ref_model, ref_opt, 50, device, before_step=apply_masks)
    w = ref_model.fc1.weight.detach()
    frozen = dense_mask_of(mask["fc1.weight"], w) == 0
    assert not torch.equal(w[frozen], start["fc1.weight"][frozen])


@pytest.mark.parametrize("device", devices())
def test_state_dict_saved_mid_run_gives_the_same_trajectory(device):
    model, mask = make_model_and_mask(device)
    resumed_model = copy.deepcopy(model)
    opt = SparseMaskedAdamW.from_mask(model, mask, lr=3e-3, weight_decay=0.05)
    train(model, opt, 300, device)

    opt2 = SparseMaskedAdamW.from_mask(resumed_model, mask, lr=3e-3, weight_decay=0.05)
    train(resumed_model, opt2, 150, device)
    buf_opt, buf_model = io.BytesIO(), io.BytesIO()
    torch.save(opt2.state_dict(), buf_opt)
    torch.save(resumed_model.state_dict(), buf_model)
    del opt2
    # A fresh process would rebuild model and optimizer, then load both checkpoints; weights_only
    # loading proves the state holds no pickled code.
    fresh_model, _ = make_model_and_mask(device, seed=123)  # different init, overwritten by the load
    fresh_model.load_state_dict(torch.load(io.BytesIO(buf_model.getvalue()), weights_only=True))
    fresh_opt = SparseMaskedAdamW.from_mask(fresh_model, mask, lr=1.0, weight_decay=0.0)  # hyperparams come back
    fresh_opt.load_state_dict(torch.load(io.BytesIO(buf_opt.getvalue()), weights_only=True))
    assert fresh_opt.param_groups[0]["lr"] == 3e-3
    train(fresh_model, fresh_opt, 150, device, start=150)
    for (n, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("device", devices())
def test_loaded_masks_replace_construction_masks_and_are_copied(device):
    model, mask = make_model_and_mask(device)
    opt = SparseMaskedAdamW.from_mask(model, mask)
    train(model, opt, 3, device)
    other_mask = random_mask(model, like=mask, seed=99)
    opt2 = SparseMaskedAdamW.from_mask(model, other_mask)
    sd = opt.state_dict()
    opt2.load_state_dict(sd)
    for p in opt.state:
        s1, s2 = opt.state[p], opt2.state[p]
        if "indices" in s1:
            assert torch.equal(s1["indices"], s2["indices"])
            assert s1["indices"].data_ptr() != s2["indices"].data_ptr()
        assert s2["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("device", devices())
def test_state_bytes_equal_the_formula_and_not_the_dense_size(device):
    big = nn.Linear(512, 1024, device=device)  # 524288 weights
    small = nn.Linear(64, 64, device=device)
    k = 1000
    idx = torch.randperm(big.weight.numel())[:k].sort().values.to(torch.int32)
    idx64 = torch.randperm(small.weight.numel())[:k].sort().values.to(torch.int64)
    opt = SparseMaskedAdamW([big.weight, small.weight, big.bias], masks=[idx, idx64, None])
    expected = state_bytes_formula(k + k + 1024, index_bytes=4 * k + 8 * k, tensors=3)
    assert opt.state_bytes() == expected == 8 * 3024 + 12 * k + 12
    measured = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert measured == expected
    # The same k entries of a 64x bigger weight cost the same bytes.
    huge = nn.Linear(4096, 8192, bias=False, device=device)
    opt_huge = SparseMaskedAdamW([huge.weight], masks=[idx])
    opt_big = SparseMaskedAdamW([big.weight], masks=[idx])
    assert opt_huge.state_bytes() == opt_big.state_bytes() == state_bytes_formula(k, 4 * k, 1)


@pytest.mark.parametrize("device", devices())
def test_bf16_params_keep_float32_state_and_track_float32_master(device):
    model, mask = make_model_and_mask(device, dtype=torch.bfloat16)
    opt = SparseMaskedAdamW.from_mask(model, mask, lr=1e-2, weight_decay=0.0)
    for s in opt.state.values():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
    # Same trajectory as a float32 copy trained on the same gradients, to bf16 resolution.
    model32 = copy.deepcopy(model).float()
    opt32 = SparseMaskedAdamW.from_mask(model32, mask, lr=1e-2, weight_decay=0.0)
    p16, p32 = dict(model.named_parameters()), dict(model32.named_parameters())
    for step in range(20):
        x, y = batch(step, device)
        opt.zero_grad()
        opt32.zero_grad()
        (model(x.bfloat16()) - y.bfloat16()).float().pow(2).mean().backward()
        for n in mask:  # feed the float32 copy the bf16 model's gradients
            p32[n].grad = p16[n].grad.float()
        opt.step()
        opt32.step()
    for n in mask:
        torch.testing.assert_close(p16[n].float(), p32[n], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", devices())
def test_grad_scaler_matches_unscaled_and_skips_inf_steps(device):
    model, mask = make_model_and_mask(device)
    ref_model = copy.deepcopy(model)
    opt = SparseMaskedAdamW.from_mask(model, mask, lr=3e-3)
    ref_opt = SparseMaskedAdamW.from_mask(ref_model, mask, lr=3e-3)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1000)
    train(model, opt, 20, device, scaler=scaler)
    train(ref_model, ref_opt, 20, device)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)  # power-of-two scaling is exact, and the kernel unscales
    assert not hasattr(opt, "grad_scale")  # GradScaler removed what it lent

    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[model.fc1.weight].items()}

    def poison():
        model.fc2.weight.grad[0, 0] = float("inf")

    train(model, opt, 1, device, start=20, scaler=scaler, before_step=poison)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for k, v in opt.state[model.fc1.weight].items():
        assert torch.equal(v, state_before[k]), k  # step counter not advanced either
    assert scaler.get_scale() == 2.0**9


def test_params_without_grad_are_skipped():
    a, b = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(10))
    opt = SparseMaskedAdamW([a, b], masks=[torch.tensor([1, 3], dtype=torch.int32), None])
    a.grad = torch.ones(10)
    b0 = b.detach().clone()
    opt.step()
    assert torch.equal(b, b0)
    assert opt.state[a]["step"].item() == 1 and opt.state[b]["step"].item() == 0


def test_param_groups_with_their_own_masks_and_lr():
    a, b = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(6))
    opt = SparseMaskedAdamW(
        [{"params": [a], "masks": [torch.tensor([0, 5])], "lr": 0.1}, {"params": [b], "lr": 0.01}],
        weight_decay=0.0,
    )
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    opt.step()
    # First Adam step moves each trained entry by -lr (bias-corrected m / sqrt(v) = 1).
    assert_close(a.detach(), torch.tensor([-0.1, 0, 0, 0, 0, -0.1]))
    assert_close(b.detach(), torch.full((6,), -0.01))


def test_bad_masks_raise_clear_errors():
    w = nn.Parameter(torch.randn(4, 5))
    cases = [
        ([torch.tensor([0, 20])], r"masks\[0\] holds indices in \[0, 20\] but the tensor has 20 elements"),
        ([torch.tensor([-1, 2])], r"masks\[0\] holds indices in \[-1, 2\]"),
        ([torch.tensor([3, 1])], r"masks\[0\] must be sorted in increasing order without repeats"),
        ([torch.tensor([1, 1])], r"masks\[0\] must be sorted in increasing order without repeats"),
        ([torch.tensor([1.0, 2.0])], r"masks\[0\] must be int32 or int64"),
        ([torch.tensor([[1, 2]])], r"masks\[0\] must be 1-D"),
        ([None, None], r"one entry \(indices or None\) per parameter: got 2 masks for 1 parameters"),
    ]
    for masks, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            SparseMaskedAdamW([w], masks=masks)
    for kw, pattern in [(dict(lr=-1.0), "lr must be >= 0"), (dict(betas=(1.0, 0.9)), r"betas must be in \[0, 1\)"),
                        (dict(eps=-1e-8), "eps must be >= 0"), (dict(weight_decay=-0.1), "weight_decay must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=pattern):
            SparseMaskedAdamW([w], **kw)
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="parameters the model does not have"):
        SparseMaskedAdamW.from_mask(model, {"nope.weight": None})
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        SparseMaskedAdamW([nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    opt = SparseMaskedAdamW([w])
    w.grad = torch.ones(4, 5).to_sparse()
    with pytest.raises(ValueError, match="needs dense gradients"):
        opt.step()


def test_tampered_state_dict_is_rejected():
    w = nn.Parameter(torch.randn(4, 5))
    opt = SparseMaskedAdamW([w], masks=[torch.tensor([1, 2, 7], dtype=torch.int32)])
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["indices"] = torch.tensor([7, 2, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"state\[0\]\['indices'\] must be sorted"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] must be float32 of shape \(3,\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["indices"] = torch.tensor([1, 2, 70], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"holds indices in \[1, 70\] but the tensor has 20 elements"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0, 1]
    with pytest.raises(ValueError, match="param group 0 has 1 params"):
        opt.load_state_dict(bad)
