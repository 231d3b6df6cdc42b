"""The package's shape, as the README's "How it is built" states it, checked on the source itself.

* Data flows one way: base (``errors``, ``atomic``) → ``models`` → ``concepts`` → ``core`` →
  ``studies`` and ``extensions`` → the faces ``cli`` and ``app``. A module imports only from its own layer
  or below, at module level or inside a function.
* Only the faces parse arguments or serve the web (``argparse``, ``fastapi``, ``uvicorn``).
* No module imports another module's underscore names.
* No import cycle between modules, counting imports inside functions too.
* No module is over 800 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "rulewriter"
LAYERS = {"errors": 0, "atomic": 0, "models": 1, "concepts": 2, "core": 3, "studies": 4, "extensions": 4,
          "cli": 5, "app": 5}
FACE_ONLY = {"argparse": {"cli"}, "fastapi": {"app"}, "uvicorn": {"app"}, "starlette": {"app"}}
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG).with_suffix("").parts
        mods[".".join(parts)] = p
    return mods


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    """The dotted name (under ``rulewriter``) that a relative ``from`` import points at."""
    if node.level == 0:
        name = node.module or ""
        return name[len("rulewriter."):] if name.startswith("rulewriter.") else ("" if name == "rulewriter" else "!" + name)
    base = mod.split(".")
    is_pkg = base[-1] == "__init__"
    base = base[:-1]  # the importing module's package
    if is_pkg:
        pass
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *(node.module.split(".") if node.module else [])])


def _imports(mod: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, target module under rulewriter, imported names) for every intra-package import."""
    out = []
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.ImportFrom):
            target = _resolve(mod, n)
            if target.startswith("!"):
                continue
            out.append((n.lineno, target, [a.name for a in n.names]))
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("rulewriter."):
                    out.append((n.lineno, a.name[len("rulewriter."):], []))
    return out


def _existing(target: str, names: list[str], mods: dict[str, Path]) -> list[str]:
    """The modules an import really reaches: the target itself, or its submodules named in ``from x import y``."""
    found = []
    if target in mods:
        found.append(target)
    elif f"{target}.__init__" in mods:
        found.append(f"{target}.__init__")
    for name in names:
        sub = f"{target}.{name}" if target else name
        if sub in mods:
            found.append(sub)
        elif f"{sub}.__init__" in mods:
            found.append(f"{sub}.__init__")
    return found


def _layer(mod: str) -> int | None:
    return LAYERS.get(mod.split(".")[0])


MODS = _modules()


def test_every_module_has_a_layer():
    loose = [m for m in MODS if _layer(m) is None and m not in ("__init__", "__main__")]
    assert not loose, f"modules outside the layers: {loose}"


def test_imports_point_down_the_layers():
    bad = []
    for mod, path in MODS.items():
        here = _layer(mod)
        if here is None:
            continue  # the public API (rulewriter/__init__.py) and __main__ sit on top of everything
        for line, target, names in _imports(mod, path):
            for dest in _existing(target, names, MODS):
                there = _layer(dest)
                if there is not None and there > here:
                    bad.append(f"{path.relative_to(PKG)}:{line} imports {dest}")
                if there == here == 4 and dest.split(".")[0] != mod.split(".")[0]:
                    bad.append(f"{path.relative_to(PKG)}:{line} imports its sibling layer's {dest}")
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_only_the_faces_parse_arguments_or_serve_the_web():
    bad = []
    for mod, path in MODS.items():
        top = mod.split(".")[0]
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) and n.level == 0 else []
            for name in names:
                allowed = FACE_ONLY.get(name.split(".")[0])
                if allowed is not None and top not in allowed:
                    bad.append(f"{path.relative_to(PKG)}:{n.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_module_takes_another_modules_private_names():
    bad = []
    for mod, path in MODS.items():
        for line, target, names in _imports(mod, path):
            private = [x for x in names if x.startswith("_") and not x.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(PKG)}:{line} takes {', '.join(private)} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {mod: set() for mod in MODS}
    for mod, path in MODS.items():
        for _, target, names in _imports(mod, path):
            graph[mod].update(d for d in _existing(target, names, MODS) if d != mod)
    # Package __init__ files are entered on the way to any submodule; only real module-to-module edges count.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" → ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m != "__init__":
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("mod", sorted(MODS))
def test_module_size(mod):
    n = len(MODS[mod].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{mod} has {n} lines (over {MAX_LINES}: split it by idea)"


def test_the_readme_module_table_matches_the_tree():
    """Every module is in README's "How it is built" table, and the table names no module that is gone."""
    import re

    readme = (PKG.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    wild: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if token.endswith("/*"):
                wild.add(token[:-2])
                continue
            if "/" in token:
                folder, token = token.split("/", 1)
            named.add(f"{folder}.{token}" if folder else token)
    actual = {m for m in MODS if not m.endswith("__init__") and m != "__main__"}
    missing = sorted(m for m in actual if m not in named and m.split(".")[0] not in wild)
    stale = sorted(m for m in named if m not in actual)
    assert not missing and not stale, f"not in the README table: {missing}; in the table but not the tree: {stale}"
