"""A BERT encoder (BERT, MiniLM, all-MiniLM-L6-v2, ...) in plain PyTorch, loaded from safetensors.

Why not transformers' `BertModel`: importing transformers' modeling stack takes 2-3 s on a small
machine (it pulls in torch._dynamo, torch.distributed.tensor and scipy), longer than a one-step
GAN needs to turn a prompt into a PNG. This module is the forward pass only (eval mode, absolute
positions, token type 0), operation for operation as `BertModel` runs it with SDPA attention;
`tests/test_text_encoder.py` checks that the two agree on real MiniLM weights. Anything this
module does not cover (`supports` says what) goes through transformers as before.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer as RustTokenizer
from torch import nn

ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def supports(path: Path, config: dict) -> bool:
    """Whether `path` is a BERT this module runs exactly: one safetensors file, a tokenizer.json,
    absolute positions, a known activation, no decoder or cross-attention."""
    return (config.get("model_type") == "bert"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and config.get("hidden_act", "gelu") in ACTIVATIONS
            and not config.get("is_decoder") and not config.get("add_cross_attention")
            and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file())


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, eps: float, act: str):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in, self.ffn_out = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (f(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # [B, H, L, D/H]
                   for f in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D)
        x = self.attn_norm(self.attn_out(a) + x)
        return self.ffn_norm(self.ffn_out(self.act(self.ffn_in(x))) + x)


class BertEncoder(nn.Module):
    """input_ids, attention_mask [B, L] -> an object with last_hidden_state [B, L, D] and, when
    asked, hidden_states (embedding output, then each layer's output), as transformers returns."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = types.SimpleNamespace(**config)
        c = self.config
        dim, eps = c.hidden_size, getattr(c, "layer_norm_eps", 1e-12)
        self.word = nn.Embedding(c.vocab_size, dim)
        self.position = nn.Embedding(c.max_position_embeddings, dim)
        self.token_type = nn.Embedding(getattr(c, "type_vocab_size", 2), dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(Layer(dim, c.num_attention_heads, c.intermediate_size, eps,
                                          getattr(c, "hidden_act", "gelu")) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False):
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device)
        x = self.word(input_ids) + self.token_type.weight[0] + self.position(pos)  # [B, L, D]
        x = self.norm(x)
        # No mask when nothing is padded (what transformers passes to SDPA then, too).
        keep = attention_mask.bool()
        mask = None if bool(keep.all()) else keep[:, None, None, :].expand(B, 1, L, L)  # [B, 1, L, L]
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return types.SimpleNamespace(last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None)


# transformers' parameter names -> ours, for one layer (prefix encoder.layer.N.) and the embeddings.
_LAYER_NAMES = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm",
}
_EMBED_NAMES = {"word_embeddings": "word", "position_embeddings": "position",
                "token_type_embeddings": "token_type", "LayerNorm": "norm"}


def _rename(name: str) -> str | None:
    """A checkpoint key (with or without a `bert.` prefix; old gamma/beta names too) -> ours, or None
    for parameters this encoder does not use (pooler, heads)."""
    name = name.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")
    parts = name.split(".")
    if parts[0] == "embeddings" and parts[1] in _EMBED_NAMES:
        return ".".join([_EMBED_NAMES[parts[1]], *parts[2:]])
    if parts[:2] == ["encoder", "layer"]:
        inner, leaf = ".".join(parts[3:-1]), parts[-1]
        if inner in _LAYER_NAMES:
            return f"layers.{parts[2]}.{_LAYER_NAMES[inner]}.{leaf}"
    return None


def load(path: Path, dtype: torch.dtype = torch.float32) -> BertEncoder:
    """The encoder at `path` (see `supports`) with its weights; raises ValueError naming a missing
    or misshapen tensor."""
    model = BertEncoder(read_config(path))
    ours = model.state_dict()
    weights = {}
    for key, tensor in load_file(path / "model.safetensors").items():
        name = _rename(key)
        if name in ours:
            if tensor.shape != ours[name].shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(ours[name].shape)}")
            weights[name] = tensor
    missing = sorted(set(ours) - set(weights))
    if missing:
        raise ValueError(f"model.safetensors has no {missing[0]} ({len(missing)} tensors missing)")
    model.load_state_dict(weights)
    return model.to(dtype)


class Tokenizer:
    """The model's tokenizer.json through the `tokenizers` library, called as transformers'
    fast tokenizer is here: texts -> {"input_ids": [[int, ...], ...]} (same ids, tested)."""

    def __init__(self, path: Path, config: dict):
        self._tok = RustTokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_token_id = config.get("pad_token_id", 0)
        self.eos_token_id = self.unk_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None) -> dict:
        if truncation:
            self._tok.enable_truncation(max_length)
        try:
            encoded = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
            return {"input_ids": [e.ids for e in encoded]}
        finally:
            self._tok.no_truncation()
