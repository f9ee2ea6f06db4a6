"""Single-process training over in-memory arrays, for either family (`python -m t2i.train.local`).

The same loop (`t2i.train.loop.fit`) and the same run files as the Ray Train workers, without Ray:
what the quality benchmark and quick experiments use. Writes into `--out`:
  metrics.jsonl, events.jsonl   one JSON line per log window (step, losses, img/s, lr, memory); events
  samples/step_NNNNNN.png       contact sheets of the EMA model on fixed prompts
  checkpoints/step_NNNNNN/      real checkpoints (digests; `t2i` registry and generate take them)
  config.json                   {"format", "family", "model", "train", "encoder"} (as in checkpoints)
  summary.json                  steps run, seconds, final metrics, the last checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from t2i import storage
from t2i.config import EncoderSpec, TrainConfig, parse_sets, replace, to_dict
from t2i.data import shapes
from t2i.data.batching import collate_features, sample_seeds
from t2i.errors import ConfigError, T2IError
from t2i.families import compile_modules, make_state
from t2i.presets import check_teacher, get_preset
from t2i.runtime import memory_mb, seed_from, setup_runtime
from t2i.text import TextEncoder
from t2i.train.loop import EvalPrompts, Hooks, fit, write_samples
from t2i.train.run import Run
from t2i.train.runlog import format_line
from t2i.train.state import TrainState

log = logging.getLogger("t2i.train")


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

    def batch(self, idx: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        tokens, mask, pooled = collate_features([self.tokens[i] for i in idx], self.pooled[idx])
        return {"image": torch.from_numpy(np.ascontiguousarray(self.images[idx])), "tokens": tokens, "mask": mask,
                "pooled": pooled, "seed": sample_seeds([self.keys[i] for i in idx], seed)}

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches: a fresh permutation each epoch, batches may span epochs (no drop)."""
        for idx in index_stream(len(self.images), batch_size, seed):
            yield self.batch(idx, seed)


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


def train_local(model_cfg: Any, train_cfg: TrainConfig, data: ArrayData, out: str, *,
                prompts: EvalPrompts | None = None, max_seconds: float | None = None, device: str = "auto",
                threads: int | None = None, encoder_spec: Any = None,
                trackers: tuple[str, ...] = (), compile: bool = False) -> tuple[TrainState, dict]:
    """Train for train_cfg.steps (or until max_seconds) with the one training loop; write logs,
    grids and checkpoints (every `checkpoint_every` steps and at the end) into `out`.

    The checkpoints are the same as a Ray Train run's: the registry takes them and `t2i generate`
    samples from them. Returns (state, summary). Seeds: the model init from train_cfg.seed; batch
    order from (seed, epoch); each sample's noise from (seed, its key, step).
    """
    if model_cfg.resolution != data.images.shape[1]:
        raise ConfigError(f"model resolution {model_cfg.resolution} != data resolution {data.images.shape[1]}")
    rt = setup_runtime(device, threads)
    state = make_state(model_cfg, train_cfg, rt)
    if compile:
        compile_modules(state)
    enc = to_dict(encoder_spec) if dataclasses.is_dataclass(encoder_spec) else encoder_spec
    config = {"format": 1, "family": state.family, "model": to_dict(model_cfg), "train": to_dict(train_cfg),
              "encoder": enc}
    storage.write_text(storage.url_join(out, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    run = Run(out, state, encoder=enc, data_url="(in memory)", prompts=prompts, trackers=trackers, config=config)
    run.files.start(0)
    run.open_trackers()
    t0 = time.perf_counter()

    def on_log(rec: dict) -> None:
        rec["elapsed_s"] = time.perf_counter() - t0
        run.log(rec)
        log.info("%s %.0fs", format_line(rec, train_cfg.steps), rec["elapsed_s"])

    def on_step(st: TrainState, _wait: float) -> None:
        if prompts is not None and train_cfg.sample_every and st.step % train_cfg.sample_every == 0:
            write_samples(st, prompts, storage.url_join(out, "samples", f"step_{st.step:06d}.png"))

    hooks = Hooks(log=on_log, checkpoint=lambda st: run.save(), step=on_step,
                  stop=None if max_seconds is None else lambda st: time.perf_counter() - t0 > max_seconds)
    why = fit(state, data.batches(train_cfg.batch_size, train_cfg.seed), hooks)
    train_s = time.perf_counter() - t0
    final = run.save()
    run.close()
    summary = {"family": state.family, "steps": state.step, "samples_seen": state.samples_seen,
               "train_seconds": round(train_s, 2), "stopped_early": why == "stopped", "final": run.metrics(),
               "img_per_s": state.samples_seen / max(train_s, 1e-9), "mem_mb": memory_mb(rt.device),
               "checkpoint": storage.describe(final)}
    storage.write_text(storage.url_join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return state, summary


# ----------------------------------------------------------------------------- command line


def shapes_data(num: int, resolution: int, seed: int, encoder) -> tuple[ArrayData, EvalPrompts]:
    """The synthetic shapes set (held-out pairs excluded) with its captions encoded once each."""
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
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's networks")


def run(args: argparse.Namespace) -> int:
    preset = get_preset(args.model)
    m_over, t_over = parse_sets(args.set)
    for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)):
        if v is not None:
            t_over[k] = v
    model_cfg = replace(preset.model, **m_over) if m_over else preset.model
    train_cfg = replace(preset.train, **{"seed": args.seed, **t_over})
    check_teacher(args.model, model_cfg, train_cfg)
    spec = EncoderSpec(name=args.encoder) if args.encoder else EncoderSpec()
    encoder = TextEncoder(spec)
    if encoder.dim != model_cfg.text_dim:
        model_cfg = replace(model_cfg, text_dim=encoder.dim)
    data, prompts = shapes_data(args.num, model_cfg.resolution, args.seed, encoder)
    _, summary = train_local(model_cfg, train_cfg, data, args.out, prompts=prompts, device=args.device,
                             threads=args.threads, encoder_spec=encoder.spec, compile=args.compile,
                             max_seconds=None if args.minutes is None else args.minutes * 60)
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m t2i.train.local", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except T2IError as e:
        print(f"train_local: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
