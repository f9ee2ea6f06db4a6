"""Distribution and alignment metrics on one set of image features.

- Fréchet distance (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium") and KID, the unbiased polynomial-kernel MMD^2 estimate averaged over
  random subsets, with its standard deviation over them (Bińkowski et al., 2018, "Demystifying MMD
  GANs"): torchmetrics' FrechetInceptionDistance and KernelInceptionDistance, fed the features we
  already computed through an identity feature module, so every metric reads the same features.
- k-NN precision and recall (Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): torchmetrics has none, so `precision_recall` below.
- Retrieval R@k of image -> its caption, and CLIP score (Hessel et al., 2021, "CLIPScore"; scaled
  by 100 and clipped at 0 per pair, as torchmetrics' CLIPScore scales it).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from t2i import storage
from t2i.errors import T2IError
from t2i.text import weights_digest
from t2i.text.encoder import quiet_transformers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@torch.no_grad()
def embed_all(fn, images: np.ndarray, batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """fn(uint8 [b, 3, H, W] on `device`) for uint8 [N, H, W, 3] images, in batches -> float64 [N, d] on CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).to(device)
        out.append(fn(x).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def local_model_dir(path: str, what: str) -> Path:
    """A local model directory (config.json and safetensors weights), or a one-line error naming the path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise T2IError(f"{what} {path}: no such directory (models are never downloaded; give a local path)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise T2IError(f"{what} {path}: not a model directory (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise T2IError(f"{what} {path}: no safetensors weights in the directory")
    return p


# Every metric below is built with sync_on_compute=False: torchmetrics otherwise gathers its state
# from all ranks whenever a process group exists, and a trainer's rank 0 scoring a checkpoint
# alone (t2i.train.evaluation) would wait forever for the others.


class Precomputed(nn.Module):
    """The identity, posing as torchmetrics' feature network: `update` is handed features, not images."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between Gaussians fitted to two feature sets [N, d] (torchmetrics, float64 statistics)."""
    if len(real) < 2 or len(fake) < 2:
        raise T2IError(f"Fréchet distance needs at least 2 real and 2 generated images (got {len(real)}, {len(fake)})")
    fid = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), sync_on_compute=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """(KID mean, its std over subsets, the subset size used): torchmetrics' unbiased estimate with the
    cubic polynomial kernel, over `subsets` random subsets of min(subset_size, N) images per set.
    The subsets come from a generator seeded with `seed`, so a score is reproducible."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise T2IError(f"KID needs at least 2 real and 2 generated images (got {len(real)}, {len(fake)})")
    with warnings.catch_warnings():  # that it keeps every feature in memory: so do we, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                      sync_on_compute=False)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws the subsets with torch.randperm
        mean, std = kid.compute()
    return float(mean), float(std), size


def knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk], x)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the row itself
    return torch.cat(out)


def inside_manifold(queries: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each query lies within some reference sample's k-NN ball."""
    out = []
    for s in range(0, len(queries), chunk):
        out.append((torch.cdist(queries[s:s + chunk], ref) <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its samples, each as wide as the distance to
    that sample's k-th nearest neighbour in its own set. Precision: the share of generated samples
    inside the real manifold (are they realistic?); recall: the share of real samples inside the
    generated manifold (is the real variety covered?).
    """
    if k < 1 or len(real) <= k or len(fake) <= k:
        raise T2IError(f"precision/recall with k={k} needs more than {k} real and generated images "
                       f"(got {len(real)}, {len(fake)})")
    real, fake = real.double(), fake.double()
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, target: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5)) -> dict:
    """{"r_at_K": share of images whose own caption (row `target` of text_emb) ranks in the top K by
    cosine}; embeddings are unit vectors. A tie with the right caption counts for it."""
    sims = image_emb @ text_emb.T
    own = sims.gather(1, target[:, None])
    rank = (sims > own).sum(dim=1)
    return {f"r_at_{k}": float((rank < k).double().mean()) for k in ks}


def scores(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3, kid_subsets: int = 100,
           kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FD, KID and precision/recall of two feature sets (the same feature network for both)."""
    kid_mean, kid_std, size = kernel_distance(real, fake, subsets=kid_subsets, subset_size=kid_subset_size,
                                              seed=seed)
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "kid_mean": kid_mean, "kid_std": kid_std,
            "kid_subsets": kid_subsets, "kid_subset_size": size, "precision": precision, "recall": recall,
            "k": k, "n_real": len(real), "n_fake": len(fake)}


# ----------------------------------------------------------------------------------------- images

def decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise T2IError(f"{where}: not a readable image ({type(e).__name__})") from None


def read_images(urls: list[str]) -> np.ndarray:
    """uint8 [N, H, W, 3] from image files of one size."""
    images = [decode_image(storage.read_bytes(u), storage.describe(u)) for u in urls]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise T2IError(f"images of several sizes ({', '.join(map(str, sorted(sizes)))}); expected one")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def read_folder(url: str) -> np.ndarray:
    """Every image file directly in a folder, by name, as uint8 [N, H, W, 3]."""
    urls = [u for u in storage.listdir(url) if u.lower().endswith(IMAGE_SUFFIXES)]
    if not urls:
        raise T2IError(f"{storage.describe(url)}: no images (.png, .jpg, .jpeg, .webp) there")
    return read_images(urls)



# ----------------------------------------------------------------------------------------- CLIP score

class ClipScorer:
    """CLIP score of (image, caption) pairs with a local transformers CLIP directory.

    torchmetrics' CLIPScore would do, but its 1.9 release reads `get_image_features` as a tensor,
    which transformers 5 no longer returns; the computation is three lines."""

    def __init__(self, path: str):
        where = local_model_dir(path, "CLIP model")
        from transformers import AutoModel, AutoProcessor  # ~2 s to import; only a CLIP score needs it

        with quiet_transformers():
            self.model = AutoModel.from_pretrained(where, local_files_only=True, use_safetensors=True).eval()
            self.processor = AutoProcessor.from_pretrained(where, local_files_only=True)
        if not hasattr(self.model, "get_text_features"):
            raise T2IError(f"CLIP model {path}: {type(self.model).__name__} is not a CLIP model (no text tower)")
        self.path, self.digest = str(where), "sha256:" + weights_digest(where)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str], batch_size: int = 64) -> float:
        total = 0.0
        for s in range(0, len(images), batch_size):
            inputs = self.processor(text=captions[s:s + batch_size], images=list(images[s:s + batch_size]),
                                    return_tensors="pt", padding=True, truncation=True)
            out = self.model(**inputs)  # image_embeds / text_embeds: the projected, normalised embeddings
            cos = (out.image_embeds * out.text_embeds).sum(-1) / (
                out.image_embeds.norm(dim=-1) * out.text_embeds.norm(dim=-1))
            total += float((100 * cos).clamp(min=0).sum())
        return total / max(1, len(images))


def clip_score(path: str | Path, images: np.ndarray, captions: list[str]) -> tuple[float, str]:
    """(CLIP score, the CLIP directory's digest)."""
    scorer = ClipScorer(str(path))
    return scorer(images, captions), scorer.digest
