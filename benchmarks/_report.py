"""What every benchmark script shares: each owns one marked section of BENCHMARKS.md and rewrites
only that section, so the scripts can run in any order and a person can read the file whole."""

from __future__ import annotations

import subprocess
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `body` between `<!-- name -->` and `<!-- /name -->` in `path`, replacing what was there
    (or appending the section if the file does not have it yet)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def git_commit() -> str:
    """The short commit the benchmark ran at ("" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS_MD.parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
