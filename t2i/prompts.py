"""Prompt files for batch generation: txt, jsonl, csv, tsv or parquet, validated row by row.

Formats:
  txt      one prompt per line; the id is the line number, zero-padded ("000001", ...)
  jsonl    one JSON object per line: "prompt" (required), "id" and "seed" (optional)
  csv/tsv  a header row naming "prompt" (or "prompts", any case: DrawBench's and PartiPrompts'
           layouts) and optionally "id" and "seed"
  parquet  columns "prompt" and optionally "id" and "seed"
Any other field or column (a benchmark's category, challenge, note) is kept as the row's `extra`
and carried into the output manifest.

A bad row (empty or over-long prompt, invalid or duplicate id, a line that is not UTF-8, a bad
seed) becomes a `PromptError` naming its row and the reason; the other rows go on. Only a file
that cannot be read at all (missing, unknown format, no `prompt` column) raises.

Ids name output files, so they are held to a strict portable charset and never derived from
prompt text: a hostile id cannot reach outside the output directory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from typing import Any, Iterator

from t2i import storage
from t2i.errors import T2IError

MAX_PROMPT_CHARS = 2000
MAX_ID_CHARS = 128
MAX_SEED = 2**63 - 1
ID_WIDTH = 6  # txt ids: fixed width, so a line keeps its id when the file grows
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
           ".pq": "parquet"}
MAX_EXTRA = 32  # extra fields kept per row
PROMPT_COLUMNS = ("prompt", "prompts")

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # what undecodable bytes become under surrogateescape


@dataclasses.dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    seed: int
    row: int  # 1-based record number in the file (the line number for txt and jsonl)
    extra: dict = dataclasses.field(default_factory=dict)  # the row's other fields, as JSON values


@dataclasses.dataclass(frozen=True)
class PromptError:
    row: int
    id: str | None
    reason: str

    def to_dict(self) -> dict:
        return {"row": self.row, "id": self.id, "reason": self.reason}


@dataclasses.dataclass
class PromptFile:
    url: str
    format: str
    rows: list[PromptRow]
    errors: list[PromptError]

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.errors)


def id_problem(value: str) -> str | None:
    """Why `value` cannot be an output id, or None if it can."""
    if value == "":
        return "empty id"
    if len(value) > MAX_ID_CHARS:
        return f"id longer than {MAX_ID_CHARS} characters ({len(value)})"
    if "/" in value or "\\" in value:
        return "id contains a path separator"
    if ".." in value:
        return "id contains '..'"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "id contains a control character"
    if value.startswith("."):
        return "id starts with '.'"
    if not _ID_RE.fullmatch(value):
        bad = next(c for c in value if not _ID_RE.fullmatch(c))
        return f"id contains {bad!r} (allowed: A-Z a-z 0-9 . _ -)"
    return None


def row_id(row: int) -> str:
    return str(row).zfill(ID_WIDTH)


def detect_format(url: str) -> str:
    lower = url.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    raise T2IError(f"{storage.describe(url)}: unknown prompt file format (use one of: {', '.join(sorted(FORMATS))})")


def read_prompts(url: str, default_seed: int = 0, fmt: str | None = None,
                 max_prompt_chars: int = MAX_PROMPT_CHARS) -> PromptFile:
    """Read and validate a prompt file (local path or any storage URL)."""
    fmt = fmt or detect_format(url)
    if fmt not in set(FORMATS.values()):
        raise T2IError(f"{storage.describe(url)}: unknown prompt file format {fmt!r}")
    data = storage.read_bytes(url)
    where = storage.describe(url)
    records = {"txt": _txt_records, "jsonl": _jsonl_records, "csv": _csv_records, "tsv": _tsv_records,
               "parquet": _parquet_records}[fmt]
    v = _Validator(default_seed, max_prompt_chars)
    for rec in records(data, where):
        v.add(*rec)
    return PromptFile(url=url, format=fmt, rows=v.rows, errors=v.errors)


# A record: (row number, raw id or None, raw prompt, raw seed or None, problem found while parsing or
# None, the other fields).
Record = tuple[int, Any, Any, Any, "str | None", dict]


def _decode(data: bytes) -> str:
    # surrogateescape keeps undecodable bytes visible per line, so one bad line costs only itself.
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _lines(data: bytes) -> list[str]:
    text = _decode(data)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    return [ln.removesuffix("\r") for ln in lines]


def _txt_records(data: bytes, where: str) -> Iterator[Record]:
    for n, line in enumerate(_lines(data), start=1):
        yield n, row_id(n), line, None, None, {}


def _jsonl_records(data: bytes, where: str) -> Iterator[Record]:
    for n, line in enumerate(_lines(data), start=1):
        if not line.strip():
            continue
        if _SURROGATE.search(line):
            yield n, None, None, None, "line is not valid UTF-8", {}
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, None, None, None, f"not valid JSON ({e.msg} at column {e.colno})", {}
            continue
        if not isinstance(obj, dict):
            yield n, None, None, None, f"expected a JSON object, got {type(obj).__name__}", {}
            continue
        extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "seed")}
        yield n, obj.get("id"), obj.get("prompt"), obj.get("seed"), None, extra


def _tsv_records(data: bytes, where: str) -> Iterator[Record]:
    return _csv_records(data, where, delimiter="\t")


def _csv_records(data: bytes, where: str, delimiter: str = ",") -> Iterator[Record]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(_decode(data), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise T2IError(f"{where}: bad {kind} header ({e})") from None
    cols = [h.strip().lower() for h in header]
    prompt_col = next((c for c in PROMPT_COLUMNS if c in cols), None)
    if prompt_col is None:
        raise T2IError(f"{where}: no 'prompt' column in the {kind} header (found: {', '.join(cols) or 'nothing'})")
    pi = cols.index(prompt_col)
    ii = cols.index("id") if "id" in cols else None
    si = cols.index("seed") if "seed" in cols else None
    others = [(j, header[j].strip()) for j in range(len(cols)) if j not in (pi, ii, si)]
    n = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a NUL byte; the reader resumes on the next line
            n += 1
            yield n, None, None, None, f"bad {kind} record ({e})", {}
            continue
        n += 1
        if not fields:
            continue
        if any(_SURROGATE.search(f) for f in fields):
            yield n, None, None, None, "line is not valid UTF-8", {}
            continue
        if len(fields) != len(cols):
            yield n, None, None, None, f"expected {len(cols)} fields, got {len(fields)}", {}
            continue
        extra = {name: fields[j] for j, name in others}
        yield (n, fields[ii] if ii is not None else None, fields[pi], fields[si] if si is not None else None, None,
               extra)


def _parquet_records(data: bytes, where: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # heavy, and only Parquet prompt files need it

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        raise T2IError(f"{where}: not a readable Parquet file ({str(e).splitlines()[0] if str(e) else e})") from None
    if "prompt" not in table.column_names:
        raise T2IError(f"{where}: no 'prompt' column (found: {', '.join(table.column_names)})")
    cols = {c: table.column(c).to_pylist() for c in ("id", "prompt", "seed") if c in table.column_names}
    others = {c: table.column(c).to_pylist() for c in table.column_names if c not in cols}
    for i in range(table.num_rows):
        prompt = cols["prompt"][i]
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError:
                yield i + 1, None, None, None, "prompt is not valid UTF-8", {}
                continue
        extra = {c: v[i] for c, v in others.items()}
        yield (i + 1, cols["id"][i] if "id" in cols else None, prompt, cols["seed"][i] if "seed" in cols else None,
               None, extra)


class _Validator:
    def __init__(self, default_seed: int, max_prompt_chars: int):
        self.default_seed, self.max_chars = int(default_seed), max_prompt_chars
        self.rows: list[PromptRow] = []
        self.errors: list[PromptError] = []
        self.seen: dict[str, int] = {}  # casefolded id -> row: ids differing only in case collide on macOS/Windows

    def add(self, n: int, raw_id: Any, prompt: Any, raw_seed: Any, problem: str | None, extra: dict) -> None:
        shown_id = _shown(raw_id)
        if problem:
            self.errors.append(PromptError(n, shown_id, problem))
            return
        rid, why = _clean_id(raw_id, n)
        if why:
            self.errors.append(PromptError(n, shown_id, why))
            return
        why = self._prompt_problem(prompt)
        if why is None:
            seed, why = _clean_seed(raw_seed, self.default_seed)
        if why is None:
            key = rid.casefold()
            if key in self.seen:
                first = self.seen[key]
                why = f"duplicate id (first used on row {first})"
            else:
                self.seen[key] = n
        if why:
            self.errors.append(PromptError(n, rid, why))
            return
        self.rows.append(PromptRow(id=rid, prompt=prompt.strip(), seed=seed, row=n, extra=_clean_extra(extra)))

    def _prompt_problem(self, prompt: Any) -> str | None:
        if prompt is None:
            return "missing prompt"
        if not isinstance(prompt, str):
            return f"prompt must be a string, got {type(prompt).__name__}"
        if _SURROGATE.search(prompt):
            return "line is not valid UTF-8"
        if not prompt.strip():
            return "empty prompt"
        if len(prompt) > self.max_chars:
            return f"prompt longer than {self.max_chars} characters ({len(prompt)})"
        return None


def _clean_extra(extra: dict) -> dict:
    """The row's other fields as bounded JSON values: they end up in the manifest and the PNGs."""
    out = {}
    for k, v in list(extra.items())[:MAX_EXTRA]:
        if not isinstance(v, (str, int, float, bool)) and v is not None:
            v = json.loads(json.dumps(v, default=str))  # nested JSON stays; anything else becomes text
        text = json.dumps(v, ensure_ascii=False)
        out[str(k)[:MAX_ID_CHARS]] = v if len(text) <= MAX_PROMPT_CHARS else text[:MAX_PROMPT_CHARS]
    return out


def expand(rows: list[PromptRow], per_prompt: int) -> tuple[list[PromptRow], list[PromptError]]:
    """N images per prompt: row `id` becomes ids `id-0` .. `id-(N-1)` (same prompt and seed; the id
    alone changes the noise), each recording its `prompt_id` and `sample` in its extra."""
    if per_prompt == 1:
        return rows, []
    out, errors = [], []
    for r in rows:
        ids = [f"{r.id}-{k}" for k in range(per_prompt)]
        problem = next((p for p in map(id_problem, ids) if p), None)
        if problem:
            errors.append(PromptError(r.row, r.id, f"--per-prompt {per_prompt}: {problem}"))
            continue
        out += [dataclasses.replace(r, id=i, extra={**r.extra, "prompt_id": r.id, "sample": k})
                for k, i in enumerate(ids)]
    return out, errors


def _shown(raw_id: Any) -> str | None:
    """The id as it may appear in an error record: printable, bounded, never raw bytes."""
    if raw_id is None or isinstance(raw_id, bool):
        return None
    s = str(raw_id)
    s = s.encode("utf-8", errors="backslashreplace").decode("utf-8")
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if len(s) <= 80 else s[:77] + "..."


def _clean_id(raw_id: Any, n: int) -> tuple[str, str | None]:
    if raw_id is None or (isinstance(raw_id, str) and raw_id == ""):
        return row_id(n), None  # no id: the row number names it
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return "", f"id must be a string or an integer, got {type(raw_id).__name__}"
    rid = str(raw_id)
    if _SURROGATE.search(rid):
        return "", "id is not valid UTF-8"
    return rid, id_problem(rid)


def _clean_seed(raw: Any, default: int) -> tuple[int, str | None]:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default, None
    if isinstance(raw, bool):
        return 0, f"bad seed {raw!r} (expected an integer 0..2^63-1)"
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str) and re.fullmatch(r"\s*\d+\s*", raw):
        raw = int(raw)
    if not isinstance(raw, int) or not 0 <= raw <= MAX_SEED:
        shown = raw if not isinstance(raw, str) or len(raw) <= 40 else raw[:37] + "..."
        return 0, f"bad seed {shown!r} (expected an integer 0..2^63-1)"
    return raw, None
