"""Tiny BERT models and a WordPiece tokenizer built from a small vocab file (no downloads)."""

import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

WORDS = ["the", "a", "movie", "film", "was", "it", "great", "good", "bad", "terrible", "awful", "fine", "okay",
         "plot", "actors", "boring", "fun", "loved", "hated", "story", ".", ",", "!", "?", "this", "is", "about",
         "sports", "food", "topic", "##s", "##ing", "un", "##believable"]  # fmt: skip
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS) + "\n")
    # transformers 5's BertTokenizer (the fast one) takes the vocabulary as a dict
    vocab = {w: i for i, w in enumerate(path.read_text().split("\n")[:-1])}
    return BertTokenizer(vocab=vocab)


def tiny_config(vocab_size, **kw):
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)  # fmt: skip


def tiny_mlm(tokenizer, seed=0, vocab_size=None):
    """A 2-layer BertForMaskedLM; ``vocab_size`` above the tokenizer's adds rows no text uses."""
    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_config(vocab_size or len(tokenizer)))
    with torch.no_grad():  # a non-zero decoder bias, so tests see it used
        model.cls.predictions.bias.normal_(0, 0.5)
    return model.eval()


def tiny_body(tokenizer, seed=0):
    torch.manual_seed(seed)
    return BertModel(tiny_config(len(tokenizer)), add_pooling_layer=False).eval()
