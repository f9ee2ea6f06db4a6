"""The house rules that keep the layout honest: `t2i/` never imports Ray, model files hold
architecture only, no module reaches into another's private names, the Ray layer stays thin, and
every Ray-private name we lean on still exists in the pinned Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("t2i", "pipelines")


def modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in (REPO / package).rglob("*.py"))


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def test_importing_every_t2i_module_never_imports_ray():
    code = ("import importlib, sys\n"
            f"for m in {modules('t2i')!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not bad, bad[:5]\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def imported(tree: ast.AST) -> list[tuple[str, str]]:
    """(module, name) for every `from X import name` and ("X", "") for `import X`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
    return out


def test_model_files_hold_architecture_only():
    for path in sources("t2i/models"):
        for module, _ in imported(ast.parse(path.read_text())):
            if module.startswith("t2i"):
                assert module.startswith(("t2i.models", "t2i.errors")), f"{path.name} imports {module}"


def test_no_private_name_crosses_a_module():
    """`from t2i.x import _name`, or `x._name` on an imported project module, outside x's own tests."""
    found = []
    for path in sources("t2i", "pipelines", "benchmarks"):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.relative_to(REPO)}: from {node.module} import {a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, found


def test_the_ray_layer_stays_thin_and_baselines_stay_bare():
    lines = sum(len(p.read_text().splitlines()) for p in sources("pipelines"))
    assert lines <= 1100, f"pipelines/ holds {lines} lines; library code belongs in t2i/"
    for path in sources("benchmarks"):
        tree = ast.parse(path.read_text())
        top = [m for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for m, _ in imported(node)]
        assert not any(m.split(".")[0] == "pipelines" for m in top), \
            f"{path.name}: import pipelines only inside the function that runs the Ray side"


def test_ray_private_names_we_use_exist_in_the_pinned_ray():
    """Each Ray-private use lives in one place; this fails loudly when a Ray upgrade moves it."""
    import ray
    from ray.data._internal.execution.interfaces.ref_bundle import BlockEntry, RefBundle  # rank_blocks
    from ray.data.iterator import DataIterator
    from ray.train.v2._internal.execution import context as train_context  # cluster.quiet_train_reports

    assert ray.__version__.startswith("2.60."), "t2i pins Ray's minor version; re-check the names below"
    assert "_to_ref_bundle_iterator" in DataIterator.__abstractmethods__
    assert {"ref", "metadata"} <= set(BlockEntry.__dataclass_fields__) and "blocks" in RefBundle.__dataclass_fields__
    assert Path(train_context.__file__).exists()


@pytest.mark.parametrize("path", sources("t2i", "pipelines"), ids=lambda p: str(p.relative_to(REPO)))
def test_house_size_limits(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 800, f"{path.name}: over 800 lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno <= 150, f"{path.name}:{node.lineno} {node.name}() over 150 lines"
