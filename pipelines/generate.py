"""Generate images from a prompt file with a registered model, on Ray Data.

prompt rows -> (skip ids already in OUT/images) -> text encoder + sampler in an actor pool (one
actor per GPU, else single-threaded CPU actors) -> OUT/images/{id}.png, written create-only ->
OUT/errors.jsonl (bad prompt rows) -> OUT/manifest.jsonl + OUT/manifest.json, last.

Deterministic: a row's noise comes from (seed, id) alone; captions are encoded in groups of equal
token length (no padding, so a caption's features do not depend on its batch); the model runs in
calls of a fixed number of rows on CPU (kernels choose their code path by shape); and CPU actors
run one torch thread each (some CPU reductions change their summation order with the thread
count). The same prompt file gives the same PNG bytes whatever the batch size or number of actors.

Idempotent: an image that exists is never rewritten (create-only writes); a rerun skips it, and
the manifest always covers every image in OUT. Each PNG carries its own provenance (id, prompt,
seed, model, digest) in an iTXt chunk, so the manifest can be rebuilt from the images alone.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import math
import os
import re
import struct
import time
import zlib
from collections import OrderedDict

log = logging.getLogger("t2i.generate")

IMAGES, ERRORS, ROWS, MANIFEST = "images", "errors.jsonl", "manifest.jsonl", "manifest.json"
JOB, GRID = "job.json", "grid.png"
PNG_KEY = "t2i"  # iTXt keyword of the provenance record inside every PNG
FORMAT = 1
GRID_MAX = 64
MAX_DEFAULT_ACTORS = 32  # each CPU actor holds its own model + encoder copy; more only if asked
MICRO_BATCH = 8  # rows per model call on CPU, whatever --batch-size is (see ImageMaker.images)

# Forwarded from the driver to Ray workers, which may have started before the driver's environment
# was set (and never see it on a remote cluster). Never logged or written.
_FORWARD_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "HF_HOME",
                "TRANSFORMERS_VERBOSITY", "T2I_REGISTRY")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registered model: NAME, NAME:VERSION or NAME@ALIAS")
    p.add_argument("--prompts", required=True,
                   help="prompt file: .txt (one prompt per line) or .jsonl/.csv/.parquet "
                   "(prompt, optional id and seed)")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix (images/, manifest, errors)")
    p.add_argument("--registry", default=None, help="registry URL (default: $T2I_REGISTRY, else ~/.t2i/registry)")
    p.add_argument("--steps", type=int, default=None, help="flow sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="flow classifier-free guidance (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16,
                   help=f"prompts per actor call (default: %(default)s; CPU models take {MICRO_BATCH} at a time)")
    p.add_argument("--seed", type=int, default=0, help="seed for rows without one (default: %(default)s)")
    p.add_argument("--actors", type=int, default=None,
                   help=f"generation actors (default: one per GPU, else one per CPU core up to {MAX_DEFAULT_ACTORS})")
    p.add_argument("--grid", action="store_true", help=f"also write a contact sheet {GRID} (first {GRID_MAX} ids)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


# ----------------------------------------------------------------------------- PNG with provenance


def png_bytes(image, meta: dict) -> bytes:
    """uint8 [H,W,3] -> PNG bytes with `meta` as an iTXt chunk ahead of the pixels; deterministic."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(meta, sort_keys=True, ensure_ascii=False))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def png_meta(head: bytes) -> dict | None:
    """The provenance record from the first bytes of a PNG (chunks before IDAT); None if absent."""
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos = 8
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        body = head[pos + 8:pos + 8 + length]
        if kind == b"IDAT" or len(body) < length:
            return None
        if kind == b"iTXt" and body.startswith(PNG_KEY.encode() + b"\0"):
            rest = body[len(PNG_KEY) + 1:]
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            try:
                return json.loads(zlib.decompress(text) if compressed else text)
            except (ValueError, zlib.error):
                return None
        pos += 12 + length
    return None


def read_png_meta(url: str) -> dict | None:
    from t2i import storage

    fs, path = storage.filesystem(url)
    try:
        head = fs.cat_file(path, start=0, end=1 << 16)  # prompts are capped, so the record fits
    except Exception:
        return None
    return png_meta(head)


# ----------------------------------------------------------------------------- the actor


def _apply_env(env: dict) -> None:
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
        from t2i import storage

        storage.reset()


class ImageMaker:
    """Rows {id, prompt, seed} -> images written to OUT/images; one instance per actor.

    Plain Python (no Ray): the benchmark's bare loop calls the very same object.
    """

    def __init__(self, registry: str, ref: str, digest: str, out: str, steps: int | None = None,
                 guidance: float | None = None, threads: int | None = None, device: str = "auto",
                 env: dict | None = None, cache_size: int = 4096, micro_batch: int = MICRO_BATCH):
        _apply_env(env or {})
        import torch

        from t2i.config import EncoderSpec, from_dict
        from t2i.registry import Registry
        from t2i.runtime import setup_runtime
        from t2i.text import TextEncoder

        if threads:
            torch.set_num_threads(threads)
        self.runtime = setup_runtime(device)
        self.cfg, self.net, card = Registry(registry).load(ref, map_location=self.runtime.device)
        if model_digest(card) != digest:
            raise RuntimeError(f"model {ref} changed while the job ran (digest {model_digest(card)[:12]} "
                               f"!= {digest[:12]})")
        spec = from_dict(EncoderSpec, card["encoder"])
        self.encoder = TextEncoder(spec, device=self.runtime.device)
        self.out, self.ref, self.digest = out, ref, digest
        self.steps, self.guidance = steps, guidance
        # GPUs pick kernels per shape too, but padding every call there costs real throughput: the
        # bitwise guarantee across batch sizes is a CPU one; on a GPU, equal settings reproduce.
        self.micro_batch = micro_batch if self.runtime.device.type == "cpu" else None
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size

    def encode(self, prompts: list[str]):
        """(tokens list of [L_i, D], pooled [B, D]) for prompts, batch-invariantly.

        Captions are encoded in groups of equal token count, so no caption is ever padded and its
        features do not depend on what else is in the batch. Repeated prompts are encoded once.
        """
        import numpy as np

        from t2i.text.encoder import quiet_transformers

        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            with quiet_transformers():
                lengths = [len(x) for x in self.encoder.tokenizer(todo)["input_ids"]]
            groups: dict[int, list[str]] = {}
            for p, n in zip(todo, lengths):
                groups.setdefault(n, []).append(p)
            for group in groups.values():
                enc = self.encoder.encode(group)
                for i, p in enumerate(group):
                    self._cache[p] = (enc.tokens[i], enc.pooled[i])
        for p in prompts:
            self._cache.move_to_end(p)
        feats = [self._cache[p] for p in prompts]
        while len(self._cache) > max(self._cache_size, len(prompts)):
            self._cache.popitem(last=False)
        return [f[0] for f in feats], np.stack([f[1] for f in feats])

    def images(self, ids: list[str], prompts: list[str], seeds: list[int]):
        """uint8 [B, H, W, 3] for one batch of rows, computed in calls of exactly `micro_batch` rows.

        CPU kernels pick their code path by shape (a one-row Linear is a GEMV, more rows a GEMM, and
        the two round differently), so a row's pixels could depend on how many rows share its call.
        A fixed call size, padded with copies of the last row, takes that away; which rows share a
        call does not matter (rows never mix).
        """
        import numpy as np

        from t2i.data.batching import collate_features
        from t2i.sampling import generate

        tokens, pooled = self.encode(prompts)
        m = self.micro_batch or len(ids)
        out = []
        for s in range(0, len(ids), m):
            n = min(m, len(ids) - s)
            take = list(range(s, s + n)) + [s + n - 1] * (m - n)
            t, mask, p = collate_features([tokens[i] for i in take], pooled[take])
            imgs = generate(self.net, self.cfg, t, mask, p, [seeds[i] for i in take], [ids[i] for i in take],
                            steps=self.steps, guidance=self.guidance)
            out.append(imgs[:n].numpy())
        return np.concatenate(out)

    def __call__(self, batch: dict) -> dict:
        from t2i import storage

        ids = [str(x) for x in batch["id"]]
        prompts = [str(x) for x in batch["prompt"]]
        seeds = [int(x) for x in batch["seed"]]
        status = []
        for i, img in enumerate(self.images(ids, prompts, seeds)):
            meta = record(ids[i], prompts[i], seeds[i], self.ref, self.digest, self.steps, self.guidance)
            created = storage.create_only(image_url(self.out, ids[i]), png_bytes(img, meta))
            status.append("written" if created else "exists")
        return {"id": ids, "prompt": prompts, "seed": seeds, "status": status}


# ----------------------------------------------------------------------------- out dir bookkeeping


def image_url(out: str, id_: str) -> str:
    from t2i import storage

    return storage.url_join(out, IMAGES, f"{id_}.png")


def model_digest(card: dict) -> str:
    """The sha256 of the sampling weights: what identifies the model's images, whatever its name."""
    return card["files"]["ema.safetensors"]["sha256"]


def record(id_: str, prompt: str, seed: int, ref: str, digest: str, steps, guidance) -> dict:
    return {"id": id_, "prompt": prompt, "seed": int(seed), "model": ref, "digest": digest,
            "steps": steps, "guidance": guidance, "path": f"{IMAGES}/{id_}.png"}


def existing_ids(out: str) -> set[str]:
    """Ids with a finished image in OUT/images (temp files of writes in flight are not .png)."""
    from t2i import storage
    from t2i.prompts import id_problem

    found = set()
    for url in storage.listdir(storage.url_join(out, IMAGES)):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".png") and id_problem(name[:-4]) is None:
            found.add(name[:-4])
    return found


def check_job(out: str, job: dict) -> None:
    """Record the job's model and sampling settings in OUT/job.json on the first run; refuse a rerun
    that would mix images of another model or other settings into the same directory."""
    from t2i import storage
    from t2i.errors import T2IError

    url = storage.url_join(out, JOB)
    if storage.create_only(url, (json.dumps(job, indent=2, sort_keys=True) + "\n").encode()):
        return
    try:
        prev = json.loads(storage.read_bytes(url))
    except ValueError:
        raise T2IError(f"{storage.describe(url)}: not valid JSON; remove it or use another --out") from None
    for key in ("digest", "steps", "guidance", "seed"):
        if prev.get(key) != job.get(key):
            raise T2IError(
                f"{storage.describe(out)} holds images from {prev.get('model')} with {key}={prev.get(key)!r}; "
                f"this run asks for {job.get('model')} with {key}={job.get(key)!r} (use another --out)")


def _old_rows(out: str) -> dict[str, dict]:
    from t2i import storage
    from t2i.errors import StorageError

    try:
        text = storage.read_bytes(storage.url_join(out, ROWS)).decode()
    except (StorageError, UnicodeDecodeError):
        return {}
    rows = {}
    for line in text.splitlines():
        try:
            r = json.loads(line)
            rows[str(r["id"])] = r
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def build_manifest(out: str, fresh: dict[str, dict]) -> list[dict]:
    """One record per image in OUT/images, by id: this run's records, else the previous manifest's,
    else the record inside the PNG itself."""
    ids = sorted(existing_ids(out))
    old = _old_rows(out) if any(i not in fresh for i in ids) else {}
    rows = []
    for i in ids:
        r = fresh.get(i) or old.get(i) or read_png_meta(image_url(out, i))
        if r is None or r.get("id") != i:
            log.warning("generate: %s has no t2i record; listed without prompt", image_url(out, i))
            r = {"id": i, "prompt": None, "seed": None, "model": None, "digest": None,
                 "steps": None, "guidance": None, "path": f"{IMAGES}/{i}.png"}
        rows.append(r)
    return rows


def write_outputs(out: str, rows: list[dict], summary: dict) -> None:
    from t2i import storage
    from t2i.checkpoint import sha256

    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()
    storage.write_bytes(storage.url_join(out, ROWS), data)
    summary = {**summary, "images": len(rows), "rows": ROWS, "rows_sha256": sha256(data)}
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(storage.url_join(out, MANIFEST), text.encode())


def write_grid(out: str, rows: list[dict]) -> str:
    import numpy as np
    from PIL import Image

    from t2i import storage
    from t2i.eval.grid import write_contact_sheet

    imgs = [np.asarray(Image.open(io.BytesIO(storage.read_bytes(image_url(out, r["id"])))).convert("RGB"))
            for r in rows[:GRID_MAX]]
    if not imgs:
        return ""
    scale = max(1, 64 // imgs[0].shape[0])
    return write_contact_sheet(storage.url_join(out, GRID), np.stack(imgs), ncol=8, scale=scale)


# ----------------------------------------------------------------------------- driver


def plan_resources(cluster: dict, actors: int | None) -> dict:
    """Actor count and per-actor resources. CPU actors get one torch thread each (see the module
    docstring) and fractional CPU slots: whole-CPU actors on a small machine leave no slot for the
    dataset's own tasks and the job stalls without a word."""
    cpus = float(cluster.get("CPU", 1))
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        n = actors or gpus
        return {"actors": n, "device": "cuda", "threads": None, "resources": {"num_gpus": 1, "num_cpus": 1}}
    n = actors or max(1, min(int(cpus), MAX_DEFAULT_ACTORS))
    share = max(0.1, min(1.0, (cpus - 0.5) / n))
    return {"actors": n, "device": "cpu", "threads": 1, "resources": {"num_cpus": round(share, 3)}}


def sampling_settings(card: dict, steps: int | None, guidance: float | None) -> tuple[int | None, float | None]:
    """The steps and guidance the model will really use (None for a one-step GAN)."""
    from t2i.errors import T2IError

    model = card.get("model") or {}
    if card.get("family") == "flow":
        steps = model.get("steps") if steps is None else steps
        guidance = model.get("guidance") if guidance is None else guidance
        if steps is not None and steps < 1:
            raise T2IError(f"--steps must be >= 1, got {steps}")
        return steps, guidance
    if steps is not None or guidance is not None:
        log.warning("generate: %s is a one-step %s model; --steps/--guidance are ignored",
                    card.get("ref"), card.get("family"))
    return None, None


def run_job(rows: list[dict], maker_kwargs: dict, batch_size: int, plan: dict, progress_every: float = 10.0):
    """The Ray Data job over rows {id, prompt, seed}; returns the actors' result rows."""
    import ray

    kwargs = {**maker_kwargs, "threads": plan["threads"], "device": plan["device"],
              "env": {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}}
    # Blocks of many batches: every block costs a task round trip and object-store traffic, which
    # a one-step GAN at hundreds of images/s feels (measured on 2 CPUs, gan-s, 8192 prompts: 16-row
    # blocks ran at 0.55 x the bare loop). Small jobs keep one batch per block so every actor gets work.
    batches = math.ceil(len(rows) / batch_size)
    blocks = max(1, min(batches, max(8 * plan["actors"], math.ceil(batches / 16)), 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(ImageMaker, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=plan["actors"]), **plan["resources"])
    results, t0, last = [], time.perf_counter(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        results += [{"id": str(i), "prompt": str(p), "seed": int(s), "status": str(st)}
                    for i, p, s, st in zip(batch["id"], batch["prompt"], batch["seed"], batch["status"])]
        now = time.perf_counter()
        if now - last >= progress_every:
            last = now
            log.info("generate: %d/%d images (%.1f images/s)", len(results), len(rows), len(results) / (now - t0))
    return results


def user_error(e: BaseException):
    """The T2IError behind a Ray failure (an actor that could not load its model, say), or None.

    A failed actor constructor reaches the driver only as text, its traceback ending in the error's
    line; a failed task keeps the exception as `cause`."""
    from t2i.errors import T2IError

    c = e
    while c is not None:
        if isinstance(c, T2IError):
            return T2IError(str(c))
        c = getattr(c, "cause", None) or c.__cause__
    lines = str(e).strip().splitlines()
    m = re.match(r"t2i\.errors\.\w+: (.+)", lines[-1]) if lines else None
    return T2IError(m.group(1)) if m else None


def run(args: argparse.Namespace) -> int:
    from t2i import storage
    from t2i.errors import T2IError
    from t2i.prompts import read_prompts
    from t2i.registry import Registry

    if args.batch_size < 1:
        raise T2IError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.actors is not None and args.actors < 1:
        raise T2IError(f"--actors must be >= 1, got {args.actors}")
    # Actors resolve paths against their own working directory: hand them absolute ones.
    out = storage.split(args.out)[1] if storage.is_local(args.out) else args.out
    reg_url = args.registry and (storage.split(args.registry)[1] if storage.is_local(args.registry) else args.registry)
    t_start = time.perf_counter()
    registry = Registry(reg_url)
    card = registry.resolve(args.model)
    ref, digest = card["ref"], model_digest(card)
    if not card.get("encoder"):
        raise T2IError(f"model '{ref}': its card records no text encoder, so prompts cannot be embedded")
    steps, guidance = sampling_settings(card, args.steps, args.guidance)
    prompts = read_prompts(args.prompts, default_seed=args.seed)

    check_job(out, {"format": FORMAT, "model": ref, "digest": digest, "family": card.get("family"),
                    "steps": steps, "guidance": guidance, "seed": args.seed})
    done = existing_ids(out)
    todo = [r for r in prompts.rows if r.id not in done]
    skipped = len(prompts.rows) - len(todo)
    storage.write_bytes(storage.url_join(out, ERRORS),
                        "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in prompts.errors).encode())
    for e in prompts.errors[:5]:
        log.warning("generate: %s row %d%s: %s", storage.describe(args.prompts), e.row,
                    f" (id {e.id})" if e.id else "", e.reason)
    log.info("generate: %s (%s) on %d prompts: %d to do, %d already in %s, %d bad rows",
             ref, card.get("family"), prompts.total, len(todo), skipped, storage.describe(out), len(prompts.errors))

    results, job_s = [], 0.0
    if todo:
        storage.delete(storage.url_join(out, MANIFEST))  # a dir without a manifest reads as unfinished
        import ray

        from pipelines.embed import connect

        started = connect(args.address)
        try:
            plan = plan_resources(ray.cluster_resources(), args.actors)
            # an actor with no batch to run would still pay for a model load
            plan["actors"] = min(plan["actors"], math.ceil(len(todo) / args.batch_size))
            log.info("generate: %d %s actor(s), batch size %d", plan["actors"], plan["device"], args.batch_size)
            t0 = time.perf_counter()
            try:
                results = run_job([{"id": r.id, "prompt": r.prompt, "seed": r.seed} for r in todo],
                                  {"registry": registry.url, "ref": ref, "digest": digest, "out": out,
                                   "steps": steps, "guidance": guidance}, args.batch_size, plan)
            except Exception as e:
                err = user_error(e)
                if err is None:
                    raise
                raise err from None
            job_s = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()
    written = [r for r in results if r["status"] == "written"]
    fresh = {r["id"]: record(r["id"], r["prompt"], r["seed"], ref, digest, steps, guidance) for r in written}
    rows = build_manifest(out, fresh)
    write_outputs(out, rows, {
        "format": FORMAT, "model": ref, "digest": digest, "family": card.get("family"), "steps": steps,
        "guidance": guidance, "prompts": storage.describe(args.prompts), "errors": len(prompts.errors),
        "errors_file": ERRORS, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    grid = write_grid(out, rows) if args.grid else ""
    rate = len(written) / job_s if job_s > 0 else 0.0
    print(f"generate: {len(written)} written ({rate:.2f} images/s), {skipped + len(results) - len(written)} "
          f"already there, {len(prompts.errors)} bad prompt rows ({ERRORS}) -> {storage.describe(out)} "
          f"[{len(rows)} images in manifest{', ' + GRID if grid else ''}; {time.perf_counter() - t_start:.1f} s]")
    return 0
