"""Prompt files: each format, each validation rule, and one bad row never costing the others."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t2i import storage
from t2i.errors import T2IError
from t2i.prompts import MAX_ID_CHARS, MAX_PROMPT_CHARS, PromptRow, expand, id_problem, read_prompts


def reasons(pf) -> dict:
    return {e.row: e.reason for e in pf.errors}


def test_txt_ids_are_zero_padded_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\r\n  a blue square  \n\na green triangle\n")
    pf = read_prompts(str(f), default_seed=7)
    assert pf.format == "txt"
    assert [(r.id, r.prompt, r.seed, r.row) for r in pf.rows] == [
        ("000001", "a red circle", 7, 1), ("000002", "a blue square", 7, 2), ("000004", "a green triangle", 7, 4)]
    assert [(e.row, e.id, e.reason) for e in pf.errors] == [(3, "000003", "empty prompt")]


def test_txt_invalid_utf8_line_costs_only_that_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbfone\nbad \xff\xfe line\nthree\n")
    pf = read_prompts(str(f))
    assert [r.prompt for r in pf.rows] == ["one", "three"]  # the BOM is not part of the first prompt
    assert reasons(pf) == {2: "line is not valid UTF-8"}


def test_jsonl_ids_seeds_and_defaults(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [
        {"id": "cat-1", "prompt": "a cat", "seed": 5},
        {"prompt": "no id here"},
        {"id": 42, "prompt": "integer id", "seed": "9"},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    pf = read_prompts(str(f), default_seed=3)
    assert [(r.id, r.prompt, r.seed, r.row) for r in pf.rows] == [
        ("cat-1", "a cat", 5, 1), ("000002", "no id here", 3, 2), ("42", "integer id", 9, 3)]
    assert pf.errors == []


def test_jsonl_bad_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"id": "ok", "prompt": "fine"}\n'
                  b'{"id": "x", "prompt": \n'
                  b'[1, 2]\n'
                  b'{"id": "u", "prompt": "caf\xe9"}\n'
                  b'{"id": "s", "prompt": "lone \\udc80 surrogate"}\n'
                  b'{"id": "t", "prompt": 12}\n'
                  b'{"id": "m"}\n')
    pf = read_prompts(str(f))
    assert [r.id for r in pf.rows] == ["ok"]
    r = reasons(pf)
    assert r[2].startswith("not valid JSON")
    assert r[3] == "expected a JSON object, got list"
    assert r[4] == "line is not valid UTF-8"
    assert r[5] == "line is not valid UTF-8"
    assert r[6] == "prompt must be a string, got int"
    assert r[7] == "missing prompt"


def test_csv_with_header_quotes_and_bad_records(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes(b'ID,Prompt,seed\n'
                  b'a,"a red circle, on blue",1\n'
                  b'b,"multi\nline prompt",\n'
                  b'c,too,many,fields\n'
                  b'd,bad \xff bytes,2\n'
                  b',no id given,3\n')
    pf = read_prompts(str(f), default_seed=11)
    assert [(r.id, r.prompt, r.seed) for r in pf.rows] == [
        ("a", "a red circle, on blue", 1), ("b", "multi\nline prompt", 11), ("000005", "no id given", 3)]
    assert reasons(pf) == {3: "expected 3 fields, got 4", 4: "line is not valid UTF-8"}


def test_csv_without_prompt_column_is_one_line_error(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,text\na,b\n")
    with pytest.raises(T2IError, match=r"p\.csv: no 'prompt' column"):
        read_prompts(str(f))


def test_parquet(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", None, "../x"], "prompt": ["one", "two", "three"], "seed": [1, None, 3]}), f)
    pf = read_prompts(str(f), default_seed=4)
    assert [(r.id, r.prompt, r.seed) for r in pf.rows] == [("a", "one", 1), ("000002", "two", 4)]
    assert [(e.row, e.id) for e in pf.errors] == [(3, "../x")]
    bad = tmp_path / "q.parquet"
    pq.write_table(pa.table({"text": ["x"]}), bad)
    with pytest.raises(T2IError, match=r"q\.parquet: no 'prompt' column"):
        read_prompts(str(bad))


def test_parquet_on_s3(s3):
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a red circle", ""]}), buf)
    storage.write_bytes(f"{s3}/p.parquet", buf.getvalue())
    pf = read_prompts(f"{s3}/p.parquet")
    assert [(r.id, r.prompt) for r in pf.rows] == [("000001", "a red circle")]
    assert reasons(pf) == {2: "empty prompt"}


@pytest.mark.parametrize("value,fragment", [
    ("", "empty id"),
    ("../x", "path separator"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("..", "'..'"),
    ("a..b", "'..'"),
    ("a\x00b", "control character"),
    ("tab\there", "control character"),
    (".hidden", "starts with '.'"),
    ("x" * (MAX_ID_CHARS + 1), "longer than"),
    ("sp ace", "' '"),
    ("ünï", "'ü'"),
    ("a:b", "':'"),
])
def test_id_rules(value, fragment):
    assert fragment in id_problem(value)


@pytest.mark.parametrize("value", ["a", "A-b_c.9", "x" * MAX_ID_CHARS, "0001"])
def test_good_ids(value):
    assert id_problem(value) is None


def test_every_row_rule_in_one_file(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [
        {"id": "good", "prompt": "a red circle"},
        {"id": "../x", "prompt": "escape"},
        {"id": "a/b", "prompt": "nested"},
        {"id": "e", "prompt": "   "},
        {"id": "long", "prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        {"id": "good", "prompt": "again"},
        {"id": "GOOD", "prompt": "case twin"},
        {"id": "s1", "prompt": "p", "seed": -1},
        {"id": "s2", "prompt": "p", "seed": 2**63},
        {"id": "s3", "prompt": "p", "seed": "abc"},
        {"id": "s4", "prompt": "p", "seed": 1.5},
        {"id": "s5", "prompt": "p", "seed": True},
        {"id": ["list"], "prompt": "p"},
        {"id": "ok2", "prompt": "p", "seed": 2.0},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    pf = read_prompts(str(f))
    assert [(r.id, r.seed) for r in pf.rows] == [("good", 0), ("ok2", 2)]
    r = reasons(pf)
    assert "path separator" in r[2] and "path separator" in r[3]
    assert r[4] == "empty prompt"
    assert r[5] == f"prompt longer than {MAX_PROMPT_CHARS} characters ({MAX_PROMPT_CHARS + 1})"
    assert r[6] == "duplicate id (first used on row 1)"
    assert r[7] == "duplicate id (first used on row 1)"
    for row in (8, 9, 10, 11, 12):
        assert r[row].startswith("bad seed"), r[row]
    assert r[13] == "id must be a string or an integer, got list"
    assert pf.total == len(rows)
    # the id in an error record is what the file said, so the user can find the row
    assert {e.row: e.id for e in pf.errors}[2] == "../x"


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(T2IError, match="unknown prompt file format"):
        read_prompts(str(tmp_path / "p.xlsx"))
    with pytest.raises(T2IError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_tsv_in_the_partiprompts_layout_keeps_its_other_columns(tmp_path):
    p = tmp_path / "parti.tsv"
    p.write_text("Prompt\tCategory\tChallenge\tNote\n"
                 "A red circle\tAbstract\tBasic\t\n"
                 "A cat, on a mat\tAnimals\tSimple Detail\tcommas stay, in a TSV\n"
                 "too\tfew\n")
    pf = read_prompts(str(p))
    assert [r.prompt for r in pf.rows] == ["A red circle", "A cat, on a mat"]
    assert pf.rows[1].extra == {"Category": "Animals", "Challenge": "Simple Detail", "Note": "commas stay, in a TSV"}
    assert [(e.row, e.reason) for e in pf.errors] == [(3, "expected 4 fields, got 2")]


def test_drawbench_csv_and_jsonl_extras(tmp_path):
    c = tmp_path / "drawbench.csv"
    c.write_text("Prompts,Category\nA blue square,Colors\n")
    pf = read_prompts(str(c))
    assert pf.rows[0].prompt == "A blue square" and pf.rows[0].extra == {"Category": "Colors"}
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"id": "a", "prompt": "x", "category": "c", "tags": ["t", 1]}) + "\n")
    assert read_prompts(str(j)).rows[0].extra == {"category": "c", "tags": ["t", 1]}


def test_per_prompt_expands_ids_and_refuses_ids_that_would_grow_too_long():
    rows = [PromptRow("a", "x", 3, 1, {"k": "v"}), PromptRow("b" * 127, "y", 0, 2)]
    out, errors = expand(rows, 3)
    assert [r.id for r in out] == ["a-0", "a-1", "a-2"] and {r.seed for r in out} == {3}
    assert out[2].extra == {"k": "v", "prompt_id": "a", "sample": 2}
    assert [(e.row, e.reason.split(":")[0]) for e in errors] == [(2, "--per-prompt 3")]
    assert expand(rows, 1) == (rows, [])
