"""AdaptableAdapter (rational activation + Gumbel-softmax layer switch) against its plain-PyTorch
reference, the rational fits, the switch's decided / sampled behaviour and bad input."""

import pytest
import torch
import torch.nn.functional as F

from fastpeft.nn import AdaptableAdapter
from fastpeft.nn.adaptable_adapter import AdaptableAdapterReference, adaptable_adapter_reference
from fastpeft.nn.rational import FIT_RANGE, RATIONAL_INITS, fit_rational
from fastpeft.ops.adapter import rational_reference
from tests.utils import assert_close, devices


@pytest.mark.parametrize("name", sorted(RATIONAL_INITS))
def test_fit_rational_approximates_its_function(name):
    c = fit_rational(name)
    assert c.shape == (10,) and c.dtype == torch.float64
    z = torch.linspace(*FIT_RANGE, 4001, dtype=torch.float64)
    err = (rational_reference(z, c) - RATIONAL_INITS[name](z)).abs().max().item()
    # The kinked functions (relu, leaky relu) cannot be matched at the kink: ~0.03 there.
    assert err < (0.035 if "relu" in name and name != "gelu" else 0.02), (name, err)
    assert torch.equal(c, fit_rational(name))  # cached and deterministic


def test_fit_rational_rejects_unknown_names():
    with pytest.raises(ValueError, match="rational_init must be one of"):
        fit_rational("softplus")
    with pytest.raises(ValueError, match="rational_init must be one of"):
        AdaptableAdapter(8, 2, rational_init="softplus")


def make(N=3, d=24, r=6, ln=False, device="cpu", **kw):
    torch.manual_seed(0)
    a = AdaptableAdapter(d, r, num_adapters=N, ln_before=ln, scaling=0.7, device=device, **kw)
    with torch.no_grad():  # distinct adapters and coefficients per entry
        a.up_weight.normal_(0, 0.3)
        a.down_bias.normal_(0, 0.1)
        a.rational_coeffs.add_(0.05 * torch.randn_like(a.rational_coeffs))
    return a


def params(a):
    return [p for p in a.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_decided_switch_matches_reference_per_example(device, ln, with_residual):
    """Eval: entries with logit_adapter >= logit_skip run the adapter, the others return res exactly."""
    a = make(ln=ln, device=device).eval()
    with torch.no_grad():
        a.switch_logits.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]))
    assert a.keep_mask().tolist() == [True, False, True]
    x = torch.randn(5, 7, 24, device=device, requires_grad=True)
    res = torch.randn(5, 7, 24, device=device) if with_residual else None
    ids = torch.tensor([0, 1, 2, 1, 0], device=device)
    y = a(x, res, ids)
    y_ref = adaptable_adapter_reference(a, x, res, ids)
    assert_close(y, y_ref, scale=10)
    base = x if res is None else res
    assert torch.equal(y[1], base[1]) and torch.equal(y[3], base[3])  # switched off: untouched
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + params(a), g, allow_unused=True)
    want = torch.autograd.grad(y_ref, [x] + params(a), g, allow_unused=True)
    for p, w in zip(got, want):
        assert (p is None) == (w is None)
        if p is not None:
            assert_close(p, w, scale=10)


def test_all_off_is_the_identity_and_all_on_is_the_fused_op():
    a = make(N=2).eval()
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        a.switch_logits.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    assert a(x, adapter_ids=torch.tensor([0, 1])) is x
    with torch.no_grad():
        a.switch_logits.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    ids = torch.tensor([1, 0])
    y = a(x, adapter_ids=ids)
    assert y.grad_fn is None or "Lerp" not in y.grad_fn.name()
    assert_close(y, adaptable_adapter_reference(a, x, None, ids), scale=10)


@pytest.mark.parametrize("hard", [False, True])
def test_training_mixes_by_the_gumbel_sample_and_trains_the_logits(hard):
    """Training: out = lerp(res, adapter(x), g) with g the Gumbel-softmax draw; the logits, the
    rational coefficients and the adapter get the reference's gradients."""
    a = make(switch_hard=hard, switch_temperature=0.5).train()
    x = torch.randn(4, 5, 24, requires_grad=True)
    ids = torch.tensor([2, 0, 1, 2])
    torch.manual_seed(7)
    y = a(x, adapter_ids=ids)
    torch.manual_seed(7)
    sample = F.gumbel_softmax(a.switch_logits, tau=0.5, hard=hard, dim=-1)[:, 0]
    y_ref = adaptable_adapter_reference(a, x, None, ids, switch_weights=sample)
    assert_close(y, y_ref, scale=10)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + params(a), g)
    want = torch.autograd.grad(y_ref, [x] + params(a), g)
    names = ["x"] + [n for n, p in a.named_parameters() if p.requires_grad]
    for name, p, w in zip(names, got, want):
        assert_close(p, w, scale=10)
    grads = dict(zip(names, got))
    assert grads["switch_logits"].abs().sum() > 0
    # The rational's gradient flows through g: zero exactly when every example's draw is "skip".
    assert (grads["rational_coeffs"].abs().sum() > 0) == bool((sample[ids] > 0).any())


def test_decide_switch_stops_sampling_and_training_the_logits():
    a = make(N=2, switch_decided=True).train()
    assert a.switch_decided and not a.switch_logits.requires_grad
    x = torch.randn(2, 3, 24)
    ids = torch.tensor([0, 1])
    torch.manual_seed(1)
    y1 = a(x, adapter_ids=ids)
    torch.manual_seed(2)
    assert torch.equal(y1, a(x, adapter_ids=ids))  # no random draw in training once decided


def test_reference_class_runs_the_reference():
    a = make(N=1).eval()
    ref = make(N=1).eval()
    ref.__class__ = AdaptableAdapterReference
    x = torch.randn(3, 24)
    assert_close(a(x), ref(x), scale=10)


def test_bad_switch_arguments():
    for bad in (0, -1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="switch_temperature must be a positive number"):
            AdaptableAdapter(8, 2, switch_temperature=bad)
    a = AdaptableAdapter(8, 2)
    with pytest.raises(ValueError, match="switch_temperature must be a positive number"):
        a.set_switch_temperature(0.0)
    with pytest.raises(ValueError, match="switch_hard must be a bool"):
        AdaptableAdapter(8, 2, switch_hard=1)


def test_starts_as_the_init_function():
    """A fresh adapter's activation is the rational fit of rational_init (leaky_relu by default)."""
    a = AdaptableAdapter(16, 4, num_adapters=2)
    assert torch.equal(a.rational_coeffs[0].double(), fit_rational("leaky_relu").float().double())
    assert torch.equal(a.rational_coeffs[0], a.rational_coeffs[1])
    assert a.switch_logits.shape == (2, 2) and torch.equal(a.switch_logits, torch.zeros(2, 2))


def test_decided_switch_follows_changes_of_the_logits():
    """The eval decision is read back once per change of the logits (their version counter): an
    in-place edit, an optimizer step or a load after an eval forward takes effect at the next one."""
    a = make(N=1).eval()
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        a.switch_logits.copy_(torch.tensor([[1.0, 0.0]]))
    assert a(x) is not x
    with torch.no_grad():
        a.switch_logits.copy_(torch.tensor([[0.0, 1.0]]))
    assert a(x) is x
    opt = torch.optim.SGD([a.switch_logits], lr=10.0)
    a.switch_logits.grad = torch.tensor([[-1.0, 1.0]])  # pushes "adapter" up by 10, "skip" down
    opt.step()
    assert a(x) is not x
    a.load_state_dict({**a.state_dict(), "switch_logits": torch.tensor([[-5.0, 5.0]])})
    assert a(x) is x
