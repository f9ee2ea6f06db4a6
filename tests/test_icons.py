"""The icon-theme data script (t2i.data.icons) on a small icon theme made here: captions from
names and context folders, alpha on white, one size with fallbacks, aliases and repeats left
out, and shards that the embed job's reader keeps whole. Also a .deb built here (ar + tar.xz),
read without dpkg. No network."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i.data import icons
from t2i.data.embed import shard_rows
from t2i.data.shards import expand_shards
from t2i.errors import ConfigError, T2IError


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rgba(size: int, colour: tuple[int, int, int, int], box: tuple[int, int, int, int] | None = None) -> bytes:
    """A transparent square with an opaque-or-translucent `colour` box (the whole icon if no box)."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    im.paste(colour, box or (0, 0, size, size))
    return png(im)


def palette_with_transparency(size: int) -> bytes:
    """A palette PNG whose index 0 is transparent (tRNS), the rest green."""
    im = Image.new("P", (size, size), 1)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    im.paste(0, (0, 0, size // 2, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


# What each file of the fake theme should become (None: left out).
THEME = {
    "48x48/apps/accessories-calculator.png": (rgba(48, (255, 0, 0, 128), (8, 8, 40, 40)),
                                              "accessories calculator, application icon"),
    "48x48/mimetypes/application-x-perl.png": (rgba(48, (0, 0, 255, 255), (0, 0, 24, 48)),
                                               "application perl, file type icon"),
    "48x48/actions/go-next.png": (palette_with_transparency(48), "go next, action icon"),
    "48x48/actions/view.calendar_day.png": (rgba(48, (10, 20, 30, 255), (4, 4, 20, 20)),
                                            "view calendar day, action icon"),
    "64x64/places/folder-blue.png": (rgba(64, (0, 90, 200, 255), (0, 16, 64, 64)), "folder blue, place icon"),
    "16x16/places/folder-blue.png": (rgba(16, (255, 255, 0, 255)), None),  # a size never taken
    "16x16/apps/only-tiny.png": (rgba(16, (0, 255, 0, 255)), None),  # only at 16 px: no fallback to it
    "48x48/emotes/face-smile.png": (rgba(48, (250, 200, 0, 255), (10, 10, 38, 38)), None),  # excluded context
    "48x48/actions/go-next-copy.png": (palette_with_transparency(48), None),  # the same pixels as go-next
    "48x48/status/broken.png": (b"not a png at all", None),  # unreadable
    "index.theme": (b"[Icon Theme]\nName=Fake\n", None),
}


@pytest.fixture()
def theme(tmp_path) -> Path:
    root = tmp_path / "fake-theme"
    for rel, (data, _) in THEME.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # An alias, as themes ship them: another name for the same picture, never a sample of its own.
    (root / "48x48/apps/calculator.png").symlink_to("accessories-calculator.png")
    return root


def test_captions_from_names_and_contexts():
    assert icons.caption("accessories-calculator", "apps") == "accessories calculator, application icon"
    assert icons.caption("application-vnd.oasis.opendocument-text", "mimetypes") == \
        "application oasis opendocument text, file type icon"
    assert icons.caption("x-office-document", "mimetypes") == "office document, file type icon"
    assert icons.caption("Weird_Name+1", "widgets") == "weird name 1, widgets icon"
    assert icons.parse_icon_path("usr/share/icons/oxygen/base/48x48/apps/kate.png") == (48, "apps", "kate")
    assert icons.parse_icon_path("usr/share/icons/x/48x32/apps/kate.png") is None
    assert icons.parse_icon_path("usr/share/icons/x/48x48@2x/apps/kate.png") is None
    assert icons.sample_key("actions", "view.calendar day") == "actions-view_calendar_day"


def test_alpha_is_composited_on_white():
    img = icons.on_white(rgba(48, (255, 0, 0, 128), (8, 8, 40, 40)))
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all()  # fully transparent -> white
    r, g, b = (int(v) for v in img[20, 20])
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half-transparent red over white
    pal = icons.on_white(palette_with_transparency(48))
    assert (pal[:, :24] == 255).all() and (pal[:, 24:] == (0, 200, 0)).all()  # tRNS transparency too
    assert icons.on_white(rgba(64, (0, 0, 0, 255)), 48).shape == (48, 48, 3)  # resized after compositing


def test_theme_to_shards_that_embed_reads_whole(theme, tmp_path):
    out = str(tmp_path / "shards")
    info = icons.build(out, tree=str(theme), size=48, shard_size=2)
    want = {caption for _, caption in THEME.values() if caption}
    assert info["kept"] == len(want) == 5
    assert info["skipped"] == {"unreadable": 1, "duplicate_pixels": 1, "duplicate_caption": 0, "duplicate_key": 0}
    assert info["by_context"] == {"actions": 2, "apps": 1, "mimetypes": 1, "places": 1}
    assert json.loads((tmp_path / "shards" / icons.INFO_FILE).read_text()) == info
    urls = expand_shards(out)
    assert len(urls) == 3 == len(info["shards"])

    captions, keys, images = {}, [], {}
    for i, url in enumerate(urls):
        for table in shard_rows(url, i, 32):
            assert table.column("reason").to_pylist() == [""] * table.num_rows  # every sample kept
            for key, cap, img in zip(table.column("key").to_pylist(), table.column("caption").to_pylist(),
                                     table.column("image").to_pylist()):
                captions[key], images[key] = cap, np.frombuffer(img, np.uint8).reshape(32, 32, 3)
                keys.append(key)
    assert set(captions.values()) == want and len(keys) == len(set(keys)) == 5
    assert "places-folder-blue" in keys and "actions-view_calendar_day" in keys
    assert (images["apps-accessories-calculator"][0, 0] == 255).all()  # the shard holds RGB on white

    # The JSON member says where each picture came from: folder-blue from the 64 px fallback.
    metas = {}
    for url in urls:
        with tarfile.open(url) as tar:
            metas.update({m.name[:-5]: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")})
    assert metas["places-folder-blue"]["source_size"] == 64
    assert metas["apps-accessories-calculator"]["source_size"] == 48
    with pytest.raises(T2IError, match="not empty"):
        icons.build(out, tree=str(theme))


def test_themes_combine_first_one_wins(theme, tmp_path):
    """Several themes in one set: a name the first theme has already is left out of the second (the same
    caption); new names are added; icons.json lists each source and every sample names its own."""
    second = tmp_path / "second-theme"
    for rel, data in {"48x48/apps/accessories-calculator.png": rgba(48, (0, 200, 0, 255), (2, 2, 30, 30)),
                      "48x48/devices/printer.png": rgba(48, (90, 90, 90, 255), (6, 12, 42, 36))}.items():
        (second / rel).parent.mkdir(parents=True, exist_ok=True)
        (second / rel).write_bytes(data)
    out = tmp_path / "both"
    info = icons.build(str(out), tree=f"{theme},{second}")
    assert info["kept"] == 6 and info["skipped"]["duplicate_caption"] == 1
    assert [(m["source"], m["icons"]) for m in info["sources"]] == [(str(theme), 7), (str(second), 2)]
    metas = {}
    for url in expand_shards(str(out)):
        with tarfile.open(url) as tar:
            metas.update({m.name[:-5]: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")})
    assert metas["apps-accessories-calculator"]["package"] == str(theme)  # the first theme's picture
    assert metas["devices-printer"]["package"] == str(second)
    with pytest.raises(ConfigError, match="--tree"):
        icons.build(str(tmp_path / "none"), tree=" , ")


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    return bytes(out)


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("./usr/share/icons/fake/48x48/apps/alias.png")
        link.type, link.linkname = tarfile.SYMTYPE, "kate.png"
        tar.addfile(link)
    return buf.getvalue()


def test_a_deb_is_read_in_memory(tmp_path):
    """A .deb as dpkg writes one (ar: debian-binary, control.tar.xz, data.tar.xz); a cached .deb is
    used without fetching anything."""
    icon = rgba(48, (0, 128, 0, 255), (4, 4, 44, 44))
    deb = tmp_path / "cache" / "fake-icon-theme_1.2-3_all.deb"
    deb.parent.mkdir()
    deb.write_bytes(_ar([
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", _tar_xz({"./control": b"Package: fake-icon-theme\nVersion: 1.2-3\nArchitecture: all\n"})),
        ("data.tar.xz", _tar_xz({"./usr/share/icons/fake/48x48/apps/kate.png": icon,
                                 "./usr/share/doc/fake-icon-theme/copyright": b"free\n"})),
    ]))
    assert icons.fetch_deb("fake-icon-theme", deb.parent) == deb
    meta, files = icons.deb_files(deb)
    assert (meta["package"], meta["version"]) == ("fake-icon-theme", "1.2-3")
    files = dict(files)
    assert set(files) == {"usr/share/icons/fake/48x48/apps/kate.png", "usr/share/doc/fake-icon-theme/copyright"}
    info = icons.build(str(tmp_path / "out"), package="fake-icon-theme", cache=deb.parent)
    assert (info["kept"], info["package"], info["version"]) == (1, "fake-icon-theme", "1.2-3")


def test_unfetchable_package_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on this PATH
    with pytest.raises(T2IError) as e:
        icons.fetch_deb("oxygen-icon-theme", tmp_path / "cache")
    assert "apt-get download oxygen-icon-theme" in str(e.value) and "--deb" in str(e.value)
    assert "\n" not in str(e.value)
