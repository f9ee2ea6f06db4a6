"""Write data sets as WebDataset shards: `t2i data shapes --out URL --num N --resolution R`,
or from Python `shapes(out, num, resolution=R)`.

The shapes set is rendered in this process (thousands of small samples per second on one
core), so it needs no cluster; the shards it writes are what `t2i embed` reads.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable

from t2i import storage
from t2i.data import shapes as shapes_set
from t2i.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    default_holdout = ",".join(f"{s}:{c}" for s, c in shapes_set.DEFAULT_HOLDOUT)
    p = sub.add_parser(
        "shapes",
        help="the synthetic shapes set ('a red circle on a blue background')",
        description="Render the synthetic shapes set into WebDataset shards ({key}.png, .txt, .json).",
    )
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i depends on (seed, i) only")
    p.add_argument(
        "--holdout", default=default_holdout,
        help=f"shape:colour pairs kept out of the shards, comma-separated, or 'none' (default {default_holdout})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the shards of an existing set at --out")


def shapes(out: str, num: int, *, resolution: int = 32, shard_size: int = 1000, seed: int = 0,
           holdout: Iterable[Iterable[str]] = shapes_set.DEFAULT_HOLDOUT, overwrite: bool = False,
           progress: bool = True) -> dict:
    """Render `num` shapes samples into WebDataset shards under `out` (progress on stderr).

    Returns {"out", "num", "resolution", "shards" (URLs), "holdout" (pairs), "seconds"}.
    """
    if num < 1:
        raise ConfigError(f"--num {num}: must be at least 1")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be at least 1")
    if resolution < 8:
        raise ConfigError(f"--resolution {resolution}: must be at least 8")
    holdout = shapes_set.validate_holdout(holdout)
    start = time.time()
    urls = shapes_set.write_shapes(out, num, resolution, shard_size=shard_size, seed=seed, holdout=holdout,
                                   overwrite=overwrite, progress=_progress(start) if progress else None)
    return {"out": out, "num": num, "resolution": resolution, "shards": urls, "holdout": holdout,
            "seconds": time.time() - start}


def _progress(start: float):
    def report(done: int, total: int) -> None:
        rate = done / max(time.time() - start, 1e-9)
        end = "\n" if done == total else ""
        print(f"\rshapes: {done}/{total} samples ({rate:,.0f}/s)", end=end, file=sys.stderr, flush=True)

    return report


def run(args: argparse.Namespace) -> int:
    if args.dataset != "shapes":
        raise ConfigError(f"unknown data set {args.dataset!r}; expected 'shapes'")
    r = shapes(args.out, args.num, resolution=args.resolution, shard_size=args.shard_size, seed=args.seed,
               holdout=shapes_set.parse_holdout(args.holdout), overwrite=args.overwrite)
    held = ", ".join(f"{s}:{c}" for s, c in r["holdout"]) or "none"
    print(f"wrote {r['num']} samples at {r['resolution']}px in {len(r['shards'])} shards to "
          f"{storage.describe(r['out'])} ({r['seconds']:.1f}s; held out: {held})")
    return 0
