"""The `t2i` command. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; this file wires them up and turns user errors into one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from t2i.errors import T2IError

# (name, module, help). `data` takes a second word (`t2i data shapes`); see pipelines/data.py.
COMMANDS = [
    ("data", "pipelines.data", "write data sets (the synthetic shapes set) as WebDataset shards"),
    ("embed", "pipelines.embed", "shards -> decoded images + text embeddings (Parquet), on Ray Data"),
    ("train", "pipelines.train", "train a model on an embedded dataset with Ray Train"),
    ("generate", "pipelines.generate", "prompt file -> images with a registered model, on Ray Data"),
    ("registry", "t2i.registry_cli", "list, show and alias registered models"),
    ("eval", "t2i.eval.cli", "FD, KID, precision/recall and text-image alignment of a model on held-out data"),
    ("export", "t2i.export", "write a registered model as a folder Hugging Face diffusers loads offline"),
    ("presets", "t2i.presets", "model presets: parameters, tokens, FLOPs, memory, GPU throughput"),
    ("demo", "pipelines.demo", "the whole flow end to end on the embedded defaults"),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (Ray, torch and transformers load in seconds,
    which `t2i --help` and `t2i registry list` should not pay)."""
    p = argparse.ArgumentParser(
        prog="t2i",
        description="t2i: text-to-image data and training pipelines on Ray (embed, train, generate).",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if name == command:
            mod = importlib.import_module(module)
            sp.description = (mod.__doc__ or help_).strip().splitlines()[0]
            mod.add_arguments(sp)
            sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    names = {name for name, _, _ in COMMANDS}
    parser = build_parser(next((a for a in argv if a in names), None))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except T2IError as e:
        if debug:
            raise
        print(f"t2i {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
