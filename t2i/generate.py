"""Prompts -> images with a registered model: the work, the provenance and the output bookkeeping (no Ray).

prompt rows -> (skip ids already in OUT/images) -> text encoder + sampler (`ImageMaker`) ->
OUT/images/{id}.png, written create-only -> OUT/errors.jsonl (bad prompt rows) ->
OUT/manifest.jsonl + OUT/manifest.json, last. `prepare` and `finish` are the steps before and after
the images are made: `generate` runs them around any `make` callable that maps the todo rows to
result rows (by default an ImageMaker in this process); the Ray job (`pipelines.generate`) runs them
around its actor pool.

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

import dataclasses
import datetime
import io
import json
import logging
import struct
import time
import zlib
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from t2i import storage
from t2i.checkpoint import sha256
from t2i.config import EncoderSpec, from_dict
from t2i.data.batching import collate_features
from t2i.errors import StorageError, T2IError
from t2i.eval.grid import write_contact_sheet
from t2i.families import family
from t2i.prompts import PromptFile, expand, id_problem, read_prompts
from t2i.registry import Registry
from t2i.runtime import setup_runtime
from t2i.sampling import generate as sample_images
from t2i.text import TextEncoder, resolve_encoder_path, weights_digest
from t2i.text.encoder import quiet_transformers

log = logging.getLogger("t2i.generate")

IMAGES, ERRORS, ROWS, MANIFEST = "images", "errors.jsonl", "manifest.jsonl", "manifest.json"
JOB, GRID = "job.json", "grid.png"
PNG_KEY = "t2i"  # iTXt keyword of the provenance record inside every PNG
FORMAT = 1
GRID_MAX = 64
MICRO_BATCH = 8  # rows per model call on CPU, whatever the batch size is (see ImageMaker.images)
MAX_DEFAULT_ACTORS = 32  # each CPU actor holds its own model + encoder copy; more only if asked


# ----------------------------------------------------------------------------- PNG with provenance


def png_bytes(image, meta: dict) -> bytes:
    """uint8 [H,W,3] -> PNG bytes with `meta` as an iTXt chunk ahead of the pixels; deterministic."""
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
    fs, path = storage.filesystem(url)
    try:
        head = fs.cat_file(path, start=0, end=1 << 16)  # prompts are capped, so the record fits
    except Exception:
        return None
    return png_meta(head)


# ----------------------------------------------------------------------------- the image maker


def check_encoder(ref: str, path, revision: str) -> None:
    """Refuse a text encoder whose files are not the ones model `ref` was trained on: its card's
    encoder `revision` (t2i.text.weights_digest of the encoder's files) must be the digest of `path`.

    The spec names an encoder by path or hub name, and what lies there can change (a re-download, a
    fine-tune saved over it); features from other weights give the model inputs it never saw. A card
    without a revision has nothing to compare against."""
    if not revision:
        return
    found = weights_digest(path)
    if found != revision:
        raise T2IError(f"model '{ref}': text encoder {path} has digest {found}, but the model was trained with "
                       f"encoder digest {revision} (its card's encoder.revision); refusing to use another encoder")


class ImageMaker:
    """Rows {id, prompt, seed} -> images written to OUT/images; one instance per actor.

    Plain Python: the Ray job's actors and the benchmark's bare loop call the very same object.
    """

    def __init__(self, registry: str, ref: str, digest: str, out: str, steps: int | None = None,
                 guidance: float | None = None, threads: int | None = None, device: str = "auto",
                 cache_size: int = 4096, micro_batch: int = MICRO_BATCH):
        if threads:
            torch.set_num_threads(threads)
        self.runtime = setup_runtime(device)
        self.cfg, self.net, card = Registry(registry).load(ref, map_location=self.runtime.device)
        if model_digest(card) != digest:
            raise RuntimeError(f"model {ref} changed while the job ran (digest {model_digest(card)[:12]} "
                               f"!= {digest[:12]})")
        spec = from_dict(EncoderSpec, card["encoder"])
        check_encoder(card["ref"], resolve_encoder_path(spec.name), spec.revision)  # before loading it
        self.encoder = TextEncoder(spec, device=self.runtime.device)
        self.out, self.ref, self.digest = out, ref, digest
        self.steps, self.guidance = steps, guidance
        # GPUs pick kernels per shape too, but padding every call there costs real throughput: the
        # bitwise guarantee across batch sizes is a CPU one; on a GPU, equal settings reproduce.
        self.micro_batch = micro_batch if self.runtime.device.type == "cpu" else None
        self.cache: OrderedDict = OrderedDict()  # prompt -> (tokens, pooled), least recently used first
        self.cache_size = cache_size

    def encode(self, prompts: list[str]):
        """(tokens list of [L_i, D], pooled [B, D]) for prompts, batch-invariantly.

        Captions are encoded in groups of equal token count, so no caption is ever padded and its
        features do not depend on what else is in the batch. Repeated prompts are encoded once.
        """
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo:
            with quiet_transformers():
                lengths = [len(x) for x in self.encoder.tokenizer(todo)["input_ids"]]
            groups: dict[int, list[str]] = {}
            for p, n in zip(todo, lengths):
                groups.setdefault(n, []).append(p)
            for group in groups.values():
                enc = self.encoder.encode(group)
                for i, p in enumerate(group):
                    self.cache[p] = (enc.tokens[i], enc.pooled[i])
        for p in prompts:
            self.cache.move_to_end(p)
        feats = [self.cache[p] for p in prompts]
        while len(self.cache) > max(self.cache_size, len(prompts)):
            self.cache.popitem(last=False)
        return [f[0] for f in feats], np.stack([f[1] for f in feats])

    def images(self, ids: list[str], prompts: list[str], seeds: list[int]):
        """uint8 [B, H, W, 3] for one batch of rows, computed in calls of exactly `micro_batch` rows.

        CPU kernels pick their code path by shape (a one-row Linear is a GEMV, more rows a GEMM, and
        the two round differently), so a row's pixels could depend on how many rows share its call.
        A fixed call size, padded with copies of the last row, takes that away; which rows share a
        call does not matter (rows never mix).
        """
        tokens, pooled = self.encode(prompts)
        m = self.micro_batch or len(ids)
        out = []
        for s in range(0, len(ids), m):
            n = min(m, len(ids) - s)
            take = list(range(s, s + n)) + [s + n - 1] * (m - n)
            t, mask, p = collate_features([tokens[i] for i in take], pooled[take])
            imgs = sample_images(self.net, self.cfg, t, mask, p, [seeds[i] for i in take],
                                 [ids[i] for i in take], steps=self.steps, guidance=self.guidance)
            out.append(imgs[:n].numpy())
        return np.concatenate(out)

    def __call__(self, batch: dict) -> dict:
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
    return storage.url_join(out, IMAGES, f"{id_}.png")


def model_digest(card: dict) -> str:
    """The sha256 of the sampling weights: what identifies the model's images, whatever its name."""
    return card["files"]["ema.safetensors"]["sha256"]


def record(id_: str, prompt: str, seed: int, ref: str, digest: str, steps, guidance) -> dict:
    return {"id": id_, "prompt": prompt, "seed": int(seed), "model": ref, "digest": digest,
            "steps": steps, "guidance": guidance, "path": f"{IMAGES}/{id_}.png"}


def existing_ids(out: str) -> set[str]:
    """Ids with a finished image in OUT/images (temp files of writes in flight are not .png)."""
    found = set()
    for url in storage.listdir(storage.url_join(out, IMAGES)):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".png") and id_problem(name[:-4]) is None:
            found.add(name[:-4])
    return found


def check_job(out: str, job: dict) -> None:
    """Record the job's model and sampling settings in OUT/job.json on the first run; refuse a rerun
    that would mix images of another model or other settings into the same directory."""
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


def previous_rows(out: str) -> dict[str, dict]:
    """id -> record from OUT/manifest.jsonl as a previous run left it; {} if unreadable."""
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
    old = previous_rows(out) if any(i not in fresh for i in ids) else {}
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
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()
    storage.write_bytes(storage.url_join(out, ROWS), data)
    summary = {**summary, "images": len(rows), "rows": ROWS, "rows_sha256": sha256(data)}
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(storage.url_join(out, MANIFEST), text.encode())


def write_grid(out: str, rows: list[dict]) -> str:
    imgs = [np.asarray(Image.open(io.BytesIO(storage.read_bytes(image_url(out, r["id"])))).convert("RGB"))
            for r in rows[:GRID_MAX]]
    if not imgs:
        return ""
    scale = max(1, 64 // imgs[0].shape[0])
    return write_contact_sheet(storage.url_join(out, GRID), np.stack(imgs), ncol=8, scale=scale)


# ----------------------------------------------------------------------------- a whole job


@dataclasses.dataclass
class Job:
    """One generation job, resolved and checked against its output directory."""
    out: str  # absolute for local paths: Ray actors resolve paths against their own working directory
    registry: str
    ref: str
    digest: str
    family: str
    steps: int | None
    guidance: float | None
    seed: int
    prompts: PromptFile
    todo: list[dict]  # rows {id, prompt, seed} without an image yet
    skipped: int  # valid rows whose image already exists
    started: float  # time.perf_counter() when the job began, for the total time

    def maker_kwargs(self) -> dict:
        """What an ImageMaker for this job is built from (plain data: it travels to Ray actors)."""
        return {"registry": self.registry, "ref": self.ref, "digest": self.digest, "out": self.out,
                "steps": self.steps, "guidance": self.guidance}


def absolute(url: str) -> str:
    return storage.split(url)[1] if storage.is_local(url) else url


def prepare(model: str, prompts: str, out: str, *, registry: str | None = None, steps: int | None = None,
            guidance: float | None = None, seed: int = 0, per_prompt: int = 1) -> Job:
    """Resolve the model and its sampling settings, read the prompt file (`per_prompt` images per
    prompt: ids `ID-0` ...), claim OUT (job.json), write OUT/errors.jsonl and find the rows still to do."""
    if per_prompt < 1:
        raise T2IError(f"--per-prompt must be >= 1, got {per_prompt}")
    started = time.perf_counter()
    out = absolute(out)
    reg = Registry(registry and absolute(registry))
    card = reg.resolve(model)
    ref, digest = card["ref"], model_digest(card)
    if not card.get("encoder"):
        raise T2IError(f"model '{ref}': its card records no text encoder, so prompts cannot be embedded")
    steps, guidance = family(card.get("family")).sampling_settings(card.get("model") or {}, steps, guidance)
    pf = read_prompts(prompts, default_seed=seed)
    pf.rows, more = expand(pf.rows, per_prompt)
    pf.errors += more

    check_job(out, {"format": FORMAT, "model": ref, "digest": digest, "family": card.get("family"),
                    "steps": steps, "guidance": guidance, "seed": seed})
    done = existing_ids(out)
    todo = [{"id": r.id, "prompt": r.prompt, "seed": r.seed} for r in pf.rows if r.id not in done]
    skipped = len(pf.rows) - len(todo)
    storage.write_bytes(storage.url_join(out, ERRORS),
                        "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in pf.errors).encode())
    for e in pf.errors[:5]:
        log.warning("generate: %s row %d%s: %s", storage.describe(prompts), e.row,
                    f" (id {e.id})" if e.id else "", e.reason)
    log.info("generate: %s (%s) on %d prompts: %d to do, %d already in %s, %d bad rows",
             ref, card.get("family"), pf.total, len(todo), skipped, storage.describe(out), len(pf.errors))
    if todo:
        storage.delete(storage.url_join(out, MANIFEST))  # a dir without a manifest reads as unfinished
    return Job(out, reg.url, ref, digest, card.get("family"), steps, guidance, seed, pf, todo, skipped, started)


def finish(job: Job, results: list[dict], seconds: float, grid: bool = False) -> dict:
    """After the images: OUT/manifest.jsonl + manifest.json (and the contact sheet); the summary.

    results: one row {id, prompt, seed, status} per todo row, status "written" or "exists";
    seconds: how long making them took (the images/s figure)."""
    written = [r for r in results if r["status"] == "written"]
    fresh = {r["id"]: record(r["id"], r["prompt"], r["seed"], job.ref, job.digest, job.steps, job.guidance)
             for r in written}
    rows = build_manifest(job.out, fresh)
    extras = {r.id: r.extra for r in job.prompts.rows if r.extra}  # the prompt file's other columns
    rows = [{**r, "extra": extras[r["id"]]} if r["id"] in extras else r for r in rows]
    write_outputs(job.out, rows, {
        "format": FORMAT, "model": job.ref, "digest": job.digest, "family": job.family, "steps": job.steps,
        "guidance": job.guidance, "prompts": storage.describe(job.prompts.url), "errors": len(job.prompts.errors),
        "errors_file": ERRORS, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    grid_url = write_grid(job.out, rows) if grid else ""
    return {"model": job.ref, "written": len(written), "existing": job.skipped + len(results) - len(written),
            "errors": len(job.prompts.errors), "images": len(rows), "grid": grid_url,
            "images_per_s": len(written) / seconds if seconds > 0 else 0.0,
            "seconds": time.perf_counter() - job.started, "out": storage.describe(job.out)}


def local_maker(batch_size: int = 16, device: str = "auto", threads: int | None = None) -> Callable[[Job], list]:
    """A `make` for `generate`: one ImageMaker in this process, batch after batch."""
    def make(job: Job) -> list[dict]:
        maker = ImageMaker(**job.maker_kwargs(), threads=threads, device=device)
        results = []
        for b in range(0, len(job.todo), batch_size):
            rows = job.todo[b:b + batch_size]
            res = maker({k: [r[k] for r in rows] for k in ("id", "prompt", "seed")})
            results += [dict(zip(res, values)) for values in zip(*res.values())]
        return results

    return make


def generate(model: str, prompts: str, out: str, *, make: Callable[[Job], list[dict]] | None = None,
             registry: str | None = None, steps: int | None = None, guidance: float | None = None,
             batch_size: int = 16, seed: int = 0, grid: bool = False, per_prompt: int = 1) -> dict:
    """A whole generation job: `make(job)` maps job.todo rows to result rows {id, prompt, seed,
    status} (default: `local_maker(batch_size)`, in this process); returns finish's summary."""
    if batch_size < 1:
        raise T2IError(f"--batch-size must be >= 1, got {batch_size}")
    job = prepare(model, prompts, out, registry=registry, steps=steps, guidance=guidance, seed=seed,
                  per_prompt=per_prompt)
    results, seconds = [], 0.0
    if job.todo:
        t0 = time.perf_counter()
        results = (make or local_maker(batch_size))(job)
        seconds = time.perf_counter() - t0
    return finish(job, results, seconds, grid=grid)


LOCAL_MAX = 64  # rows still to do that a job runs in its own process unless told otherwise


def runs_here(local: bool | None, cluster: bool, todo: int) -> bool:
    """Whether a job generates in its own process: as asked (`local`), else when it is small and no
    cluster is in play: starting Ray and its actors costs seconds, a one-step image milliseconds."""
    if local is not None:
        return local
    return not cluster and todo <= LOCAL_MAX


def summary_line(s: dict) -> str:
    """What `t2i generate` prints at the end, from `finish`'s summary."""
    return (f"generate: {s['written']} written ({s['images_per_s']:.2f} images/s), {s['existing']} already there, "
            f"{s['errors']} bad prompt rows ({ERRORS}) -> {s['out']} "
            f"[{s['images']} images in manifest{', ' + GRID if s['grid'] else ''}; {s['seconds']:.1f} s]")


def plan_actors(resources: dict, actors: int | None) -> dict:
    """Actor count and per-actor resources. CPU actors get one torch thread each (see the module docstring)
    and fractional CPU slots: whole-CPU actors on a small machine leave no slot for the dataset's
    own tasks and the job stalls without a word."""
    cpus = float(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpus:
        n = actors or gpus
        return {"actors": n, "device": "cuda", "threads": None, "resources": {"num_gpus": 1, "num_cpus": 1}}
    n = actors or max(1, min(int(cpus), MAX_DEFAULT_ACTORS))
    share = max(0.1, min(1.0, (cpus - 0.5) / n))
    return {"actors": n, "device": "cpu", "threads": 1, "resources": {"num_cpus": round(share, 3)}}
