"""Writes ``tiny-bert/`` (a random-init 2-layer BERT classifier with its own WordPiece tokenizer,
``save_pretrained`` form) and ``reviews.tsv`` (LABEL<TAB>TEXT lines): a transformers model and
text data for the README's command-line path, made locally (nothing is downloaded)."""

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = ["good", "great", "fine", "nice", "happy", "bad", "awful", "poor", "sad", "ugly",
         "the", "a", "movie", "film", "plot", "was"]

if __name__ == "__main__":
    vocab = Path("tiny-bert-vocab.txt")
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained("tiny-bert")
    rng = random.Random(0)
    lines = [f"{i % 2}\t{rng.choice(['the', 'a'])} {rng.choice(['movie', 'film', 'plot'])} was "
             f"{rng.choice(WORDS[:5] if i % 2 else WORDS[5:10])}" for i in range(400)]
    Path("reviews.tsv").write_text("\n".join(lines) + "\n")
    print("wrote tiny-bert/ and reviews.tsv")
