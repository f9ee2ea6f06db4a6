"""Text encoders: tiny random models of each kind, and the real packaged MiniLM, all offline."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from t2i.config import EncoderSpec
from t2i.errors import T2IError
from t2i.text import EncodedBatch, TextEncoder, build_tiny_encoder, resolve_encoder_path

KINDS = ("encoder", "t5", "decoder")
CAPTIONS = [
    "a red circle on a blue background",
    "square",
    "a tiny purple triangle near the left edge of a large white picture with a dog and a zebra",
    "A Crimson Disc, beside 3 trees!",
    "",
]
MAX_TOKENS = 12


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return {k: TextEncoder(EncoderSpec(name=p, kind=k, max_tokens=MAX_TOKENS)) for k, p in tiny_encoders.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_match_tokenizer_and_no_padding_kept(encoders, kind):
    enc = encoders[kind]
    caps = CAPTIONS if kind != "decoder" else CAPTIONS[:-1]  # a decoder has nothing to encode for ""
    out = enc.encode(caps)
    tok = AutoTokenizer.from_pretrained(enc.path)  # transformers' count, whichever path encodes
    if kind == "decoder":
        # The tokenizer's own count of the caption's tokens; Qwen2 adds no BOS.
        full = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in caps]
        want = [min(n, MAX_TOKENS) for n in full]
    else:
        full = [len(tok(c)["input_ids"]) for c in caps]
        want = [sum(tok(c, truncation=True, max_length=MAX_TOKENS)["attention_mask"]) for c in caps]
    assert out.lengths.dtype == np.int32 and out.lengths.tolist() == want
    assert out.truncated.tolist() == [n > MAX_TOKENS for n in full]
    assert out.truncated.any() and not out.truncated.all()
    assert out.pooled.shape == (len(caps), 64) and out.pooled.dtype == np.float16
    for t, n in zip(out.tokens, want):
        assert t.dtype == np.float16 and t.shape == (n, 64)
        assert np.isfinite(t).all()
    # Pooled from the real tokens only: padding states would shift the mean / the last position.
    for t, p in zip(out.tokens, out.pooled):
        ref = t[-1] if kind == "decoder" else t.astype(np.float32).mean(0)
        np.testing.assert_allclose(p.astype(np.float32), ref.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_composition_does_not_change_a_caption(encoders, kind):
    enc = encoders[kind]
    caps = CAPTIONS[:4]
    batch = enc.encode(caps)  # padded to the longest caption
    for i, c in enumerate(caps):
        alone = enc.encode([c])
        assert alone.lengths[0] == batch.lengths[i]
        np.testing.assert_allclose(alone.tokens[0].astype(np.float32), batch.tokens[i].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(alone.pooled[0].astype(np.float32), batch.pooled[i].astype(np.float32), atol=2e-3)
    # Small batches (another grouping by length) give the same rows, in input order.
    small = TextEncoder(enc.spec, batch_size=2).encode(caps[::-1])
    for i, c in enumerate(caps[::-1]):
        j = caps.index(c)
        np.testing.assert_allclose(small.pooled[i].astype(np.float32), batch.pooled[j].astype(np.float32), atol=2e-3)


def test_decoder_prefix_dropped(tiny_encoders):
    prefix = "describe the picture: "
    plain = TextEncoder(EncoderSpec(name=tiny_encoders["decoder"], kind="decoder", max_tokens=64))
    with_prefix = TextEncoder(EncoderSpec(name=tiny_encoders["decoder"], kind="decoder", max_tokens=64, prefix=prefix))
    caps = ["a red circle", "a green square on a black background"]
    a, b = with_prefix.encode(caps), plain.encode([prefix + c for c in caps])
    c = plain.encode(caps)
    for i in range(len(caps)):
        n = a.lengths[i]
        assert b.lengths[i] > n  # the prefix's tokens were there, and are gone from `a`
        np.testing.assert_allclose(a.tokens[i].astype(np.float32), b.tokens[i][-n:].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(a.pooled[i].astype(np.float32), b.pooled[i].astype(np.float32), atol=2e-3)
        # ... and the caption's states did see the instruction.
        assert np.abs(a.pooled[i].astype(np.float32) - c.pooled[i].astype(np.float32)).max() > 1e-2
    assert with_prefix.spec.prefix == prefix


def test_decoder_hidden_layer_and_spec(tiny_encoders):
    path = tiny_encoders["decoder"]
    last = TextEncoder(EncoderSpec(name=path, kind="decoder"))
    mid = TextEncoder(EncoderSpec(name=path, kind="decoder", hidden_layer=-2))
    a, b = last.encode(["a red circle"]), mid.encode(["a red circle"])
    assert a.lengths[0] == b.lengths[0]
    assert np.abs(a.tokens[0].astype(np.float32) - b.tokens[0].astype(np.float32)).max() > 1e-2
    spec = last.spec
    assert spec.dim == 64 and len(spec.revision) == 16 and int(spec.revision, 16) >= 0
    assert spec.revision == mid.spec.revision  # same files, same revision
    with pytest.raises(T2IError, match="hidden_layer 5"):
        TextEncoder(EncoderSpec(name=path, kind="decoder", hidden_layer=5))


def test_tiny_encoders_reload_as_their_own_classes(tiny_encoders, tmp_path):
    # BERTs run through t2i.text.bert (checked against BertModel below), the rest through transformers.
    classes = {k: (type(e.tokenizer).__name__, type(e.model).__name__) for k, e in
               ((k, TextEncoder(EncoderSpec(name=p, kind=k))) for k, p in tiny_encoders.items())}
    assert type(AutoTokenizer.from_pretrained(tiny_encoders["encoder"])).__name__ == "BertTokenizer"
    assert classes == {
        "encoder": ("Tokenizer", "BertEncoder"),
        "t5": ("T5Tokenizer", "T5EncoderModel"),
        "decoder": ("Qwen2Tokenizer", "Qwen2Model"),
    }
    # Seeded: rebuilding gives the same weights, hence the same revision.
    again = build_tiny_encoder("t5", tmp_path / "t5")
    revs = {TextEncoder(EncoderSpec(name=str(p), kind="t5")).spec.revision for p in (again, tiny_encoders["t5"])}
    assert len(revs) == 1


def test_padded_and_empty(encoders):
    out = encoders["encoder"].encode(CAPTIONS[:2])
    x, mask = out.padded()
    assert x.shape == (2, out.lengths.max(), 64) and mask.sum(1).tolist() == out.lengths.tolist()
    assert not x[~mask].any()
    empty = encoders["encoder"].encode([])
    assert isinstance(empty, EncodedBatch) and len(empty) == 0 and empty.pooled.shape == (0, 64)


def test_bad_paths_and_kinds_name_the_culprit(tmp_path, tiny_encoders):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(T2IError, match=str(missing)):
        TextEncoder(EncoderSpec(name=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(T2IError, match=f"{empty}.*config.json"):
        resolve_encoder_path(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(T2IError, match=str(broken)):
        TextEncoder(EncoderSpec(name=str(broken)))
    with pytest.raises(T2IError, match="not-a-model/anywhere"):
        TextEncoder(EncoderSpec(name="not-a-model/anywhere"))
    with pytest.raises(T2IError, match="unknown kind 'gpt'"):
        TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="gpt"))
    with pytest.raises(T2IError, match="unknown text encoder kind"):
        build_tiny_encoder("gpt", tmp_path / "gpt")


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(EncoderSpec())  # the default spec: the packaged all-MiniLM-L6-v2


def test_minilm_offline_default(minilm):
    assert resolve_encoder_path("minilm") == resolve_encoder_path("all-MiniLM-L6-v2")
    assert minilm.spec.dim == 384 and minilm.spec.name == "all-MiniLM-L6-v2" and len(minilm.spec.revision) == 16
    out = minilm.encode(["a red circle", "a crimson circle", "a red round disc", "a crimson round disc",
                         "a blue square"])
    red, crimson, disc, crimson_disc, blue_square = out.pooled
    # Synonyms beat a different colour and shape ...
    assert _cos(red, crimson) > _cos(red, blue_square) + 0.1
    assert _cos(red, disc) > _cos(red, blue_square) + 0.1
    assert _cos(crimson_disc, disc) > _cos(crimson_disc, blue_square) + 0.3
    # ... but for "a red circle" vs "a crimson round disc" this model (with its own mean pooling,
    # checked against sentence-transformers below) scores 0.399 against 0.432 for "a blue square".
    assert _cos(red, crimson_disc) == pytest.approx(0.399, abs=0.01)


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(resolve_encoder_path("minilm")), device="cpu")
    caps = ["a red circle on a blue background", "a crimson round disc"]
    want = ref.encode(caps, normalize_embeddings=True)
    got = minilm.encode(caps).pooled.astype(np.float32)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu(minilm):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = TextEncoder(EncoderSpec(), device="cuda")
    caps = ["a red circle on a blue background", "a tiny purple triangle", "a crimson round disc"]
    a, b = minilm.encode(caps), gpu.encode(caps)
    assert a.lengths.tolist() == b.lengths.tolist() and gpu.spec == minilm.spec
    for p, q in zip(a.pooled, b.pooled):
        assert _cos(p, q) > 0.99


@pytest.mark.parametrize("which", ["minilm", "tiny"])
def test_bert_path_equals_transformers(which, tiny_encoders):
    """t2i.text.bert (no transformers import) gives transformers' BertModel's ids and states exactly,
    every layer, on real MiniLM weights and on the tiny BERT, padded batches and truncation included."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from t2i.text import bert

    path = resolve_encoder_path("minilm") if which == "minilm" else resolve_encoder_path(tiny_encoders["encoder"])
    assert bert.supports(path, bert.read_config(path))
    ours_tok, ref_tok = bert.Tokenizer(path, bert.read_config(path)), AutoTokenizer.from_pretrained(path)
    caps = CAPTIONS + ["ünïcödé café 東京 🎉", "x " * 600]
    for kw in ({}, {"add_special_tokens": False}, {"truncation": True, "max_length": MAX_TOKENS}):
        assert ours_tok(caps, **kw)["input_ids"] == ref_tok(caps, **kw)["input_ids"], kw
    ids = [x[:40] for x in ref_tok(caps)["input_ids"]]
    input_ids = torch.zeros(len(ids), 40, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    ref, ours = AutoModel.from_pretrained(path).eval(), bert.load(path).eval()
    with torch.inference_mode():
        for b in (slice(None), slice(0, 1)):  # padded batch; one caption, nothing padded
            n = int(mask[b].sum(1).max())
            want = ref(input_ids=input_ids[b, :n], attention_mask=mask[b, :n], output_hidden_states=True)
            got = ours(input_ids[b, :n], mask[b, :n], output_hidden_states=True)
            valid = mask[b, :n].bool()
            assert len(got.hidden_states) == len(want.hidden_states) == ref.config.num_hidden_layers + 1
            for w, g in zip(want.hidden_states, got.hidden_states):
                assert torch.equal(w[valid], g[valid])
    assert isinstance(TextEncoder(EncoderSpec(name=str(path))).model, bert.BertEncoder)


def test_bert_missing_tensor_is_named(tmp_path, tiny_encoders):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(tiny_encoders["encoder"], path)
    weights = load_file(path / "model.safetensors")
    del weights[next(k for k in weights if k.endswith("attention.self.query.weight"))]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(T2IError, match=r"broken: cannot load .*has no layers\.0\.query\.weight"):
        TextEncoder(EncoderSpec(name=str(path)))
