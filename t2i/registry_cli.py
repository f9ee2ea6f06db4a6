"""List, show and alias registered models (`t2i registry list | show REF | alias NAME:V ALIAS`).

The registry is `--registry URL`, else $T2I_REGISTRY, else ~/.t2i/registry. No Ray is involved.
"""

from __future__ import annotations

import argparse
import json

from t2i import mlflow_registry, registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    help_ = f"registry URL (local path or s3://); default ${registry.ENV}, else {registry.DEFAULT_URL}"
    parser.add_argument("--registry", metavar="URL", default=None, help=help_)
    sub = parser.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also accepted after the action; SUPPRESS keeps a value given before it
        p.add_argument("--registry", metavar="URL", default=argparse.SUPPRESS, help=help_)
        return p

    p = action("list", "list registered models, one line per version")
    p.add_argument("name", nargs="?", help="only this model's versions")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p = action("show", "print a model's card (config, encoder, run, dataset digest, metrics, file digests)")
    p.add_argument("ref", metavar="REF", help="name, name:VERSION or name@ALIAS")
    p = action("alias", "point NAME@ALIAS at a version (e.g. `alias shapes-gan:3 prod`)")
    p.add_argument("ref", metavar="NAME:V", help="the version to point at")
    p.add_argument("alias", metavar="ALIAS", help="alias name ('latest' is implied and reserved)")


def run(args: argparse.Namespace) -> int:
    reg = registry.Registry(args.registry)
    if args.registry_command == "list":
        rows = reg.list(args.name)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            print(registry.format_table(rows))
        else:
            print(f"no models in registry {reg.where}")
        return 0
    if args.registry_command == "show":
        print(json.dumps(reg.show(args.ref), indent=2, sort_keys=True))
        return 0
    ref = reg.alias(args.ref, args.alias)
    mirrored = mlflow_registry.alias(reg.resolve(str(ref)), args.alias) if mlflow_registry.enabled() else None
    print(f"{ref.name}@{args.alias} -> {ref}" + (f" (and {mirrored} in MLflow)" if mirrored else ""))
    return 0
