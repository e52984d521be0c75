"""FastPeftModel's peft surface (issue 17): several adapters, switching, disabling, merging, deleting,
saving, against a peft model with the same adapters and weights (same parameter names)."""

import copy
import os

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from tests.integrations.lifecycle_helpers import (  # noqa: E402
    assert_same,
    fastpeft_ops,
    inputs,
    make_model,
    randomize,
)
from tests.integrations.test_patch_lifecycle import _bases, ia3, lora  # noqa: E402


def configs(method):
    if method == "lora":
        return lora(["fc1", "fc2"]), lora(["fc2", "fc3"])
    return ia3(["fc1", "fc2"], feedforward=["fc2"]), ia3(["fc2", "fc3"], feedforward=["fc2"])


def pair(kind, method):
    """(fastpeft model, peft model), adapters "one" (active) and "two" on overlapping layers, same weights."""
    first, second = configs(method)
    fast = fastpeft.get_peft_model(make_model(kind), first, adapter_name="one")
    ref = peft.get_peft_model(make_model(kind), first, adapter_name="one")
    fast.add_adapter("two", second)
    ref.add_adapter("two", second)
    for model in (fast, ref):
        randomize(model, "one")
        randomize(model, "two")
    return fast, ref


def flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def same_state(fast, ref):
    sf, sr = fast.state_dict(), ref.state_dict()
    assert sorted(sf) == sorted(sr)
    for k in sr:
        torch.testing.assert_close(sf[k], sr[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("kind", ["linear", _bases("nf4")])
def test_several_adapters_like_peft(kind, method):
    x = inputs(kind)
    fast, ref = pair(kind, method)
    assert fast.prefix == ref.base_model.prefix
    assert fast.active_adapters == ref.active_adapters == ["one"] and fast.active_adapter == ref.active_adapter == "one"
    assert sorted(fast.peft_config) == sorted(ref.peft_config) == ["one", "two"]
    assert flags(fast) == flags(ref)  # names as peft's, b added frozen
    same_state(fast, ref)
    assert_same(fast, ref, x)
    op = "fastpeft.lora_linear" if method == "lora" else "fastpeft.ia3_linear"
    assert sum(op in n for n in fastpeft_ops(fast, x)) == 2

    for model in (fast, ref):
        model.set_adapter("two")
    assert flags(fast) == flags(ref) and fast.active_adapters == ["two"]
    assert_same(fast, ref, x)

    fast.set_adapter(["one", "two"])
    ref.base_model.set_adapter(["one", "two"])
    assert flags(fast) == flags(ref)
    assert_same(fast, ref, x)

    for model in (fast, ref):
        model.set_requires_grad("one", False)
    assert flags(fast) == flags(ref)
    assert_same(fast, ref, x)

    with fast.disable_adapter(), ref.disable_adapter():
        assert flags(fast) == flags(ref)
        assert_same(fast, ref, x)
    assert flags(fast) == flags(ref)  # peft makes the active adapters trainable again
    assert_same(fast, ref, x)

    if kind == "linear":
        fast.merge_adapter()
        ref.base_model.merge_adapter()
        assert_same(fast, ref, x, train=False)
        same_state(fast, ref)
        with fast.disable_adapter(), ref.disable_adapter():  # disabling unmerges, as in peft
            assert_same(fast, ref, x, train=False)
        fast.unmerge_adapter()
        ref.base_model.unmerge_adapter()
        assert_same(fast, ref, x)
        same_state(fast, ref)
    else:
        with pytest.raises(NotImplementedError, match="dense"):
            fast.merge_adapter()

    for model in (fast, ref):
        model.delete_adapter("two")
    assert fast.active_adapters == ref.active_adapters == ["one"] and sorted(fast.peft_config) == ["one"]
    assert flags(fast) == flags(ref)
    assert_same(fast, ref, x)
    same_state(fast, ref)
    if kind == "linear":
        merged_f = copy.deepcopy(fast).merge_and_unload(progressbar=False, safe_merge=True, adapter_names=["one"])
        merged_r = copy.deepcopy(ref).merge_and_unload(progressbar=False, safe_merge=True, adapter_names=["one"])
        assert type(merged_f.fc1) is torch.nn.Linear
        assert_same(merged_f, merged_r, x, train=False)
    assert fast.get_base_model() is fast.base_model.model
    plain = copy.deepcopy(fast).unload()
    assert not any("lora_" in n or "ia3_" in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_save_pretrained_per_adapter_like_peft(method, tmp_path):
    from safetensors.torch import load_file

    fast, ref = pair("linear", method)
    fast.save_pretrained(str(tmp_path / "fast"))
    ref.save_pretrained(str(tmp_path / "peft"))
    for name in ("one", "two"):
        ours = load_file(os.path.join(tmp_path, "fast", name, "adapter_model.safetensors"))
        theirs = load_file(os.path.join(tmp_path, "peft", name, "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs)
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    # peft loads what fastpeft saved
    x = inputs("linear")
    loaded = peft.PeftModel.from_pretrained(make_model("linear"), str(tmp_path / "fast" / "two"))
    fast.set_adapter("two")
    assert_same(fast, loaded, x, train=False)
    # fastpeft loads it back as another adapter
    fast.load_adapter(str(tmp_path / "peft" / "one"), adapter_name="a2")
    fast.set_adapter("a2")
    ref.set_adapter("one")
    assert_same(fast, ref, x, train=False)

    fast.save_pretrained(str(tmp_path / "bin"), safe_serialization=False, selected_adapters=["one"])
    assert os.listdir(tmp_path / "bin" / "one") == ["adapter_config.json", "adapter_model.bin"] or sorted(
        os.listdir(tmp_path / "bin" / "one")) == ["adapter_config.json", "adapter_model.bin"]  # fmt: skip
    loaded = peft.PeftModel.from_pretrained(make_model("linear"), str(tmp_path / "bin" / "one"))
    ref.set_adapter("one")
    assert_same(loaded, ref, x, train=False)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_single_adapter_disable_and_merge_like_peft(method):
    x = inputs("linear")
    config = configs(method)[0]
    fast = fastpeft.get_peft_model(make_model("linear"), config, adapter_name="mine", autocast_adapter_dtype=True)
    ref = peft.get_peft_model(make_model("linear"), config, adapter_name="mine", autocast_adapter_dtype=True)
    randomize(ref, "mine")
    own = dict(fast.named_parameters())
    with torch.no_grad():  # one adapter: fastpeft's names lack the adapter name
        for name, p in ref.named_parameters():
            if ".mine" in name:
                own[name.replace(".mine", "")].copy_(p)
    assert_same(fast, ref, x, train=False)
    names = sorted(n for n, _ in fast.named_parameters())
    assert ("base_model.model.fc1.lora_A.weight" if method == "lora" else "base_model.model.fc1.ia3_l") in names

    def same_flags():
        assert flags(fast) == {n.replace(".mine", ""): f for n, f in flags(ref).items()}

    for model in (fast, ref):
        model.set_adapter("mine")
    same_flags()
    with fast.disable_adapter(), ref.disable_adapter():
        same_flags()
        assert_same(fast, ref, x, train=False)
    same_flags()
    fast.merge_adapter()
    ref.base_model.merge_adapter()
    assert_same(fast, ref, x, train=False)
    with fast.disable_adapter(), ref.disable_adapter():  # unmerges, as peft's disabled forward does
        assert_same(fast, ref, x, train=False)
    fast.merge_adapter()
    ref.base_model.merge_adapter()
    fast.unmerge_adapter()
    ref.base_model.unmerge_adapter()
    assert_same(fast, ref, x, train=False)
    for model in (fast, ref):
        model.set_requires_grad("mine", False)
    same_flags()
    for model in (fast, ref):
        model.set_adapter("mine", inference_mode=False)
    same_flags()
    # none of this changed fastpeft's parameter names (no adapter name in them while there is one adapter)
    assert sorted(n for n, _ in fast.named_parameters()) == names
    base = {k: v for k, v in fast.state_dict().items() if "base_layer" in k}
    ref_base = {k: v for k, v in ref.state_dict().items() if "base_layer" in k}
    for k, v in ref_base.items():
        torch.testing.assert_close(base[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_autocast_adapter_dtype_false_keeps_the_base_dtype():
    config = lora(["fc1", "fc2"])
    fast = fastpeft.get_peft_model(make_model("linear").to(torch.bfloat16), config, autocast_adapter_dtype=False)
    ref = peft.get_peft_model(make_model("linear").to(torch.bfloat16), config, autocast_adapter_dtype=False)
    dtypes_f = {n: p.dtype for n, p in fast.named_parameters() if "lora_" in n}
    dtypes_r = {n.replace(".default", ""): p.dtype for n, p in ref.named_parameters() if "lora_" in n}
    assert dtypes_f == dtypes_r and set(dtypes_f.values()) == {torch.bfloat16}
    fast = fastpeft.get_peft_model(make_model("linear").to(torch.bfloat16), config)
    assert {p.dtype for n, p in fast.named_parameters() if "lora_" in n} == {torch.float32}


def test_add_adapter_validates_before_changing_anything():
    fast = fastpeft.get_peft_model(make_model("conv"), lora(["lin"]))
    names = sorted(n for n, _ in fast.named_parameters())
    with pytest.raises(NotImplementedError, match="c1d"):
        fast.add_adapter("two", lora(["lin", "c1d"]))
    assert "two" not in fast.peft_config
    with pytest.raises(ValueError, match="different peft types"):
        fast.add_adapter("three", ia3(["lin"]))
    assert sorted(n.replace(".default", "") for n, _ in fast.named_parameters()) == names


def test_other_methods_raise_not_implemented():
    fast = fastpeft.get_peft_model(make_model("linear"), fastpeft.BitFitConfig(which="all"))
    for call in (lambda: fast.set_adapter("default"), lambda: fast.disable_adapter().__enter__(),
                 lambda: fast.merge_adapter(), lambda: fast.delete_adapter("default"),
                 lambda: fast.add_adapter("two", fastpeft.BitFitConfig(which="all"))):  # fmt: skip
        with pytest.raises(NotImplementedError, match="BITFIT|BitFit|bitfit"):
            call()
    assert fast.active_adapters == ["default"]
