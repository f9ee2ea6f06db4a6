"""The model registry: named, versioned, immutable models with aliases, at any storage URL.

Where it lives: `Registry(url)`; without a URL, `$T2I_REGISTRY`, else `~/.t2i/registry` (one place
per user whatever the working directory, so `t2i train --register` and a later `t2i generate` find
the same models without flags).

References: `name` (the highest version), `name:3`, `name@prod` (an alias; `name@latest` is the
highest version and cannot be set).

Layout under the root:
  {name}/weights/{stage}/ema.safetensors, config.json, meta.json   copied from the checkpoint
  {name}/versions/000003.json                                      the card of name:3 (create-only)
  {name}/aliases/prod.json                                         {"version": 3} (overwritten)

How versions stay unique and whole without a lock: the weights go first, under a stage id unique to
this registration; then the card is created with a create-only write (O_EXCL/link locally, a
conditional PUT on S3) at the next free version. A writer that loses the race for a version tries
the next one with the same staged weights. A card is only ever written after its weights, so no
card points at missing weights; a writer that dies leaves at most an unreferenced stage directory.
Cards carry the sha256 of every weight file and `load` refuses any file that does not match.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import uuid
from typing import Any

import torch

from t2i import checkpoint as ck
from t2i import storage
from t2i.errors import IntegrityError, StorageError, T2IError

ENV = "T2I_REGISTRY"
DEFAULT_URL = "~/.t2i/registry"
FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CARD = re.compile(r"^(\d+)\.json$")
_RESERVED = {"format", "name", "version", "ref", "created", "weights", "files", "model", "family"}
_MAX_ATTEMPTS = 1000


def default_url() -> str:
    return os.environ.get(ENV) or os.path.expanduser(DEFAULT_URL)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


def validate_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise T2IError(f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """(name, version or None, alias or None) of 'name', 'name:3' or 'name@alias'."""
    ref = str(ref).strip()
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return validate_name(name), None, validate_name(alias, "alias")
    if ":" in ref:
        name, _, v = ref.partition(":")
        if not v.isdigit() or int(v) < 1:
            raise T2IError(f"invalid model reference {ref!r}: the version after ':' is an integer from 1")
        return validate_name(name), int(v), None
    return validate_name(ref), None, None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _run_of(checkpoint_url: str) -> str:
    """{run}/checkpoints/step_N -> {run}: the training run a checkpoint belongs to."""
    parts = checkpoint_url.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "checkpoints":
        return parts[0]
    return checkpoint_url


class Registry:
    def __init__(self, url: str | None = None):
        self.url = str(url) if url else default_url()
        self.where = storage.describe(self.url)

    def __repr__(self) -> str:
        return f"Registry({self.where!r})"

    # --------------------------------------------------------------- paths
    def _model(self, name: str) -> str:
        return storage.url_join(self.url, name)

    def _card_url(self, name: str, version: int) -> str:
        return storage.url_join(self.url, name, "versions", f"{version:06d}.json")

    def _alias_url(self, name: str, alias: str) -> str:
        return storage.url_join(self.url, name, "aliases", f"{alias}.json")

    def weights_url(self, card: dict) -> str:
        return storage.url_join(self.url, card["name"], card["weights"])

    # --------------------------------------------------------------- reading
    def names(self) -> list[str]:
        out = []
        for child in storage.listdir(self.url):
            name = child.rstrip("/").rsplit("/", 1)[-1]
            if _NAME.match(name) and storage.listdir(storage.url_join(child, "versions")):
                out.append(name)
        return sorted(out)

    def versions(self, name: str) -> list[int]:
        validate_name(name)
        found = []
        for child in storage.listdir(storage.url_join(self._model(name), "versions")):
            m = _CARD.match(child.rsplit("/", 1)[-1])  # skips create-only temp files in flight
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def aliases(self, name: str) -> dict[str, int]:
        out = {}
        for child in storage.listdir(storage.url_join(self._model(name), "aliases")):
            base = child.rsplit("/", 1)[-1]
            if base.endswith(".json") and _NAME.match(base[:-5]):
                try:
                    out[base[:-5]] = int(json.loads(storage.read_bytes(child))["version"])
                except (ValueError, KeyError, TypeError, StorageError):
                    continue  # a half-written or foreign file is not an alias
        return dict(sorted(out.items()))

    def _not_found(self, ref: str, detail: str = "") -> T2IError:
        return T2IError(f"model '{ref}' not found in registry {self.where}{detail}")

    def _read_card(self, name: str, version: int, ref: str) -> dict:
        url = self._card_url(name, version)
        try:
            data = storage.read_bytes(url)
        except StorageError:
            known = self.versions(name)
            detail = f" (versions: {', '.join(map(str, known))})" if known else ""
            raise self._not_found(ref, detail) from None
        try:
            card = json.loads(data)
            assert card["name"] == name and int(card["version"]) == version
        except (ValueError, KeyError, TypeError, AssertionError):
            raise IntegrityError(f"{storage.describe(url)}: not a valid card for {name}:{version}") from None
        return card

    def resolve(self, ref: str) -> dict:
        """The card of 'name', 'name:3' or 'name@alias'."""
        name, version, alias = parse_ref(ref)
        if alias and alias != "latest":
            table = self.aliases(name)
            if alias not in table:
                detail = f" (aliases: {', '.join(table)})" if table else ""
                raise self._not_found(ref, detail)
            version = table[alias]
        if version is None:
            known = self.versions(name)
            if not known:
                raise self._not_found(ref)
            version = known[-1]
        return self._read_card(name, version, ref)

    def show(self, ref: str) -> dict:
        """The card plus the aliases that point at it now."""
        card = self.resolve(ref)
        names = [a for a, v in self.aliases(card["name"]).items() if v == card["version"]]
        if card["version"] == self.versions(card["name"])[-1]:
            names.append("latest")
        return {**card, "aliases": names}

    def list(self, name: str | None = None) -> list[dict]:
        """One summary row per version, by name then version."""
        rows = []
        for n in [validate_name(name)] if name else self.names():
            aliases = self.aliases(n)
            versions = self.versions(n)
            for v in versions:
                card = self._read_card(n, v, f"{n}:{v}")
                tags = [a for a, av in aliases.items() if av == v] + (["latest"] if v == versions[-1] else [])
                rows.append({
                    "ref": f"{n}:{v}", "name": n, "version": v, "aliases": tags,
                    "family": card.get("family"), "step": card.get("step"),
                    "dataset_digest": card.get("dataset_digest"), "created": card.get("created"),
                })
        return rows

    # --------------------------------------------------------------- writing
    def register(self, name: str, checkpoint_url: str, card_extra: dict | None = None) -> ModelRef:
        """Copy a checkpoint's EMA weights, config and meta into the registry as the next version.

        The checkpoint's digests are verified first. `card_extra` adds to the card (e.g.
        `dataset_digest`, `run`, `metrics`, `description`); it cannot replace the fields the
        registry derives itself.
        """
        validate_name(name)
        extra = dict(card_extra or {})
        clash = sorted(_RESERVED & set(extra))
        if clash:
            raise ValueError(f"card_extra may not set {clash[0]!r}: the registry records it itself")
        raw = ck.read_files(checkpoint_url, ck.WEIGHT_FILES)
        config = json.loads(raw[ck.CONFIG])
        meta = json.loads(raw[ck.META])

        stage = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        weights = f"weights/{stage}"
        for fname, data in raw.items():
            storage.write_bytes(storage.url_join(self._model(name), weights, fname), data)

        metrics = {**(meta.get("metrics") or {}), **(extra.pop("metrics", None) or {})}
        base = {
            "format": FORMAT, "name": name, "family": config.get("family"),
            "model": config.get("model"), "encoder": config.get("encoder"), "train": config.get("train"),
            "run": meta.get("run_url") or _run_of(storage.describe(checkpoint_url)),
            "checkpoint": storage.describe(checkpoint_url),
            "step": meta.get("step"), "samples_seen": meta.get("samples_seen"),
            "dataset_url": meta.get("dataset_url"), "dataset_digest": meta.get("dataset_digest"),
            "metrics": metrics, "weights": weights, "parent": meta.get("parent"),
            **({"eval": meta["eval"]} if meta.get("eval") else {}),  # what eval_* metrics were measured with
            "files": {f: {"sha256": ck.sha256(d), "bytes": len(d)} for f, d in raw.items()},
            **extra,
        }
        version = (self.versions(name) or [0])[-1] + 1
        for _ in range(_MAX_ATTEMPTS):
            card = {**base, "version": version, "ref": f"{name}:{version}", "created": _now()}
            if storage.create_only(self._card_url(name, version), _json(card)):
                return ModelRef(name, version)
            # Lost this version to another writer: jump past everything that exists now.
            version = max(version + 1, (self.versions(name) or [0])[-1] + 1)
        raise StorageError(f"{self.where}: could not allocate a version of {name!r} "
                           f"after {_MAX_ATTEMPTS} attempts (too many concurrent writers)")

    def alias(self, ref: str, alias: str) -> ModelRef:
        """Point `name@alias` at the version `ref` resolves to (aliases move; versions never do)."""
        validate_name(alias, "alias")
        if alias == "latest" or alias.isdigit():
            raise T2IError(f"invalid alias {alias!r}: 'latest' and numbers are reserved")
        card = self.resolve(ref)
        storage.write_bytes(self._alias_url(card["name"], alias),
                            _json({"version": card["version"], "updated": _now()}))
        return ModelRef(card["name"], card["version"])

    # --------------------------------------------------------------- loading
    def load(self, ref: str, map_location: str | torch.device = "cpu"):
        """(model_cfg, sampling network in eval mode, card); every weight file is checked against the
        card's sha256 before it is parsed."""
        card = self.resolve(ref)
        wurl = self.weights_url(card)
        files = card.get("files") or {}
        missing = [f for f in ck.WEIGHT_FILES if f not in files]
        if missing:
            raise IntegrityError(f"model '{card['ref']}': its card records no digest for {missing[0]}")
        raw = {f: ck.read_verified(wurl, f, files[f]) for f in ck.WEIGHT_FILES}
        config = json.loads(raw[ck.CONFIG])
        tensors = ck.from_safetensors(raw[ck.EMA], storage.describe(storage.url_join(wurl, ck.EMA)))
        cfg, net = ck.build_network(config["model"], tensors, f"model '{card['ref']}'")
        return cfg, net.to(map_location), card


def format_table(rows: list[dict]) -> str:
    """`t2i registry list` as a plain-text table, one row per version."""
    cols = [("MODEL", "ref"), ("ALIASES", "aliases"), ("FAMILY", "family"), ("STEP", "step"),
            ("DATASET", "dataset_digest"), ("CREATED", "created")]

    def cell(row: dict, key: str) -> str:
        v = row.get(key)
        if key == "aliases":
            return ",".join(v) or "-"
        if key == "dataset_digest" and v:
            return str(v)[:12]
        return "-" if v is None else str(v)

    cells = [[h for h, _ in cols]] + [[cell(r, k) for _, k in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)
