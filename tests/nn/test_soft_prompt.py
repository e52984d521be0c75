"""Soft prompts: prompt tuning and P-tuning's prompt encoder, against peft on a tiny Llama."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastpeft.nn import PromptEncoder, SoftPrompt
from fastpeft.nn.soft_prompt import repeat_to_length

peft = pytest.importorskip("peft")

P = 4


def tiny_llama(attn_implementation="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn_implementation)  # fmt: skip
    return LlamaForCausalLM(config)


def batch(B=2, S=6, vocab=64):
    ids = torch.randint(0, vocab, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def peft_config(kind, **extra):
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **extra)
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=24,
                                    encoder_reparameterization_type=kind.split("-")[1].upper(), **extra)  # fmt: skip


def ours_for(kind, embed_dim):
    if kind == "prompt_tuning":
        return SoftPrompt(P, embed_dim)
    return PromptEncoder(P, embed_dim, encoder_hidden_size=24, encoder_type=kind.split("-")[1])


KINDS = ["prompt_tuning", "p_tuning-mlp", "p_tuning-lstm"]


def paired(kind, attn_implementation="sdpa"):
    base = tiny_llama(attn_implementation)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kind))
    prompt = ours_for(kind, base.config.hidden_size)
    prompt.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names and shapes
    for p in base.parameters():
        p.requires_grad_(False)
    return base, theirs, prompt


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_same_logits_as_peft(kind, attn_implementation):
    base, theirs, prompt = paired(kind, attn_implementation)
    ids, mask, labels = batch()
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    got = base(**prompt.model_inputs(base, ids, mask, labels))
    assert got.logits.shape == want.logits.shape == (2, P + 6, 64)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_the_loss_like_peft(kind):
    base, theirs, prompt = paired(kind)
    ids, mask, labels = batch()
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD(prompt.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        pair = []
        for model, opt, run in ((theirs, opt_theirs, lambda: theirs(input_ids=ids, attention_mask=mask, labels=labels)),
                                (base, opt_ours, lambda: base(**prompt.model_inputs(base, ids, mask, labels)))):  # fmt: skip
            opt.zero_grad()
            loss = run().loss
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    for theirs_loss, ours_loss in losses:
        assert ours_loss == pytest.approx(theirs_loss, rel=1e-5)
    assert losses[-1][1] < losses[0][1]  # it trains


def test_prepend_mask_labels_and_bank_index():
    prompt = SoftPrompt(3, 8, num_prompts=2)
    embeds, mask, labels = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long), torch.arange(10).view(2, 5)
    out = prompt(embeds, mask, labels, prompt_index=torch.tensor([1, 0]))
    assert out["inputs_embeds"].shape == (2, 8, 8)
    torch.testing.assert_close(out["inputs_embeds"][0, :3], prompt.prompts()[1])
    torch.testing.assert_close(out["inputs_embeds"][1, :3], prompt.prompts()[0])
    torch.testing.assert_close(out["inputs_embeds"][:, 3:], embeds)
    assert out["attention_mask"].tolist()[0] == [1] * 8
    assert out["labels"][:, :3].eq(-100).all() and torch.equal(out["labels"][:, 3:], labels)
    with pytest.raises(ValueError, match=r"prompt_index must be in \[0, 2\)"):
        prompt(embeds, prompt_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"prompt_index must have shape \[B=2\]"):
        prompt(embeds, prompt_index=torch.tensor([0]))


def test_initialisations():
    words = torch.nn.Embedding(50, 6)
    vocab = SoftPrompt(5, 6, init="vocab", word_embeddings=words)
    for row in vocab.embedding.weight:  # every row is some word's embedding
        assert (words.weight - row).abs().sum(1).min() == 0
    text = SoftPrompt(7, 6, num_prompts=2, init="text", word_embeddings=words, init_token_ids=[3, 9, 4])
    ids = torch.tensor([3, 9, 4, 3, 9, 4, 3])  # peft's TEXT rule: repeat, then truncate
    assert torch.equal(text.prompts()[0], words.weight[ids]) and torch.equal(text.prompts()[1], words.weight[ids])
    assert repeat_to_length([1, 2, 3, 4], 2) == [1, 2]
    labels = SoftPrompt(3, 6, init="class_labels", word_embeddings=words, init_token_ids=[[1, 2], [7]])
    torch.testing.assert_close(labels.prompts()[0, 0], words.weight[[1, 2]].mean(0))
    torch.testing.assert_close(labels.prompts()[0, 1], words.weight[7])
    torch.testing.assert_close(labels.prompts()[0, 2], words.weight[[1, 2]].mean(0))
    with pytest.raises(ValueError, match="needs the model's word_embeddings"):
        SoftPrompt(3, 6, init="vocab")
    with pytest.raises(ValueError, match="init must be"):
        SoftPrompt(3, 6, init="bogus", word_embeddings=words)


def test_prompt_encoder_bank_shares_the_encoder():
    enc = PromptEncoder(3, 8, encoder_type="lstm", num_prompts=2)
    prompts = enc.prompts()
    assert prompts.shape == (2, 3, 8)
    # Each prompt is encoded on its own: set 1 alone gives the same result.
    single = PromptEncoder(3, 8, encoder_type="lstm")
    single.load_state_dict({**enc.state_dict(), "embedding.weight": enc.embedding.weight[3:]})
    torch.testing.assert_close(single.prompts()[0], prompts[1])
    with pytest.raises(ValueError, match="encoder_type must be"):
        PromptEncoder(3, 8, encoder_type="gru")


def test_generate_with_soft_prompt_matches_peft():
    base, theirs, prompt = paired("prompt_tuning")
    ids = torch.randint(0, 64, (1, 5))
    want = theirs.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    got = base.generate(**prompt.model_inputs(base, ids, torch.ones_like(ids)), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want[:, -4:])
