"""Image feature networks for `t2i eval`: one trained here on the dataset's own pairs, or a local
Hugging Face CLIP / DINO directory. Every one is named by a digest, so a score says which features made it.

Ours (`t2i eval fit-features`): a small conv encoder (4 strided conv blocks, mean pooling, a linear
projection to the text embedding's width) trained contrastively against the frozen pooled text
vectors the embedded dataset already holds. Its pooled trunk activations are the features for
FD/KID/precision/recall (as Inception's pool3 is for FID); its projection, compared by cosine with the
dataset's pooled caption vectors, gives retrieval R@k.

Caption matching alone makes features blind to image quality: measured on 1,285 icons, pixel noise
scored an FD of 0.96 against a real-vs-real floor of 0.80, and icons blurred to 8x8 scored 0.78.
Heusel et al. (2017, Fig. 1) accept a feature space for FID when the distance grows steadily with
added noise and blur. So the trunk also learns to tell those apart: a training-only head regresses
how much Gaussian noise and how much blur a training image was given (`degradation_loss`). With it,
pixel noise scored 12.3 and the 8x8 blur 5.2, and the floor did not move (0.72). It is saved as a directory:

  DIR/features.safetensors   the weights (safetensors, never pickle)
  DIR/card.json              config, dataset URL + digest, text encoder spec, training recipe and
                             steps, train-set R@1/R@5, the weights' sha256; written last

and its digest is `sha256:` + the weights file's sha256, checked whenever it is loaded.

Standard FID's Inception-v3 is not offered: see `open_features`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from t2i import storage
from t2i.data.embedded import load_embedded
from t2i.errors import ConfigError, IntegrityError, T2IError
from t2i.eval.metrics import embed_all, local_model_dir, retrieval_recall
from t2i.runtime import setup_runtime
from t2i.text import weights_digest
from t2i.text.encoder import quiet_transformers

log = logging.getLogger("t2i.eval")

FORMAT = "t2i-image-features"
VERSION = 1
CARD, WEIGHTS = "card.json", "features.safetensors"
WIDTHS = (32, 64, 128, 256)
KINDS = ("t2i", "clip", "dino", "inception")
NO_INCEPTION = ("standard FID's Inception-v3 (pytorch-fid / torch-fidelity weights) runs only through torch-fidelity, "
                "which requires torchvision: it has no CPU build here and would pull a CUDA torch into every install; "
                "use our own features (`t2i eval fit-features`) or a local clip:DIR / dino:DIR")


# ----------------------------------------------------------------------------------------- ours

class ImageEncoder(nn.Module):
    """uint8 images [B, 3, H, W] -> pooled conv features [B, widths[-1]] (`forward`, what torchmetrics
    calls) and unit-length embeddings in the text vectors' space (`embed_images`).

    GroupNorm, not BatchNorm: an image's features must not depend on what else is in its batch.
    Images of another size are resized to the training resolution (bilinear, antialiased).
    """

    def __init__(self, resolution: int, text_dim: int, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            groups = math.gcd(8, w)
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.GroupNorm(groups, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(groups, w), nn.SiLU()]
            c_in = w
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, text_dim)
        # CLIP's learned temperature, started at 1/0.07 (Radford et al., 2021).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Pooled sentence vectors share a large common direction (random-init encoders especially):
        # subtracting the training mean before the cosine leaves what tells captions apart.
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.resolution = resolution
        self.num_features = c_in  # torchmetrics reads the feature width from here

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.trunk(x).mean(dim=(2, 3))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self(images)), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled.float() - self.text_mean, dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor, logit_scale: torch.Tensor):
    """Symmetric InfoNCE (van den Oord et al., 2018) as CLIP trains it (Radford et al., 2021): each
    image against every caption of the batch and each caption against every image.

    Rows with the same caption are all positives for each other (the target spreads evenly over
    them): a dataset with repeated captions would otherwise be pushed to tell exact matches apart.
    """
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T  # CLIP clamps the scale at 100
    same = (groups[:, None] == groups[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Per-image separable Gaussian blur of x [B, C, H, W] with std `sigma` [B] in pixels (reflect padding)."""
    b, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, 2r+1]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(images: torch.Tensor, gen: torch.Generator, max_sigma: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, H, W] -> (uint8 degraded copies, targets [B, 2]). The first half gets Gaussian noise,
    x_t = (1 - t) x + t eps with t ~ U(0, 1) (the flow's own corruption); the second half a Gaussian blur of
    std U(0, max_sigma) px. Targets are (t, sigma / max_sigma), zero for the operation not applied."""
    x = images.float() / 127.5 - 1.0
    b, half = len(x), len(x) // 2
    level = torch.rand(b, 2, generator=gen).to(x.device)
    level[half:, 0] = 0.0
    level[:half, 1] = 0.0
    t = level[:half, 0, None, None, None]
    noise = torch.randn(x[:half].shape, generator=gen).to(x.device)
    out = torch.cat([(1 - t) * x[:half] + t * noise, gaussian_blur(x[half:], level[half:, 1] * max_sigma)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), level


def degradation_loss(model: "ImageEncoder", head: nn.Module, images: torch.Tensor, gen: torch.Generator):
    """MSE of the predicted (noise, blur) levels of clean images (target 0) and degraded copies: it makes
    the pooled features, which FD and KID read, change steadily with noise and blur (see the module docstring)."""
    bad, level = degrade(images, gen)
    pred = head(model(torch.cat([images, bad])))
    return F.mse_loss(pred, torch.cat([torch.zeros_like(level), level]))


def caption_groups(captions: list[str]) -> tuple[list[str], np.ndarray]:
    """(unique captions in first-seen order, index of each row's caption among them)."""
    index: dict[str, int] = {}
    ids = np.fromiter((index.setdefault(c, len(index)) for c in captions), np.int64, count=len(captions))
    return list(index), ids


def unique_text(model: ImageEncoder, captions: list[str], pooled: np.ndarray):
    """(unit caption vectors [U, D] of the unique captions, each row's index among them)."""
    _, ids = caption_groups(captions)
    first = np.unique(ids, return_index=True)[1]
    with torch.no_grad():
        text = model.embed_text(torch.from_numpy(np.asarray(pooled[first], np.float32)))
    return text, ids


def fit_features(data: str, out: str, *, steps: int = 1000, batch_size: int = 128, lr: float = 2e-3,
                 widths: tuple[int, ...] = WIDTHS, seed: int = 0, device: str = "auto", overwrite: bool = False,
                 degradation: float = 1.0, log_every: int = 100) -> dict:
    """Train our image encoder on the training rows of the embedded dataset at `data`; write it to
    `out` (weights, then card.json) and return the card. `degradation` weighs `degradation_loss`
    against the contrastive loss (0: captions only)."""
    if steps < 1 or batch_size < 2:
        raise ConfigError(f"fit-features: --steps must be >= 1 and --batch-size >= 2 (got {steps}, {batch_size})")
    if storage.exists(storage.url_join(out, CARD)) and not overwrite:
        raise T2IError(f"{storage.describe(out)} already holds a feature model; pass --overwrite to replace it")
    emb = load_embedded(data)  # load_embedded's default split: the training rows
    n = len(emb)
    if n < 2:
        raise T2IError(f"{storage.describe(data)}: {n} training rows; fit-features needs at least 2")
    rt = setup_runtime(device)
    res, dim = int(emb.images.shape[1]), int(emb.pooled.shape[1])
    images = torch.from_numpy(np.ascontiguousarray(emb.images)).permute(0, 3, 1, 2)  # uint8, a view
    _, ids = caption_groups(emb.captions)
    groups = torch.from_numpy(ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageEncoder(res, dim, tuple(widths))
        head = nn.Linear(model.num_features, 2)  # training only: not saved
    model.text_mean.copy_(torch.from_numpy(emb.pooled.astype(np.float32)).mean(0))
    text = model.embed_text(torch.from_numpy(np.asarray(emb.pooled, np.float32)))  # frozen: computed once
    model.to(rt.device)
    head.to(rt.device)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    order, pos, losses, start = torch.randperm(n, generator=gen), 0, [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if pos + b > n:  # a new epoch: every row once per epoch, in a fresh order
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + b]
        pos += b
        batch = images[idx].to(rt.device)
        loss = contrastive_loss(model.embed_images(batch), text[idx].to(rt.device), groups[idx].to(rt.device),
                                model.logit_scale)
        if degradation:
            loss = loss + degradation * degradation_loss(model, head, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps):
            log.info("fit-features: step %d/%d loss %.4f (%.1f s)", step, steps, np.mean(losses[-log_every:]),
                     time.perf_counter() - start)
    seconds = time.perf_counter() - start
    model.eval().cpu()
    recall = train_recall(model, emb, seed=seed)
    return save_features(out, model, {
        "dataset": {"url": storage.describe(data), "digest": emb.manifest.get("digest"), "split": "train", "rows": n},
        "encoder": emb.manifest.get("encoder"),
        "train": {"steps": steps, "batch_size": b, "lr": lr, "seed": seed, "loss": "symmetric InfoNCE (CLIP)"
                  + (f" + {degradation:g} x noise/blur level MSE" if degradation else ""), "degradation": degradation,
                  "final_loss": float(np.mean(losses[-max(1, min(50, steps)):])), "seconds": round(seconds, 2),
                  "device": str(rt.device)},
        "metrics": recall,
    })


def train_recall(model: ImageEncoder, emb, seed: int = 0, rows: int = 2000) -> dict:
    """R@1/R@5 of image -> its caption among the unique training captions, on up to `rows` training rows."""
    text, ids = unique_text(model, emb.captions, emb.pooled)
    pick = np.random.default_rng(seed).permutation(len(emb))[:rows]
    pick.sort()
    img = embed_all(model.embed_images, emb.images[pick])
    r = retrieval_recall(img, text.double(), torch.from_numpy(ids[pick]))
    return {"train_r_at_1": r["r_at_1"], "train_r_at_5": r["r_at_5"], "train_rows_scored": len(pick),
            "captions": len(text), "chance_r_at_5": min(1.0, 5 / len(text))}


def save_features(out: str, model: ImageEncoder, extra: dict) -> dict:
    """Weights first, then the card (a directory without card.json is an unfinished run)."""
    weights = save_safetensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                               metadata={"format": FORMAT})
    sha = hashlib.sha256(weights).hexdigest()
    storage.write_bytes(storage.url_join(out, WEIGHTS), weights)
    card = {
        "format": FORMAT, "version": VERSION, "kind": "t2i",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"resolution": model.resolution, "text_dim": model.proj.out_features,
                   "widths": [m.out_channels for m in model.trunk if isinstance(m, nn.Conv2d)][::2]},
        "features": {"dim": model.num_features, "layer": "mean-pooled last conv block",
                     "embedding": "unit proj(features) vs unit (pooled text - text_mean), cosine"},
        **extra,
        "weights": {"file": WEIGHTS, "sha256": sha, "bytes": len(weights)},
        "digest": "sha256:" + sha,
    }
    storage.write_bytes(storage.url_join(out, CARD), (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return card


def load_features(url: str) -> tuple[ImageEncoder, dict]:
    """(our encoder in eval mode, its card) from a fit-features directory; the weights must match the card."""
    try:
        card = json.loads(storage.read_bytes(storage.url_join(url, CARD)))
    except ValueError:
        raise IntegrityError(f"{storage.describe(storage.url_join(url, CARD))}: not valid JSON") from None
    if card.get("format") != FORMAT or card.get("version") != VERSION:
        raise T2IError(f"{storage.describe(url)}: not a t2i feature model (card format {card.get('format')!r} "
                       f"version {card.get('version')!r})")
    wurl = storage.url_join(url, card["weights"]["file"])
    if not storage.exists(wurl):
        raise T2IError(f"feature model weights {storage.describe(wurl)}: no such file")
    data = storage.read_bytes(wurl)
    sha = hashlib.sha256(data).hexdigest()
    if sha != card["weights"]["sha256"]:
        raise IntegrityError(f"{storage.describe(wurl)}: sha256 {sha[:16]}... does not match its card "
                             f"({card['weights']['sha256'][:16]}...): the file was modified or damaged")
    cfg = card["config"]
    model = ImageEncoder(int(cfg["resolution"]), int(cfg["text_dim"]), tuple(cfg["widths"]))
    model.load_state_dict(load_safetensors(data), strict=True)
    return model.eval(), card


# ------------------------------------------------------------------------------------ local HF models

class HFImageFeatures(nn.Module):
    """uint8 images [B, 3, H, W] -> a local Hugging Face vision model's image vector: CLIP's projected
    image embedding (`get_image_features`), else the pooled output (DINO/ViT: the normalised CLS token).

    Preprocessing is the directory's own image processor (PIL-based here: transformers' fast
    processors need torchvision)."""

    def __init__(self, path: Path):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel  # ~2 s to import; only this path needs it

        with quiet_transformers():
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        cfg = self.model.config
        self.clip = hasattr(self.model, "get_image_features")
        vision = getattr(cfg, "vision_config", cfg)
        self.num_features = int(cfg.projection_dim if self.clip else vision.hidden_size)

    def train(self, mode: bool = True) -> "HFImageFeatures":
        return super().train(False)  # a frozen reference network: no dropout, ever

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        arrays = list(images.permute(0, 2, 3, 1).cpu().numpy())
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"].to(images.device)
        if self.clip:
            out = self.model.get_image_features(pixel_values=pixels)
            # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]



# ----------------------------------------------------------------------------------------- opening

@dataclasses.dataclass
class Features:
    """A feature network ready to run, and what names it in results."""

    kind: str  # "t2i", "clip" or "dino"
    path: str
    digest: str
    net: nn.Module  # uint8 [B, 3, H, W] -> float [B, dim]
    card: dict | None = None  # ours only

    @property
    def dim(self) -> int:
        return int(self.net.num_features)

    def describe(self) -> dict:
        out = {"kind": self.kind, "path": self.path, "digest": self.digest, "dim": self.dim}
        if self.card:
            out["dataset_digest"] = self.card["dataset"]["digest"]
            out["train_steps"] = self.card["train"]["steps"]
        return out


def open_features(spec: str) -> Features:
    """`--features`: a fit-features directory (local or s3://), `clip:DIR`, `dino:DIR`, or a local
    Hugging Face directory whose config says which. `inception:PATH` is refused (NO_INCEPTION).
    A missing path is a one-line error naming it; nothing is ever downloaded."""
    head, sep, rest = spec.partition(":")
    kind, path = (head, rest) if sep and head in KINDS else ("", spec)
    if not path:
        raise ConfigError(f"--features {spec!r}: give a path after '{head}:'")
    if kind == "inception":
        if not os.path.exists(os.path.expanduser(path)):
            raise T2IError(f"inception weights {path}: no such file")
        raise T2IError(f"inception weights {path}: {NO_INCEPTION}")
    if kind in ("", "t2i") and ("://" in path or storage.exists(storage.url_join(path, CARD))):
        if not storage.exists(storage.url_join(path, CARD)):
            raise T2IError(f"feature model {storage.describe(path)}: no {CARD} there (train one with "
                           "`t2i eval fit-features --data URL --out DIR`)")
        net, card = load_features(path)
        return Features("t2i", storage.describe(path), card["digest"], net, card)
    if kind == "t2i":
        raise T2IError(f"feature model {path}: no {CARD} there")
    where = local_model_dir(path, "feature model")
    if not kind:
        model_type = json.loads((where / "config.json").read_text()).get("model_type", "")
        kind = "clip" if "clip" in model_type else "dino"
    return Features(kind, str(where), "sha256:" + weights_digest(where), HFImageFeatures(where))
