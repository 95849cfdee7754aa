"""The layout's rules, read from the source: one-way import arrows, a small srmodel top level, named modules.

Arrows (docs/architecture.md): pipelines -> actors -> srmodel, pipelines -> cluster, actors -> cluster.
srmodel imports neither Ray nor the other packages; cluster imports none of ours; actors never start Ray.
Every import counts, including those inside functions.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("srmodel", "actors", "cluster", "pipelines")
# What each package may import of ours (itself included).
ALLOWED = {
    "srmodel": {"srmodel"},
    "cluster": {"cluster"},
    "actors": {"actors", "srmodel", "cluster"},
    "pipelines": {"pipelines", "actors", "srmodel", "cluster"},
}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Absolute names of every module imported by `path` (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = list(rel if rel[-1] == "__init__" else rel[:-1])
    pkg = pkg[:-1] if rel[-1] == "__init__" else pkg
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    wrong = []
    for path in modules(package):
        for name in imported(path):
            top = name.split(".")[0]
            if (top in PACKAGES and top not in ALLOWED[package]) or (package == "srmodel" and top == "ray"):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports against the arrows:\n" + "\n".join(wrong)


def test_actors_never_start_ray():
    starts = [str(p.relative_to(ROOT)) for p in modules("actors") if "ray.init(" in p.read_text()]
    assert not starts


def test_srmodel_top_level_stays_small():
    top = sorted(p.name for p in (ROOT / "srmodel").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 10, top


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_says_what_it_holds(package):
    silent = [str(p.relative_to(ROOT)) for p in modules(package)
              if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, "modules without a docstring: " + ", ".join(silent)
