"""A real image-caption set from Debian icon themes: PNG icons captioned by their names.

    python -m t2i.data.icons --out data/icons [--package oxygen-icon-theme,moka-icon-theme] [--size 48]

The default combines five themes of different styles (DEFAULT_PACKAGE: 2,218 icons at 48 px once
repeats are dropped, against 1,285 for oxygen alone), so that a 20% held-out split still holds
~440 pictures: Fréchet distances on fewer images are dominated by their small-sample bias.

Freedesktop icon themes keep each icon as `<theme>/<S>x<S>/<context>/<name>.png`. A theme's
`.deb` is fetched once with `apt-get download` into a cache folder (or given with `--deb`, or an
unpacked theme folder with `--tree`), read in memory (an `ar` archive holding `data.tar.*`; nothing
is extracted to disk), and each icon becomes one sample:

  - the image: the icon at `--size` px, else at the first of FALLBACK_SIZES it exists at, resized to
    `--size` (Lanczos); alpha composited on white, written as an RGB PNG;
  - the caption: its name's words, then a phrase for its context folder, e.g.
    `apps/accessories-calculator.png` -> "accessories calculator, application icon".

Symlinks are aliases of another icon (another name, the same picture) and are left out, as is any
icon whose pixels or caption repeat one already taken (first in (context, name) order wins), so no
picture or caption appears twice and a held-out split never sees a training image again. The
`emotes` context (smileys) is left out: it is too close to the colour emoji kept for acceptance
checks elsewhere; `animations` are sprite strips, not one picture.

Shards are written with the shapes set's writer (`t2i.data.shapes.shard_bytes`): `{key}.png`,
`{key}.txt` (the caption) and `{key}.json` (context, name, source size, path); keys are
`{context}-{name}` with anything but letters, digits, `_` and `-` made `_`, so a key (and its
held-out split) does not change between runs. `icons.json`, written last, records the package,
its version and the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from t2i import storage
from t2i.data.shapes import encode_png, prepare_out, shard_bytes
from t2i.errors import ConfigError, T2IError

# Themes whose icons are PNGs at 48 px (most newer themes are SVG only), first theme first where names repeat.
DEFAULT_PACKAGE = "oxygen-icon-theme,moka-icon-theme,mate-icon-theme,gnome-icon-theme,lxde-icon-theme"
DEFAULT_SIZE = 48
# Where an icon missing at --size is taken from, in this order: larger artwork first (downscaling
# keeps detail), then 32 px, never the tiny 16/22 px pictograms.
FALLBACK_SIZES = (64, 128, 256, 32)
CACHE = Path(os.environ.get("T2I_CACHE", Path.home() / ".cache" / "t2i")) / "debs"
INFO_FILE = "icons.json"
CONTEXT_PHRASES = {
    "actions": "action icon", "animations": "animation", "applets": "applet icon", "apps": "application icon",
    "categories": "menu category icon", "devices": "device icon", "emblems": "emblem icon",
    "emotes": "emoticon", "intl": "flag icon", "mimetypes": "file type icon", "places": "place icon",
    "status": "status icon",
}
EXCLUDED_CONTEXTS = ("emotes", "animations")
# MIME boilerplate that says nothing about the picture: application/x-perl -> "application perl".
MIME_NOISE = {"x", "vnd"}
_SIZE_DIR = re.compile(r"^(\d+)x(\d+)$")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
_AR_MAGIC = b"!<arch>\n"


@dataclass(frozen=True)
class Icon:
    context: str
    name: str
    size: int  # the size folder the PNG came from
    path: str  # its path in the package or tree
    data: bytes
    package: str = ""  # the theme it came from (several may be combined)


# ------------------------------------------------------------------------------------ sources

def fetch_deb(package: str = DEFAULT_PACKAGE, cache: Path | str = CACHE) -> Path:
    """The package's .deb in `cache`, fetched with `apt-get download` unless one is there already."""
    cache = Path(cache).expanduser()
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    how = (f"run `apt-get update && cd {cache} && apt-get download {package}` (Debian/Ubuntu), or pass --deb PATH "
           "to the package's .deb, or --tree DIR to an unpacked icon theme")
    if shutil.which("apt-get") is None:
        raise T2IError(f"cannot fetch {package}: no apt-get on this machine; {how}")
    r = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True, timeout=600)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if r.returncode != 0 or not found:
        why = (r.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise T2IError(f"cannot fetch {package} ({why}); {how}")
    return found[-1]


def ar_members(path: Path | str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of an `ar` archive (a .deb is one): 60-byte headers, bodies
    padded to an even length; GNU `name/` and BSD `#1/len` names are both read."""
    with open(path, "rb") as f:
        if f.read(8) != _AR_MAGIC:
            raise T2IError(f"{path}: not a .deb (no ar archive signature)")
        while True:
            header = f.read(60)
            if not header:
                return
            size_field = header[48:58].strip()
            if len(header) < 60 or header[58:60] != b"`\n" or not size_field.isdigit():
                raise T2IError(f"{path}: damaged ar header")
            name, size = header[:16].decode("ascii", "replace").strip(), int(size_field)
            body = f.read(size)
            if len(body) < size:
                raise T2IError(f"{path}: cut short inside member {name!r}")
            if name.startswith("#1/"):  # BSD: the name is the start of the body
                n = int(name[3:])
                name, body = body[:n].decode("utf-8", "replace").rstrip("\0"), body[n:]
            yield name.rstrip("/"), body
            if size % 2:
                f.read(1)


def _open_tar(name: str, body: bytes, deb: Path | str) -> tarfile.TarFile:
    if name.endswith(".zst"):
        # Python's tarfile has no zstd before 3.14 (newer Ubuntu packages use it): dpkg-deb does.
        if shutil.which("dpkg-deb") is None:
            raise T2IError(f"{deb}: {name} is zstd-compressed; install dpkg (dpkg-deb) or unpack it and use --tree")
        flag = "--ctrl-tarfile" if name.startswith("control") else "--fsys-tarfile"
        raw = subprocess.run(["dpkg-deb", flag, str(deb)], capture_output=True, check=True).stdout
        return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
    return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")


def deb_files(deb: Path | str) -> tuple[dict, Iterator[tuple[str, bytes]]]:
    """({"package", "version"} from the control file, (path, bytes) of every regular file in the
    package's data archive). Links are left out: an icon theme's symlinks are aliases."""
    control, data = {}, None
    for name, body in ar_members(deb):
        if name.startswith("control.tar"):
            with _open_tar(name, body, deb) as tar:
                for m in tar.getmembers():
                    if m.isfile() and m.name.lstrip("./") == "control":
                        text = tar.extractfile(m).read().decode("utf-8", "replace")
                        control = dict(re.findall(r"^(Package|Version): *(.+)$", text, re.M))
        elif name.startswith("data.tar"):
            data = (name, body)
    if data is None:
        raise T2IError(f"{deb}: no data.tar member; not a binary package")
    meta = {"package": control.get("Package", ""), "version": control.get("Version", ""), "source": str(deb)}

    def files() -> Iterator[tuple[str, bytes]]:
        with _open_tar(data[0], data[1], deb) as tar:
            for m in tar:
                if m.isfile():
                    yield m.name.lstrip("./"), tar.extractfile(m).read()

    return meta, files()


def tree_files(root: Path | str) -> Iterator[tuple[str, bytes]]:
    """(path relative to `root`, bytes) of every regular file under an unpacked theme; symlinks
    (aliases) are not followed."""
    root = Path(root)
    if not root.is_dir():
        raise T2IError(f"{root}: no such directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath, fn)
            if p.is_file() and not p.is_symlink():
                yield p.relative_to(root).as_posix(), p.read_bytes()


# ------------------------------------------------------------------------------ icons -> samples

def parse_icon_path(path: str) -> tuple[int, str, str] | None:
    """(size, context, name) of `.../<S>x<S>/<context>/<name>.png`, or None for anything else
    (non-square or scaled `@2x` folders, other files)."""
    parts = path.split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(".png"):
        return None
    m = _SIZE_DIR.match(parts[-3])
    if not m or m.group(1) != m.group(2):
        return None
    return int(m.group(1)), parts[-2], parts[-1][:-4]


def caption(name: str, context: str) -> str:
    """"accessories-calculator", "apps" -> "accessories calculator, application icon"."""
    words = [w for w in re.split(r"[-_.+\s]+", name.lower()) if w]
    if context == "mimetypes":
        words = [w for w in words if w not in MIME_NOISE] or words
    return f"{' '.join(words)}, {CONTEXT_PHRASES.get(context, context + ' icon')}"


def sample_key(context: str, name: str) -> str:
    # Dots would end the key early: a WebDataset key runs to the first dot of the member name.
    return _UNSAFE_KEY.sub("_", f"{context}-{name}")[:120]


def on_white(data: bytes, size: int | None = None) -> np.ndarray:
    """uint8 [S, S, 3]: a PNG's pixels with alpha composited on white (palette transparency too),
    resized to `size` (Lanczos, after compositing) unless it is that size already."""
    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if size and out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out)


def select_icons(files: Iterable[tuple[str, bytes]], size: int = DEFAULT_SIZE,
                 fallback: tuple[int, ...] = FALLBACK_SIZES,
                 exclude: tuple[str, ...] = EXCLUDED_CONTEXTS) -> list[Icon]:
    """One icon per (context, name): at `size`, else at the first `fallback` size that has it;
    sorted by (context, name)."""
    order = {s: i for i, s in enumerate((size, *[f for f in fallback if f != size]))}
    best: dict[tuple[str, str], Icon] = {}
    for path, data in files:
        parsed = parse_icon_path(path)
        if parsed is None or parsed[0] not in order or parsed[1] in exclude:
            continue
        s, context, name = parsed
        have = best.get((context, name))
        if have is None or order[s] < order[have.size]:
            best[(context, name)] = Icon(context, name, s, path, data)
    return [best[k] for k in sorted(best)]


def icon_samples(icons: Iterable[Icon], size: int = DEFAULT_SIZE) -> tuple[list[dict], dict]:
    """(WebDataset sample dicts, counts): each icon composited on white at `size`, captioned;
    repeated pixels, captions and keys are dropped (counted in counts["skipped"]), and PNGs that do
    not decode are skipped as "unreadable"."""
    samples, seen = [], {"pixels": set(), "caption": set(), "key": set()}
    skipped = {"unreadable": 0, "duplicate_pixels": 0, "duplicate_caption": 0, "duplicate_key": 0}
    by_context: dict[str, int] = {}
    for icon in icons:
        try:
            rgb = on_white(icon.data, size)
        except Exception:  # noqa: BLE001 (PIL raises many types for bad files; the count says how many)
            skipped["unreadable"] += 1
            continue
        text, key = caption(icon.name, icon.context), sample_key(icon.context, icon.name)
        digest = hashlib.sha256(rgb.tobytes()).digest()
        why = ("duplicate_pixels" if digest in seen["pixels"] else "duplicate_caption" if text in seen["caption"]
               else "duplicate_key" if key in seen["key"] else None)
        if why:
            skipped[why] += 1
            continue
        seen["pixels"].add(digest)
        seen["caption"].add(text)
        seen["key"].add(key)
        by_context[icon.context] = by_context.get(icon.context, 0) + 1
        meta = {"context": icon.context, "name": icon.name, "source_size": icon.size, "path": icon.path,
                "package": icon.package}
        samples.append({"__key__": key, "png": encode_png(rgb), "txt": text.encode(),
                        "json": json.dumps(meta, sort_keys=True).encode()})
    return samples, {"kept": len(samples), "skipped": skipped, "by_context": dict(sorted(by_context.items()))}


def write_icons(sources: Iterable[tuple[dict, Iterable[tuple[str, bytes]]]], out: str, *, size: int = DEFAULT_SIZE,
                shard_size: int = 500, overwrite: bool = False) -> dict:
    """Icons from each (source meta, files) pair (`deb_files` or a tree's `tree_files`), in order, as
    WebDataset shards `{00000..}.tar` under `out`, then `icons.json` (returned). Where themes share an
    icon name (the same caption) the first source's picture is kept. A non-empty `out` is refused unless
    `overwrite`, which removes only the shards and info file a previous run wrote."""
    if size < 8 or shard_size < 1:
        raise ConfigError(f"--size ({size}) must be >= 8 and --shard-size ({shard_size}) >= 1")
    prepare_out(out, overwrite, INFO_FILE, clear=False)  # refused before the icons are read ...
    metas, selected = [], []
    for meta, files in sources:
        picked = select_icons(files, size)
        metas.append({**meta, "icons": len(picked)})
        name = meta.get("package") or meta.get("source", "")
        selected += [dataclasses.replace(icon, package=name) for icon in picked]
    samples, counts = icon_samples(selected, size)
    if not samples:
        where = ", ".join(m.get("source", "the input") for m in metas)
        raise T2IError(f"no {size}x{size} (or fallback-size) PNG icons found in {where}")
    prepare_out(out, True, INFO_FILE)  # ... and the old shards removed only once there are new ones
    shards = []
    for si in range(0, len(samples), shard_size):
        url = storage.url_join(out, f"{si // shard_size:05d}.tar")
        storage.write_bytes(url, shard_bytes(samples[si:si + shard_size]))
        shards.append(url.rsplit("/", 1)[-1])
    joined = {k: ",".join(m.get(k, "") for m in metas) for k in ("package", "version", "source")}
    info = {"dataset": "icons", **joined, "sources": metas, "size": size, "fallback_sizes": list(FALLBACK_SIZES),
            "excluded_contexts": list(EXCLUDED_CONTEXTS), "shard_size": shard_size, "shards": shards, **counts}
    storage.write_text(storage.url_join(out, INFO_FILE), json.dumps(info, indent=1))
    return info


def read_info(out: str) -> dict | None:
    """The icons.json of a finished set at `out`, or None."""
    url = storage.url_join(out, INFO_FILE)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def build(out: str, *, package: str = DEFAULT_PACKAGE, deb: str | None = None, tree: str | None = None,
          cache: str | Path = CACHE, size: int = DEFAULT_SIZE, shard_size: int = 500,
          overwrite: bool = False) -> dict:
    """The whole script: theme folders (`tree`), .debs (`deb`), or the `package`s fetched into `cache`;
    each may be a comma-separated list, read in that order."""
    if tree:
        sources = [({"package": "", "version": "", "source": t}, tree_files(t)) for t in _names(tree, "--tree")]
    else:
        debs = _names(deb, "--deb") if deb else [fetch_deb(p, cache) for p in _names(package, "--package")]
        sources = (deb_files(d) for d in debs)  # one package's files in memory at a time
    return write_icons(sources, out, size=size, shard_size=shard_size, overwrite=overwrite)


def _names(value: str, option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ConfigError(f"{option} {value!r}: give one name or a comma-separated list")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i.data.icons", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory or s3:// prefix for the shards")
    p.add_argument("--package", default=DEFAULT_PACKAGE, help="Debian icon theme packages, comma-separated; where "
                   f"names repeat the first theme's icon is kept ({DEFAULT_PACKAGE})")
    p.add_argument("--deb", help="use these .debs (comma-separated) instead of fetching --package")
    p.add_argument("--tree", help="unpacked icon theme folders, comma-separated (e.g. /usr/share/icons/oxygen/base)")
    p.add_argument("--cache", default=str(CACHE), help=f"where fetched .debs are kept ({CACHE})")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"icon size in px ({DEFAULT_SIZE})")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (500)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of an existing set at --out")
    args = p.parse_args(argv)
    try:
        info = build(args.out, package=args.package, deb=args.deb, tree=args.tree, cache=args.cache,
                     size=args.size, shard_size=args.shard_size, overwrite=args.overwrite)
    except T2IError as e:
        print(f"icons: error: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items() if v) or "none"
    print(f"icons: {info['kept']} icons at {info['size']} px from {info['package'] or info['source']} "
          f"{info['version']} in {len(info['shards'])} shards -> {storage.describe(args.out)} (skipped: {skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
