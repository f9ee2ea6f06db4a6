"""Single-process training over in-memory arrays, for either family (`python -m t2i.train_local`).

The same `train_step` as the Ray Train workers, without Ray: what the quality benchmark and
quick experiments use. Writes into `--out`:
  metrics.jsonl           one JSON line per log window (step, losses, img/s, lr, memory)
  samples/step_NNNNNN.png contact sheets of the EMA model on fixed prompts
  ema.safetensors         final EMA weights of the sampling network
  config.json             {"format", "family", "model", "train", "encoder"} (as in checkpoints)
  summary.json            steps run, seconds, final metrics
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

from t2i import storage
from t2i.config import TrainConfig, replace, to_dict
from t2i.data.batching import collate_features, sample_seeds
from t2i.distributed import to_device
from t2i.errors import ConfigError, T2IError
from t2i.runtime import memory_mb, seed_from, setup_runtime
from t2i.sampling import generate
from t2i.train_step import TrainState, make_state, metric_floats, train_step

log = logging.getLogger("t2i.train_local")


@dataclasses.dataclass
class ArrayData:
    """Training samples in memory: images uint8 [N,R,R,3], per-sample token states [L_i,D]
    (real tokens only), pooled [N,D], and unique keys (they seed each sample's noise)."""

    images: np.ndarray
    tokens: Sequence[Any]
    pooled: np.ndarray
    keys: Sequence[str]
    captions: Sequence[str] | None = None

    def __post_init__(self):
        n = len(self.images)
        if not (len(self.tokens) == len(self.pooled) == len(self.keys) == n):
            raise ValueError(f"ArrayData: {n} images, {len(self.tokens)} token rows, {len(self.pooled)} pooled, "
                             f"{len(self.keys)} keys: they must match")
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"ArrayData: images must be uint8 [N,R,R,3], got {self.images.dtype} {self.images.shape}")
        if len(set(self.keys)) != n:
            raise ValueError("ArrayData: keys must be unique (they seed each sample's noise)")

    @classmethod
    def from_encoded(cls, images: np.ndarray, encoded, keys: Sequence[str], captions=None) -> "ArrayData":
        """From images and an EncodedBatch-like object (.tokens list of [L_i,D], .pooled [N,D])."""
        return cls(images, list(encoded.tokens), np.asarray(encoded.pooled), list(keys), captions)

    def batch(self, idx: np.ndarray, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
        tokens, mask, pooled = collate_features([self.tokens[i] for i in idx], self.pooled[idx])
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[idx])),
            "tokens": tokens, "mask": mask, "pooled": pooled,
            "seed": sample_seeds([self.keys[i] for i in idx], seed),
        }
        return to_device(out, device)


@dataclasses.dataclass
class EvalPrompts:
    """Fixed prompts for sample grids: one grid row per caption, `per_prompt` seeds each."""

    captions: list[str]
    tokens: Sequence[Any]
    pooled: np.ndarray
    per_prompt: int = 4

    def rows(self):
        n = self.per_prompt
        idx = [i for i in range(len(self.captions)) for _ in range(n)]
        tokens, mask, pooled = collate_features([self.tokens[i] for i in idx], self.pooled[idx])
        ids = [f"eval-{i}-{j}" for i in range(len(self.captions)) for j in range(n)]
        return tokens, mask, pooled, [0] * len(ids), ids


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(seed_from(seed, "epoch", epoch)).permutation(n)


def index_stream(n: int, batch_size: int, seed: int):
    """Batches of indices: a fresh permutation each epoch, batches may span epochs (no drop)."""
    epoch, pos, order = 0, 0, epoch_order(n, seed, 0)
    while True:
        take = []
        while len(take) < batch_size:
            k = min(batch_size - len(take), n - pos)
            take.extend(order[pos:pos + k])
            pos += k
            if pos == n:
                epoch, pos = epoch + 1, 0
                order = epoch_order(n, seed, epoch)
        yield np.asarray(take)


def write_grid(state: TrainState, prompts: EvalPrompts, url: str) -> None:
    from t2i.eval import write_contact_sheet

    tokens, mask, pooled, seeds, ids = prompts.rows()
    dev = state.runtime.device
    images = generate(state.ema, state.model_cfg, tokens.to(dev), mask.to(dev), pooled.to(dev), seeds, ids)
    write_contact_sheet(url, images.numpy(), ncol=prompts.per_prompt, scale=2, row_labels=prompts.captions)


def save_final(state: TrainState, out: str, encoder_spec: Any = None) -> None:
    """EMA weights + config.json in the checkpoint layout's names (loadable for sampling)."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.ema.state_dict().items()}
    storage.write_bytes(storage.url_join(out, "ema.safetensors"), st_save(tensors, {"format": "1"}))
    enc = to_dict(encoder_spec) if dataclasses.is_dataclass(encoder_spec) else encoder_spec
    config = {"format": 1, "family": state.family, "model": to_dict(state.model_cfg),
              "train": to_dict(state.train_cfg), "encoder": enc}
    storage.write_bytes(storage.url_join(out, "config.json"), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def train_local(model_cfg: Any, train_cfg: TrainConfig, data: ArrayData, out: str, *,
                prompts: EvalPrompts | None = None, max_seconds: float | None = None, device: str = "auto",
                threads: int | None = None, encoder_spec: Any = None) -> tuple[TrainState, dict]:
    """Train for train_cfg.steps (or until max_seconds) and write logs, grids and EMA weights.

    Returns (state, summary). Seeds: the model init from train_cfg.seed; batch order from
    (seed, epoch); each sample's noise from (seed, its key, step).
    """
    if model_cfg.resolution != data.images.shape[1]:
        raise ConfigError(f"model resolution {model_cfg.resolution} != data resolution {data.images.shape[1]}")
    rt = setup_runtime(device, threads)
    state = make_state(model_cfg, train_cfg, rt)
    storage.write_bytes(storage.url_join(out, "metrics.jsonl"), b"")
    batches = index_stream(len(data.images), train_cfg.batch_size, train_cfg.seed)
    window: dict[str, float] = {}
    win_n, win_t, win_imgs = 0, time.perf_counter(), 0
    t0 = time.perf_counter()
    lines: list[str] = []
    stopped_early = False
    last: dict[str, float] = {}
    while state.step < train_cfg.steps:
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            stopped_early = True
            break
        batch = data.batch(next(batches), train_cfg.seed, rt.device)
        metrics = train_step(state, batch)
        for k, v in metrics.items():
            window[k] = window[k] + v if k in window else v
        win_n += 1
        win_imgs += len(batch["seed"])
        if state.step % train_cfg.log_every == 0 or state.step == train_cfg.steps:
            last = {k: v / win_n for k, v in metric_floats(window).items()}  # waits for the device
            dt = time.perf_counter() - win_t
            rec = {"step": state.step, **last, "img_per_s": win_imgs / dt, "mem_mb": memory_mb(rt.device),
                   "elapsed_s": time.perf_counter() - t0}
            lines.append(json.dumps(rec))
            _append(out, lines)
            log.info("step %d/%d %s img/s %.1f mem %.0fMB %.0fs", state.step, train_cfg.steps,
                     " ".join(f"{k} {v:.4g}" for k, v in last.items()), rec["img_per_s"], rec["mem_mb"],
                     rec["elapsed_s"])
            window, win_n, win_t, win_imgs = {}, 0, time.perf_counter(), 0
        if prompts is not None and train_cfg.sample_every and state.step % train_cfg.sample_every == 0:
            write_grid(state, prompts, storage.url_join(out, "samples", f"step_{state.step:06d}.png"))
    train_s = time.perf_counter() - t0
    if prompts is not None:
        write_grid(state, prompts, storage.url_join(out, "samples", f"step_{state.step:06d}.png"))
    save_final(state, out, encoder_spec)
    summary = {"family": state.family, "steps": state.step, "samples_seen": state.samples_seen,
               "train_seconds": round(train_s, 2), "stopped_early": stopped_early, "final": last,
               "img_per_s": state.samples_seen / max(train_s, 1e-9), "mem_mb": memory_mb(rt.device)}
    storage.write_bytes(storage.url_join(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    return state, summary


def _append(out: str, lines: list[str]) -> None:
    # Rewritten whole (atomic) rather than appended: object stores have no append.
    storage.write_bytes(storage.url_join(out, "metrics.jsonl"), ("\n".join(lines) + "\n").encode())


# ----------------------------------------------------------------------------- command line


def parse_overrides(items: Sequence[str]) -> tuple[dict, dict]:
    """`model.KEY=VALUE` / `train.KEY=VALUE` (VALUE parsed as JSON, else a string)."""
    model, train = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        group, dot, name = key.partition(".")
        if not sep or not dot or group not in ("model", "train"):
            raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        (model if group == "model" else train)[name] = value
    return model, train


def shapes_data(num: int, resolution: int, seed: int, encoder) -> tuple[ArrayData, EvalPrompts]:
    """The synthetic shapes set (held-out pairs excluded) with its captions encoded once each."""
    from t2i.data import shapes

    images, captions, _ = shapes.make_arrays(num, resolution, seed, holdout=True)
    uniq = sorted(set(captions))
    enc = encoder.encode(uniq)
    row = {c: i for i, c in enumerate(uniq)}
    tokens = [enc.tokens[row[c]] for c in captions]
    pooled = np.stack([enc.pooled[row[c]] for c in captions])
    data = ArrayData(images, tokens, pooled, [f"shapes-{seed}-{i:07d}" for i in range(num)], captions)
    eval_caps = [p if isinstance(p, str) else p[0] for p in _eval_captions(shapes)]
    penc = encoder.encode(eval_caps)
    return data, EvalPrompts(eval_caps, list(penc.tokens), np.asarray(penc.pooled))


def _eval_captions(shapes, n_seen: int = 4, n_heldout: int = 2) -> list:
    seen, held = list(shapes.prompts("seen")), list(shapes.prompts("heldout"))
    return [_caption(p) for p in seen[:: max(1, len(seen) // n_seen)][:n_seen] + held[:n_heldout]]


def _caption(p) -> str:
    if isinstance(p, str):
        return p
    if isinstance(p, dict):
        return p["caption"] if "caption" in p else p["prompt"]
    return p[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name, e.g. flow-s or gan-s")
    p.add_argument("--out", required=True, help="output directory or storage URL")
    p.add_argument("--num", type=int, default=20000, help="shapes samples to generate (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="data and run seed")
    p.add_argument("--encoder", default=None, help="text encoder name or path (default: the packaged MiniLM)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--lr", type=float, help="override train.lr")
    p.add_argument("--minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                   help="override any model./train. config key (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")


def run(args: argparse.Namespace) -> int:
    from t2i.config import EncoderSpec
    from t2i.models import get_preset
    from t2i.text import TextEncoder

    preset = get_preset(args.model)
    m_over, t_over = parse_overrides(args.set)
    for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)):
        if v is not None:
            t_over[k] = v
    model_cfg = replace(preset.model, **m_over) if m_over else preset.model
    train_cfg = replace(preset.train, **{"seed": args.seed, **t_over})
    spec = EncoderSpec(name=args.encoder) if args.encoder else EncoderSpec()
    encoder = TextEncoder(spec)
    if encoder.dim != model_cfg.text_dim:
        model_cfg = replace(model_cfg, text_dim=encoder.dim)
    data, prompts = shapes_data(args.num, model_cfg.resolution, args.seed, encoder)
    _, summary = train_local(model_cfg, train_cfg, data, args.out, prompts=prompts, device=args.device,
                             threads=args.threads, encoder_spec=encoder.spec,
                             max_seconds=None if args.minutes is None else args.minutes * 60)
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m t2i.train_local", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except T2IError as e:
        print(f"train_local: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
