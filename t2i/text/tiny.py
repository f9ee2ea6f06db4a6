"""Tiny random-init text encoders of each kind, built from a config, for tests and CI.

Nothing here downloads: the tokenizers are built from a small built-in word list with the
`tokenizers` library and wrapped in each architecture's own tokenizer class, so that
`AutoTokenizer` reloads them as that class (a tokenizer saved beside a config of another
architecture reloads as the wrong class in transformers 5; each model gets its own directory).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from t2i.errors import T2IError
from t2i.text.encoder import quiet_transformers

# transformers is imported inside the builders: it takes about 2 s, and `t2i.text` (which imports
# this module) is used by much that never builds an encoder.

KINDS = ("encoder", "t5", "decoder")

# Enough English for captions to tokenize into whole words most of the time; anything else falls
# back to characters (WordPiece/Unigram) or bytes (BPE), so no input is ever unencodable.
_WORDS = """
a an the of on in at to with and or but over under near beside behind above below between
is are was be has have this that it its one two three four small large big tiny huge round
red green blue yellow purple orange white black grey gray pink brown crimson dark light bright
circle square triangle disc ring star shape shapes background picture image photo drawing
dog cat car house tree sky sea water city street man woman child people field mountain flower
left right top bottom center middle corner edge side front back up down far close
""".split()

_CORPUS = [
    f"a {c} {s} on a {b} background"
    for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    for s in ("circle", "square", "triangle")
    for b in ("red", "blue", "white", "black")
    if c != b
] + [" ".join(_WORDS[i:i + 8]) for i in range(0, len(_WORDS), 8)]


def _bert_tokenizer():
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + _WORDS
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    return BertTokenizer(vocab=vocab, model_max_length=512)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # Unigram scores are log-probabilities: whole words beat their character spellings.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("▁" + w, -4.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _qwen2_tokenizer():
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>"],
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return Qwen2Tokenizer(vocab=trained["vocab"], merges=merges, model_max_length=512)


def build_tiny_encoder(kind: str, out_dir: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Build a tiny random-init encoder of `kind` and its tokenizer; save both to `out_dir`.

    "encoder": BERT (WordPiece); "t5": T5 encoder (Unigram); "decoder": Qwen2 causal LM (byte BPE),
    saved as a full `Qwen2ForCausalLM` like real LLM checkpoints. Weights are seeded, so the same
    arguments give the same files. Returns the directory.
    """
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2ForCausalLM, T5Config, T5EncoderModel

    if kind not in KINDS:
        raise T2IError(f"unknown text encoder kind {kind!r} (known: {', '.join(KINDS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden // 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "encoder":
            tok = _bert_tokenizer()
            model = BertModel(BertConfig(
                vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            ), add_pooling_layer=False)
        elif kind == "t5":
            tok = _t5_tokenizer()
            model = T5EncoderModel(T5Config(
                vocab_size=len(tok), d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=layers,
                num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
            ))
        else:
            tok = _qwen2_tokenizer()
            model = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ))
    with quiet_transformers():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out
