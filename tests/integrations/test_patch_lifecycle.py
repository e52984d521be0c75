"""fastpeft.patch through peft's adapter lifecycle (issue 17): every step runs on a patched peft model
and on its unpatched twin with the same weights; outputs, gradients and state_dicts must agree, the
fused ops must run where they can, and every layer on peft's path is reported with its reason."""

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.integrations.patch import explain  # noqa: E402
from tests.integrations.lifecycle_helpers import (  # noqa: E402
    assert_same,
    assert_same_state,
    fastpeft_ops,
    inputs,
    make_model,
    randomize,
)

P = "base_model.model."
LORA_OP = "fastpeft.lora_linear"
IA3_OP = "fastpeft.ia3_linear"


def _bases(kind):
    return pytest.param(kind, marks=pytest.mark.skipif(kind == "nf4" and not _has_bnb(), reason="bitsandbytes"))


def _has_bnb():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def lora(targets, **kwargs):
    return peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, **kwargs)


def ia3(targets, feedforward=()):
    return peft.IA3Config(target_modules=targets, feedforward_modules=list(feedforward))


def twins(kind, config, adapter_name="default"):
    """(patched peft model, its unpatched twin, the first patch report)."""
    reference = peft.get_peft_model(make_model(kind), config, adapter_name=adapter_name)
    randomize(reference, adapter_name)
    patched = copy.deepcopy(reference)
    return patched, reference, fastpeft.patch(patched, warn=False)


def both(patched, reference, step):
    step(patched)
    step(reference)


def n_ops(model, x, op, **kwargs):
    return sum(op in name for name in fastpeft_ops(model, x, **kwargs))


# ---- several adapters on different layers ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", _bases("nf4")])
def test_lora_lifecycle_with_adapters_on_different_layers(kind):
    x = inputs(kind)
    patched, reference, report = twins(kind, lora(["fc1", "fc2"]), adapter_name="one")
    assert report.patched == [P + "fc1", P + "fc2"] and not report.skipped
    assert_same(patched, reference, x)

    def add_b(m):
        m.add_adapter("two", lora(["fc2", "fc3"]))
        randomize(m, "two")

    both(patched, reference, add_b)  # fc3 is a new peft layer: it runs peft's forward until patched
    assert_same(patched, reference, x)
    report = fastpeft.patch(patched, warn=False)  # patch -> add_adapter -> patch
    assert report.patched == [] and report.already_patched == [P + "fc1", P + "fc2"]
    assert report.skipped == {P + "fc3": "no active adapter on this layer"} and report.deferred == [P + "fc3"]
    assert n_ops(patched, x, LORA_OP) == 2

    both(patched, reference, lambda m: m.set_adapter("two"))  # fc1 has no b: base only
    assert explain(patched) == {P + "fc1": "no active adapter on this layer", P + "fc2": None, P + "fc3": None}
    assert_same(patched, reference, x)
    assert n_ops(patched, x, LORA_OP) == 2

    both(patched, reference, lambda m: m.base_model.set_adapter(["one", "two"]))  # fc2 holds both: peft's path
    assert explain(patched)[P + "fc2"] == "2 active adapters on one layer"
    with pytest.warns(UserWarning, match="2 active adapters on one layer"):
        assert_same(patched, reference, x)
    assert n_ops(patched, x, LORA_OP) == 2

    both(patched, reference, lambda m: m.set_requires_grad("one", requires_grad=False))
    assert_same(patched, reference, x)  # only b's weights get gradients, as in peft
    both(patched, reference, lambda m: m.set_requires_grad("one", requires_grad=True))

    patched.eval(), reference.eval()
    # (in eval mode bitsandbytes would repack a 4-bit weight for its AVX512-BF16 CPU kernel; patched
    # bases opt out, so the layers below stay fused after the mixed batch ran bitsandbytes' forward)
    xe = x.clone().requires_grad_(kind == "nf4")
    names = ["one", "two", "__base__", "one"]
    assert_same(patched, reference, xe, train=False, adapter_names=names)  # mixed batch: peft's path

    if kind == "linear":  # (peft's own 4-bit merge fails on these CPU weights)
        both(patched, reference, lambda m: m.base_model.merge_adapter())
        assert all(r == "adapters are merged into the base weight" for r in explain(patched).values())
        assert_same(patched, reference, xe, train=False)
        both(patched, reference, lambda m: m.base_model.unmerge_adapter())
        assert_same(patched, reference, xe, train=False)
    assert n_ops(patched, xe, LORA_OP) == 2
    patched.train(), reference.train()

    with patched.disable_adapter(), reference.disable_adapter():
        assert n_ops(patched, x, LORA_OP) == 0
        assert_same(patched, reference, x)

    both(patched, reference, lambda m: m.delete_adapter("one"))
    assert patched.active_adapters == reference.active_adapters == ["two"]
    expected = {P + "fc1": "no active adapter on this layer", P + "fc2": None, P + "fc3": None}
    assert explain(patched) == expected
    assert_same(patched, reference, x)
    assert_same_state(patched, reference)

    if kind == "linear":
        merged_p = copy.deepcopy(patched).merge_and_unload()
        merged_r = copy.deepcopy(reference).merge_and_unload()
        assert_same(merged_p, merged_r, x, train=False)

    assert fastpeft.unpatch(patched) == 3
    assert n_ops(patched, x, LORA_OP) == 0
    torch.testing.assert_close(patched(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", _bases("nf4")])
def test_ia3_lifecycle_with_adapters_on_different_layers(kind):
    x = inputs(kind)
    patched, reference, report = twins(kind, ia3(["fc1", "fc2"], feedforward=["fc2"]), adapter_name="one")
    assert report.patched == [P + "fc1", P + "fc2"]
    assert_same(patched, reference, x)

    def add_b(m):
        m.add_adapter("two", ia3(["fc2", "fc3"], feedforward=["fc2"]))
        randomize(m, "two")

    both(patched, reference, add_b)
    report = fastpeft.patch(patched, warn=False)
    assert report.already_patched == [P + "fc1", P + "fc2"] and report.deferred == [P + "fc3"]
    assert_same(patched, reference, x)

    both(patched, reference, lambda m: m.set_adapter("two"))
    assert_same(patched, reference, x)
    assert n_ops(patched, x, IA3_OP) == 2

    both(patched, reference, lambda m: m.base_model.set_adapter(["one", "two"]))  # peft multiplies the vectors
    assert_same(patched, reference, x)
    assert n_ops(patched, x, IA3_OP) == 3

    both(patched, reference, lambda m: m.set_requires_grad("two", requires_grad=False))
    assert_same(patched, reference, x)
    both(patched, reference, lambda m: m.set_requires_grad("two", requires_grad=True))

    if kind == "linear":  # peft merges (IA)^3 into dense weights only
        both(patched, reference, lambda m: m.base_model.merge_adapter())
        assert_same(patched, reference, x, train=False)
        both(patched, reference, lambda m: m.base_model.unmerge_adapter())
        assert_same(patched, reference, x, train=False)

    with patched.disable_adapter(), reference.disable_adapter():
        assert n_ops(patched, x, IA3_OP) == 0
        assert_same(patched, reference, x)
    assert n_ops(patched, x, IA3_OP) == 3

    both(patched, reference, lambda m: m.delete_adapter("one"))
    assert_same(patched, reference, x)
    assert_same_state(patched, reference)
    if kind == "linear":
        assert_same(copy.deepcopy(patched).merge_and_unload(), copy.deepcopy(reference).merge_and_unload(), x, train=False)

    assert fastpeft.unpatch(patched) == 3
    torch.testing.assert_close(patched(x), reference(x), rtol=0, atol=0)


# ---- adapters the fused op cannot run, added after patch ---------------------------------------------


def test_dora_adapter_added_after_patch_runs_the_fused_dora_op():
    x = inputs("linear")
    patched, reference, _ = twins("linear", lora(["fc1", "fc2", "fc3"]))

    def add_dora(m):
        m.add_adapter("d", lora(["fc1", "fc2", "fc3"], init_lora_weights=False, use_dora=True))
        randomize(m, "d")
        m.set_adapter("d")

    both(patched, reference, add_dora)
    assert set(explain(patched).values()) == {None}
    assert n_ops(patched, x, "fastpeft.dora_linear") == 3 and n_ops(patched, x, LORA_OP) == 0
    assert_same(patched, reference, x)
    both(patched, reference, lambda m: m.set_adapter("default"))  # back to plain LoRA
    assert n_ops(patched, x, LORA_OP) == 3
    assert_same(patched, reference, x)


@pytest.mark.parametrize("variant", [dict(lora_bias=True)], ids=["lora_bias"])
def test_variant_adapter_added_after_patch_runs_peft_forward(variant):
    x = inputs("linear")
    patched, reference, report = twins("linear", lora(["fc1", "fc2", "fc3"]))
    assert len(report.patched) == 3

    def add_variant(m):
        m.add_adapter("v", lora(["fc1", "fc2", "fc3"], init_lora_weights=False, **variant))
        randomize(m, "v")
        m.set_adapter("v")

    both(patched, reference, add_variant)
    reasons = set(explain(patched).values())
    assert len(reasons) == 1 and "lora_bias=True" in reasons.pop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert n_ops(patched, x, LORA_OP) == 0
        assert_same(patched, reference, x)
    report = fastpeft.patch(patched, warn=False)  # patching again reports them, changes nothing
    assert report.patched == [] and report.already_patched == [] and len(report.deferred) == 3

    both(patched, reference, lambda m: m.set_adapter("default"))  # back to plain LoRA: fused again
    assert n_ops(patched, x, LORA_OP) == 3
    assert_same(patched, reference, x)


def test_unfrozen_base_weight_runs_peft_forward():
    x = inputs("linear")
    patched, reference, _ = twins("linear", lora(["fc1", "fc2"]))
    both(patched, reference, lambda m: m.base_model.model.fc1.base_layer.weight.requires_grad_(True))
    assert "requires grad" in explain(patched)[P + "fc1"] and explain(patched)[P + "fc2"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(patched, reference, x)  # fc1's base weight gets peft's gradient


# ---- hooks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_hooks_on_the_base_layer_fire(method):
    x = inputs("linear")
    config = lora(["fc1", "fc2"]) if method == "lora" else ia3(["fc1", "fc2"])
    reference = peft.get_peft_model(make_model("linear"), config)
    randomize(reference, "default")
    patched = copy.deepcopy(reference)
    calls = {"patched": 0, "reference": 0, "layer": 0}

    def counter(key):
        def hook(module, args, output):
            calls[key] += 1
            return output * 2  # a hook that changes the output must change it in both models

        return hook

    handle = patched.base_model.model.fc1.base_layer.register_forward_hook(counter("patched"))
    reference.base_model.model.fc1.base_layer.register_forward_hook(counter("reference"))
    patched.base_model.model.fc2.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    with pytest.warns(UserWarning, match="hooks"):
        report = fastpeft.patch(patched)
    assert report.patched == [P + "fc2"] and report.skipped == {P + "fc1": "the base layer has hooks (run by peft's forward)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(patched, reference, x)
    assert calls == {"patched": 1, "reference": 1, "layer": 1}  # hooks on the patched layer itself fire too
    handle.remove()
    op = LORA_OP if method == "lora" else IA3_OP
    assert n_ops(patched, x, op) == 2 and explain(patched)[P + "fc1"] is None


# ---- mixed adapter types ------------------------------------------------------------------------------


def test_mixed_model_lora_next_to_and_around_loha_and_lokr():
    x = inputs("linear")
    reference = peft.get_peft_model(make_model("linear"), lora(["fc1", "fc2"]), mixed=True)
    reference.add_adapter("loha", peft.LoHaConfig(target_modules=["fc2", "fc3"], r=2, init_weights=False))
    reference.add_adapter("lokr", peft.LoKrConfig(target_modules=["fc3"], r=2, init_weights=False))
    reference.add_adapter("lora2", lora(["fc3"]))  # a LoRA layer around the LoKr around the LoHa
    reference.set_adapter(["default", "loha", "lokr", "lora2"])
    for name in ("default", "lora2"):
        randomize(reference, name)
    patched = copy.deepcopy(reference)
    report = fastpeft.patch(patched, warn=False)
    # fc2: the LoHa layer wraps the LoRA layer, which wraps the Linear: the LoRA layer is fused.
    assert P + "fc1" in report.patched and P + "fc2.base_layer" in report.patched
    assert "loha layers (peft.tuners.loha.layer.Linear)" in report.skipped[P + "fc2"] and report.families[P + "fc2"] == "loha"
    assert "mixed adapter types" in report.skipped[P + "fc3"]  # LoRA around another adapter layer
    assert_same(patched, reference, x)
    assert n_ops(patched, x, LORA_OP) == 2
    fastpeft.unpatch(patched)
    torch.testing.assert_close(patched(x), reference(x), rtol=0, atol=0)


def test_adalora_and_conv_layers_are_reported_and_match_peft():
    x = inputs("linear")
    config = peft.AdaLoraConfig(target_modules=["fc1", "fc2"], total_step=10, init_r=4, target_r=2)
    reference = peft.get_peft_model(make_model("linear"), config)
    patched = copy.deepcopy(reference)
    report = fastpeft.patch(patched, warn=False)
    assert not report.patched and set(report.skipped) == {P + "fc1", P + "fc2"}
    assert all("SVDLinear" in r for r in report.skipped.values())
    assert_same(patched, reference, x)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_conv1d_and_conv2d_bases_are_left_to_peft_with_reasons(method):
    x = inputs("conv")
    targets = ["conv", "c1d", "lin"]
    config = lora(targets) if method == "lora" else ia3(targets, feedforward=["lin"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own fan_in_fan_out warning for the Conv1D
        patched, reference, report = twins("conv", config)
    assert report.patched == [P + "lin"]
    assert set(report.skipped) == {P + "conv", P + "c1d"}
    assert "Conv2d" in report.skipped[P + "conv"]
    assert "Conv1D" in report.skipped[P + "c1d"] or "fan_in_fan_out" in report.skipped[P + "c1d"]
    assert_same(patched, reference, x)
    both(patched, reference, lambda m: (m.add_adapter("two", config.__class__(**{
        k: getattr(config, k) for k in ("target_modules",) + (("feedforward_modules",) if method == "ia3" else ())})),
        randomize(m, "two"), m.base_model.set_adapter(["default", "two"])))  # fmt: skip
    fastpeft.patch(patched, warn=False)
    assert_same(patched, reference, x)
    assert_same_state(patched, reference)



def test_accelerate_hooks_on_the_base_layer_run():
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    x = inputs("linear")
    patched, reference, _ = twins("linear", lora(["fc1", "fc2"]))
    calls = []

    class Double(accelerate_hooks.ModelHook):
        def post_forward(self, module, output):
            calls.append(module)
            return output * 2

    for model in (patched, reference):
        accelerate_hooks.add_hook_to_module(model.base_model.model.fc1.base_layer, Double())
    assert explain(patched)[P + "fc1"] == "the base layer has hooks (run by peft's forward)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(patched, reference, x)
    assert len(calls) == 2  # once per model
    accelerate_hooks.remove_hook_from_module(patched.base_model.model.fc1.base_layer)
    assert explain(patched)[P + "fc1"] is None
