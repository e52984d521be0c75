"""Mask selection: exact top-k, FishMask against the brute-force definition, BitFit names,
random masks, index dtypes, save/load."""

import math

import pytest
import torch
from torch import nn

from fastpeft.optim import (
    bitfit_mask,
    fisher_mask,
    index_dtype,
    load_mask,
    mask_density,
    random_mask,
    save_mask,
    topk_indices,
    validate_mask,
)
from fastpeft.optim import topk as topk_module
from fastpeft.optim.random_mask import sample_without_replacement

# ---- exact top-k -----------------------------------------------------------------------------------


def brute_force_topk(scores, k):
    """First k of a stable descending sort of all scores concatenated, split back per tensor."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, offset = [], 0
    for s in scores:
        sel = order[(order >= offset) & (order < offset + s.numel())] - offset
        out.append(sel.sort().values)
        offset += s.numel()
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 7, 100, 509])
def test_topk_equals_stable_sort(ties, k, monkeypatch):
    monkeypatch.setattr(topk_module, "_CHUNK", 64)  # several chunks per tensor
    gen = torch.Generator().manual_seed(k)
    shapes = [(13, 11), (1,), (200,), (5, 5, 7)]
    if ties:  # a handful of distinct values: the k-th value is shared by many entries
        scores = [torch.randint(0, 4, s, generator=gen).float() for s in shapes]
    else:
        scores = [torch.rand(s, generator=gen) * 10.0 ** torch.randint(-30, 30, s, generator=gen) for s in shapes]
    scores[1].zero_()  # zeros sort last
    got = topk_indices(scores, k)
    expected = brute_force_topk(scores, k)
    assert sum(g.numel() for g in got) == k
    for g, e in zip(got, expected):
        assert g.dtype == torch.int32
        assert torch.equal(g.long(), e)


def test_topk_treats_negative_zero_as_zero():
    scores = [torch.tensor([-0.0, 1.0, 0.0, 2.0])]
    assert topk_indices(scores, 3)[0].tolist() == [0, 1, 3]


def test_topk_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        topk_indices([torch.ones(4)], 5)
    with pytest.raises(ValueError, match="finite and >= 0"):
        topk_indices([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        topk_indices([torch.tensor([1.0, -2.0])], 1)
    with pytest.raises(ValueError, match="must be float32"):
        topk_indices([torch.ones(3, dtype=torch.float64)], 1)


def test_index_dtype_switches_at_31_bits():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


# ---- FishMask --------------------------------------------------------------------------------------


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.head(torch.relu(self.body(x))), y)


def samples(n=5):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(1, 6, generator=gen), torch.randn(1, 3, generator=gen)) for _ in range(n)]


def brute_force_fisher(model, data, names):
    """Definition: sum over samples of each sample's squared gradient, from stored per-sample grads."""
    per_sample = []
    params = dict(model.named_parameters())
    for x, y in data:
        grads = torch.autograd.grad(model(x, y), [params[n] for n in names])
        per_sample.append([g.clone() for g in grads])
    return [sum(gs[i] ** 2 for gs in per_sample) for i in range(len(names))]


@pytest.mark.parametrize("keep_ratio", [0.05, 0.3, 1.0])
def test_fisher_mask_global_equals_brute_force(keep_ratio):
    torch.manual_seed(0)
    model = Regressor()
    data = samples()
    names = [n for n, _ in model.named_parameters()]
    scores = brute_force_fisher(model, data, names)
    total = sum(s.numel() for s in scores)
    k = max(1, round(keep_ratio * total))
    expected = brute_force_topk(scores, k)
    mask = fisher_mask(model, data, keep_ratio)
    for n, e in zip(names, expected):
        got = mask.get(n, torch.empty(0, dtype=torch.int32))
        assert torch.equal(got.long(), e), n
        assert got.dtype == torch.int32
    assert sum(m.numel() for m in mask.values()) == k


def test_fisher_mask_per_layer_dense_head_and_include():
    torch.manual_seed(0)
    model = Regressor()
    data = samples()
    scores = brute_force_fisher(model, data, ["body.weight", "body.bias"])
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.body.bias.requires_grad_(False)  # flags must come back as they were
    before["body.bias"] = False
    mask = fisher_mask(
        model, data, 0.25, scope="per_layer", include=lambda n, p: p.dim() == 2 or n == "body.bias",
        dense_modules=("head",),
    )  # fmt: skip
    assert set(mask) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    assert mask["head.weight"] is None and mask["head.bias"] is None
    for n, s in zip(["body.weight", "body.bias"], scores):
        k = max(1, round(0.25 * s.numel()))
        assert torch.equal(mask[n].long(), brute_force_topk([s], k)[0]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_fisher_mask_uses_num_samples_only():
    torch.manual_seed(0)
    model = Regressor()
    data = samples(6)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fisher_mask(model, data, 0.1, num_samples=2).values(), fisher_mask(model, data[:2], 0.1).values())
    )


@pytest.mark.parametrize("keep_ratio", [0, 0.0, -0.1, 1.5, float("nan"), True])
def test_keep_ratio_outside_unit_interval_is_rejected(keep_ratio):
    with pytest.raises(ValueError, match=r"keep_ratio must be"):
        fisher_mask(Regressor(), samples(1), keep_ratio)
    with pytest.raises(ValueError, match=r"keep_ratio must be"):
        random_mask(Regressor(), keep_ratio)


def test_fisher_mask_other_errors():
    with pytest.raises(ValueError, match="scope must be"):
        fisher_mask(Regressor(), samples(1), 0.1, scope="layer")
    with pytest.raises(ValueError, match="at least one"):
        fisher_mask(Regressor(), [], 0.1)
    with pytest.raises(ValueError, match="no parameter is eligible"):
        fisher_mask(Regressor(), samples(1), 0.1, include=lambda n, p: False)


def tiny_bert_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def test_fisher_mask_on_a_transformers_classifier_keeps_the_head_dense():
    model = tiny_bert_classifier()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 50, (1, 8), generator=gen), "labels": torch.randint(0, 3, (1,), generator=gen)}
        for _ in range(4)
    ]
    mask = fisher_mask(model, batches, 0.01, dense_modules=("classifier",))
    validate_mask(model, mask)
    assert mask["classifier.weight"] is None and mask["classifier.bias"] is None
    eligible = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier."))
    assert sum(m.numel() for m in mask.values() if m is not None) == round(0.01 * eligible)


# ---- BitFit ----------------------------------------------------------------------------------------


def test_bitfit_all_selects_exactly_the_biases():
    model = tiny_bert_classifier()
    mask = bitfit_mask(model)
    expected = {n for n, _ in model.named_parameters() if n.split(".")[-1] == "bias"}
    assert set(mask) == expected and all(v is None for v in mask.values())
    assert any("LayerNorm.bias" in n for n in mask)  # BitFit's "all" includes LayerNorm biases


def test_bitfit_query_mlp2_selects_query_and_second_mlp_biases():
    model = tiny_bert_classifier()
    mask = bitfit_mask(model, "query_mlp2", dense_modules=("classifier",))
    expected = {f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.self.query.bias", "output.dense.bias")}
    assert set(mask) == expected | {"classifier.weight", "classifier.bias"}
    assert "bert.encoder.layer.0.attention.output.dense.bias" not in mask
    # BERT-base proportions: query + MLP-out biases are 2 x 768 per layer.
    density = mask_density(model, {n: None for n in expected})
    assert density == 2 * 2 * 16 / sum(p.numel() for p in model.parameters())


def test_bitfit_rejects_models_without_matches():
    with pytest.raises(ValueError, match="matched no parameter"):
        bitfit_mask(nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match="which must be"):
        bitfit_mask(nn.Linear(4, 4), "queries")


# ---- random masks ----------------------------------------------------------------------------------


def test_random_mask_density_like_and_seed():
    model = Regressor()
    mask = random_mask(model, keep_ratio=0.2, seed=3)
    validate_mask(model, mask)
    total = sum(p.numel() for p in model.parameters())
    assert sum(m.numel() for m in mask.values()) == round(0.2 * total)
    assert all(torch.equal(a, b) for a, b in zip(mask.values(), random_mask(model, keep_ratio=0.2, seed=3).values()))
    fish = fisher_mask(model, samples(), 0.2, dense_modules=("head",))
    like = random_mask(model, like=fish, seed=1)
    assert set(like) == set(fish)
    for n in fish:
        if fish[n] is None:
            assert like[n] is None
        else:
            assert like[n].numel() == fish[n].numel() and like[n].dtype == torch.int32
    per_layer = random_mask(model, keep_ratio=0.5, scope="per_layer")
    for n, p in model.named_parameters():
        assert per_layer[n].numel() == max(1, round(0.5 * p.numel()))


@pytest.mark.parametrize("n,k", [(1000, 10), (1000, 700), (50, 50)])
def test_sampling_without_replacement_is_uniform(n, k):
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    draws = 400
    for _ in range(draws):
        s = sample_without_replacement(n, k, gen)
        assert s.numel() == k and bool((s[1:] > s[:-1]).all()) and int(s.min()) >= 0 and int(s.max()) < n
        counts[s] += 1
    p = k / n
    sigma = math.sqrt(draws * p * (1 - p)) + 1e-9
    assert float((counts - draws * p).abs().max()) <= 5 * sigma + 1e-6


# ---- save / load -----------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    model = Regressor()
    mask = random_mask(model, keep_ratio=0.3, dense_modules=("head",))
    path = str(tmp_path / "mask.safetensors")
    save_mask(mask, path)
    loaded = load_mask(path)
    assert set(loaded) == set(mask)
    for n in mask:
        assert (loaded[n] is None) == (mask[n] is None)
        if mask[n] is not None:
            assert torch.equal(loaded[n], mask[n]) and loaded[n].dtype == mask[n].dtype


def test_load_rejects_foreign_and_unsorted_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.tensor([1, 2])}, path)
    with pytest.raises(ValueError, match="not a fastpeft sparse mask"):
        load_mask(path)
    save_file({"a": torch.tensor([2, 1])}, path, metadata={"format": "fastpeft.sparse_mask.v1", "dense": "[]"})
    with pytest.raises(ValueError, match=r"mask\['a'\] must be sorted"):
        load_mask(path)


def test_validate_mask_names_the_bad_entry():
    model = Regressor()
    with pytest.raises(ValueError, match="does not have"):
        validate_mask(model, {"body.kernel": None})
    with pytest.raises(ValueError, match=r"mask\['body.bias'\] holds indices in \[0, 8\] but the tensor has 8"):
        validate_mask(model, {"body.bias": torch.tensor([0, 8])})
