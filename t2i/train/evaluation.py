"""Metrics at checkpoints (`t2i train --eval-every K`) and which checkpoints to keep (`--keep-best`).

The driver picks a fixed evaluation set once: the first `eval_n` rows (by key) of the dataset's
held-out split (`t2i embed --holdout`), else of its training rows, with their real images and text
features. At each evaluated checkpoint rank 0 generates one image per row from the EMA weights
(seeds 0..n-1, so every checkpoint draws the same noise), embeds real and generated images with
the feature model (`--eval-features`: a `t2i eval fit-features` directory, or `clip:DIR` /
`dino:DIR`) and computes FD, KID, k-NN precision/recall and, with our own feature model, R@1/R@5
(`t2i.eval.metrics`). The results go into metrics.jsonl (`eval_fd`, ...) and the checkpoint's
metrics, hence the registry card, with the feature model's digest. The other ranks wait at the
checkpoint's barrier meanwhile: the set is small (64 rows by default) so that this stays short.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from t2i.data.batching import collate_features
from t2i.data.embedded import load_embedded, read_manifest
from t2i.errors import ConfigError
from t2i.eval.features import Features, open_features, unique_text
from t2i.eval.metrics import embed_all, retrieval_recall, scores
from t2i.sampling import generate

# Metric -> whether lower is better (Ray Train's checkpoint_score_order "min").
METRICS = {"fd": True, "kid": True, "precision": False, "recall": False, "r_at_1": False, "r_at_5": False}


@dataclasses.dataclass
class EvalSet:
    """The fixed rows every evaluated checkpoint is scored on (plain arrays: it travels to the workers)."""

    split: str
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # uint8 [n, R, R, 3], the real images
    tokens: list[np.ndarray]  # float16 [L_i, D] each
    pooled: np.ndarray  # float16 [n, D]
    targets: np.ndarray  # int [n]: each row's caption among `candidates`
    candidates: list[str]  # the split's distinct captions (retrieval's choices)
    candidate_pooled: np.ndarray  # float16 [len(candidates), D]


def check_options(eval_every: int, keep_best: str, features: str, checkpoint_every: int) -> None:
    """The flags' rules, named as the command line spells them (before any data is read)."""
    if keep_best and keep_best not in METRICS:
        raise ConfigError(f"--keep-best {keep_best!r}: expected one of {', '.join(METRICS)}")
    if (eval_every or keep_best) and not features:
        raise ConfigError("--eval-every / --keep-best need --eval-features (a `t2i eval fit-features` directory, "
                          "or clip:DIR / dino:DIR)")
    if eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0, got {eval_every}")
    if keep_best and eval_every and eval_every != checkpoint_every:
        raise ConfigError(f"--keep-best scores every checkpoint: --eval-every {eval_every} must equal "
                          f"--checkpoint-every {checkpoint_every} (or be left out)")
    if eval_every and checkpoint_every and eval_every % checkpoint_every:
        raise ConfigError(f"--eval-every {eval_every} must be a multiple of --checkpoint-every {checkpoint_every} "
                          "(metrics are computed at checkpoints)")


def eval_set(data: str, n: int) -> EvalSet:
    """The first `n` rows by key of the held-out split, else of the training rows."""
    split = "heldout" if "heldout" in read_manifest(data) else "train"
    emb = load_embedded(data, split=split)
    pick = np.arange(min(n, len(emb)))
    candidates = sorted(set(emb.captions))
    where = {c: i for i, c in enumerate(candidates)}
    first = {c: i for i, c in reversed(list(enumerate(emb.captions)))}
    return EvalSet(split, [emb.keys[i] for i in pick], [emb.captions[i] for i in pick], np.ascontiguousarray(
        emb.images[pick]), [np.array(emb.tokens[i]) for i in pick], np.array(emb.pooled[pick]),
        np.array([where[emb.captions[i]] for i in pick]), candidates,
        np.array(emb.pooled[[first[c] for c in candidates]]))


class CheckpointEval:
    """Rank 0's evaluator: the feature model loaded once, the real images' features computed once."""

    def __init__(self, features: str, rows: EvalSet, device: torch.device):
        self.features: Features = open_features(features)
        self.rows, self.device = rows, device
        self.real = embed_all(self.features.net, rows.images)

    @torch.no_grad()
    def __call__(self, net: torch.nn.Module, cfg: Any, batch_size: int = 64) -> dict:
        """eval_* metrics of the sampling network `net` on the evaluation set."""
        r, images = self.rows, []
        for s in range(0, len(r.keys), batch_size):
            tokens, mask, pooled = collate_features(r.tokens[s:s + batch_size], r.pooled[s:s + batch_size])
            ids = [f"eval-{i}" for i in range(s, min(s + batch_size, len(r.keys)))]
            images.append(generate(net, cfg, tokens.to(self.device), mask.to(self.device), pooled.to(self.device),
                                   list(range(s, s + len(ids))), ids).numpy())
        fake = np.concatenate(images)
        m = scores(self.real, embed_all(self.features.net, fake), kid_subsets=20, kid_subset_size=len(fake))
        out = {"fd": m["fd"], "kid": m["kid_mean"], "precision": m["precision"], "recall": m["recall"]}
        if self.features.kind == "t2i":  # retrieval needs our encoder's text side
            text, _ = unique_text(self.features.net, r.candidates, r.candidate_pooled)
            img = embed_all(self.features.net.embed_images, fake)
            out.update(retrieval_recall(img, text.double(), torch.from_numpy(r.targets)))
        return {f"eval_{k}": float(v) for k, v in out.items()}

    def describe(self) -> dict:
        return {"eval_features": self.features.describe(), "eval_split": self.rows.split, "eval_n": len(self.rows.keys)}


def best_steps(metric: str, keep: int, step_metrics: dict[int, dict]) -> set[int]:
    """The `keep` best checkpoint steps by eval_`metric` (ties: the later step)."""
    lower = METRICS[metric]
    scored = [(m[f"eval_{metric}"], step) for step, m in step_metrics.items() if f"eval_{metric}" in m]
    scored.sort(key=lambda x: (x[0] if lower else -x[0], -x[1]))
    return {step for _, step in scored[:keep]}
