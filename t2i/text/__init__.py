"""Text encoders: captions -> float16 token states (real tokens only) + pooled vectors."""

from t2i.text.encoder import EncodedBatch, TextEncoder, resolve_encoder_path, weights_digest
from t2i.text.tiny import build_tiny_encoder

__all__ = ["EncodedBatch", "TextEncoder", "build_tiny_encoder", "resolve_encoder_path", "weights_digest"]
