"""The layering of the spo package, checked on every import statement in src/spo (module-level and inside
functions alike, read with ast, nothing imported):

- no cycles between packages: a package is a first-level name under spo (spo.train, spo.spm, spo.models, ...;
  top-level modules such as spo.io and spo.ddim are their own nodes);
- nothing imports spo.cli except spo.__main__ and plugin command modules (spo.cli imports anything);
- the toy world is a plugin: outside spo/toy/ and the registry (spo/sources.py) no file imports spo.toy or
  contains the string "toy:" (model sources are reached through spo.sources).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "spo"
TOY_HOME = ("spo/toy/", "spo/sources.py")
CLI_IMPORTERS = ("spo/__main__.py", "spo/toy/cli.py")  # the entry point, and the toy plugin's `spo toy` command

# Files the engine work is converting to spo.sources (being converted by the engine work): until then they may import
# spo.toy, mention "toy:" and close the cycles that their imports make. Delete each entry when its file is done;
# a stale entry fails test_exemptions_are_still_needed.
BEING_CONVERTED = (
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _imports(path: Path) -> list[str]:
    """Every spo module this file imports, at any depth of the file (functions included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from spo import sources` imports the module spo.sources; `from spo import __version__` only spo
            found += [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
    return [name for name in found if name == "spo" or name.startswith("spo.")]


def _node(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _files() -> dict[str, Path]:
    return {path.relative_to(SRC).as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}


def _edges(skip=BEING_CONVERTED) -> dict[tuple[str, str], list[str]]:
    """(package, package) -> the files whose imports make that edge."""
    edges = defaultdict(list)
    for rel, path in _files().items():
        if rel in skip:
            continue
        here = _node(_module_name(path))
        for target in _imports(path):
            there = _node(target)
            if there != here:
                edges[(here, there)].append(rel)
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _toy_violations(rel: str, path: Path) -> list[str]:
    why = [f"imports {m}" for m in _imports(path) if m == "spo.toy" or m.startswith("spo.toy.")]
    if "toy:" in path.read_text(encoding="utf-8"):
        why.append('contains "toy:"')
    return why


def test_the_walk_sees_function_level_imports():
    # models/loading.py imports spo.models.checkpoint inside load_pipeline, not at the top
    assert "spo.models.checkpoint" in _imports(PACKAGE / "models" / "loading.py")
    assert "spo.sources" in _imports(PACKAGE / "cli" / "toy_cmd.py")


def _shortest_cycle(edges, start: str) -> list[str]:
    """start -> ... -> start with the fewest edges (breadth first)."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for a, b in sorted(edges):
            if a == path[-1] and b == start:
                return path + [start]
            if a == path[-1] and b not in seen:
                seen.add(b)
                paths.append(path + [b])
    return []


def test_no_package_cycles():
    edges = _edges()
    cycles = [_shortest_cycle(edges, c[0]) for c in _cycles(edges)]
    detail = [" -> ".join(c) + ": " + "; ".join(f"{a} -> {b} in {', '.join(sorted(set(edges[(a, b)])))}"
                                               for a, b in zip(c, c[1:])) for c in cycles]
    assert not cycles, "package import cycles:\n" + "\n".join(detail)


def test_nothing_imports_cli():
    offenders = sorted({f for (a, b), files in _edges(skip=()).items() if b == "spo.cli" and a != "spo.cli"
                        for f in files if f not in CLI_IMPORTERS})
    assert not offenders, f"only the CLI itself imports spo.cli: {offenders}"


def test_the_toy_world_is_a_plugin():
    offenders = {rel: why for rel, path in _files().items()
                 if not rel.startswith(TOY_HOME) and rel not in BEING_CONVERTED
                 for why in [_toy_violations(rel, path)] if why}
    assert not offenders, f"reach the toy world through spo.sources: {offenders}"


def test_exemptions_are_still_needed():
    files = _files()
    missing = [rel for rel in BEING_CONVERTED if rel not in files]
    assert not missing, f"exempted files that no longer exist (delete them from BEING_CONVERTED): {missing}"
    cyclic = {f for c in _cycles(_edges(skip=())) for (a, b), fs in _edges(skip=()).items() if a in c and b in c
              for f in fs}
    stale = [rel for rel in BEING_CONVERTED if not _toy_violations(rel, files[rel]) and rel not in cyclic]
    assert not stale, f"converted: delete these from BEING_CONVERTED: {stale}"


def test_no_function_reaches_80_lines():
    """Each concept small enough to read: the largest function in src/ stays under 80 lines."""
    long = sorted((node.end_lineno - node.lineno + 1, rel, node.name)
                  for rel, path in _files().items()
                  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 80)
    assert not long, long


def test_method_recipes_are_short():
    """SPO, Diffusion-DPO and the SPM trainer supply their batches and loss; the loop is the engine's."""
    recipes = sorted(SRC.glob("spo/train/*_recipe.py"))
    assert [p.name for p in recipes] == ["dpo_recipe.py", "spm_recipe.py", "spo_recipe.py"]
    for path in recipes:
        assert len(path.read_text(encoding="utf-8").splitlines()) < 250, path.name
        others = {p.stem for p in recipes} - {path.stem}
        assert not {m for m in _imports(path) if m.rsplit(".", 1)[-1] in others}, f"{path.name} imports a recipe"
