"""The layer rule, checked on every import of every module the distribution installs (the
``package-dir`` mapping of pyproject.toml followed; top-level and lazy imports, ``import x``
and ``from x import y``, relative imports resolved).

A *unit* is a sub-package or a top-level module of ``imageragturbo`` (``imageragturbo.runtime``,
``imageragturbo.quality``). Every unit is placed in one of ``LAYERS`` (lowest first) and may
import only its own layer and lower ones, so a new package fails this test until it is placed.
On top of the order:

- no cycle between units, and none between files;
- the request side (``REQUEST_SIDE``: what a served request and the SDK run) imports no
  torch-side unit, and nothing it can reach through the project's imports imports torch,
  diffusers or a transformers model (the CLIP tokenizer is fine: it needs no torch).

Run as a script to print the unit graph and every violation.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PKG = "imageragturbo"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    # The SDK: also installed alone as ``imageragturbo_client``, so it imports nothing else.
    ("sdk", {"imageragturbo.client"}),
    # Names, places, file digests, images, statistics and the data world: numpy / PIL at most.
    ("foundation", {"imageragturbo", "imageragturbo.defaults", "imageragturbo.checksums",
                    "imageragturbo.images", "imageragturbo.grids", "imageragturbo.stats",
                    "imageragturbo.shapesworld", "imageragturbo.tifa"}),
    ("retrieval", {"imageragturbo.retriever"}),
    # The request path in process: ONNX Runtime, numpy, the tokenizer.
    ("runtime", {"imageragturbo.runtime"}),
    # torch from here up (to "experiments").
    ("model", {"imageragturbo.model"}),
    ("export", {"imageragturbo.export"}),
    ("experiments", {"imageragturbo.training", "imageragturbo.evaluate",
                     "imageragturbo.quality", "imageragturbo.sensitivity"}),
    # The served ensemble: the Triton backends and the server around them. Above the torch
    # side only so that no library below can import it; it imports none of it (REQUEST_SIDE).
    ("serving", {"imageragturbo.serving", "imageragturbo.model_repository"}),
    # Every command and the asset builders: argument parsing, default paths, wiring.
    ("commands", {"imageragturbo.commands"}),
]
REQUEST_SIDE = {"imageragturbo.client", "imageragturbo.retriever", "imageragturbo.runtime",
                "imageragturbo.serving", "imageragturbo.model_repository"}
TORCH_SIDE = {"imageragturbo.model", "imageragturbo.training", "imageragturbo.export"}
# Third-party packages that are (or load) torch models.
TORCH_LIBS = {"torch", "torchvision", "diffusers", "open_clip", "peft", "accelerate"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module the distribution installs: dotted name -> file."""
    pp = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = pp["tool"]["setuptools"]["package-dir"]
    out = {}
    for name, folder in mapping.items():
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """Every import in ``path`` (module ``name``): (target module, imported names, line). A
    ``from a import b`` targets the module ``a.b`` when there is one, else ``a``."""
    is_pkg = path.name == "__init__.py"
    out = []
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            out += [(a.name, [], n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            names = [a.name for a in n.names]
            subs = [f"{mod}.{a}" for a in names if f"{mod}.{a}" in known]
            rest = [a for a in names if f"{mod}.{a}" not in known]
            out += [(s, [], n.lineno) for s in subs]
            if rest:
                out.append((mod, rest, n.lineno))
    return out


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def owner(target: str, known: dict[str, Path]) -> str | None:
    """The project module an import target names (its longest known prefix), or None."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


@cache
def graph(root: Path = ROOT):
    """(file edges {module: {module}}, third-party imports {module: [(top name, names, line)]},
    edge lines {(a, b): line})."""
    known = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in known}
    external: dict[str, list] = {m: [] for m in known}
    lines: dict[tuple[str, str], int] = {}
    for m, f in known.items():
        for target, names, line in imports(m, f, known):
            if target == PKG or target.startswith(PKG + "."):
                t = owner(target, known) or target
                if t != m:
                    edges[m].add(t)
                    lines.setdefault((m, t), line)
            else:
                external[m].append((target.split(".")[0], names, line))
    return edges, external, lines


def layer_of(u: str) -> int | None:
    return next((i for i, (_, units) in enumerate(LAYERS) if u in units), None)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def unit_edges(edges) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, bs in edges.items():
        for b in bs:
            if unit(a) != unit(b):
                out.setdefault(unit(a), set()).add(unit(b))
    return out


def _rel(m: str) -> str:
    return str(modules()[m].relative_to(ROOT))


def unplaced() -> list[str]:
    edges, _, _ = graph()
    return sorted({unit(m) for m in edges if layer_of(unit(m)) is None})


def upward_imports() -> list[str]:
    edges, _, lines = graph()
    bad = []
    for a, bs in edges.items():
        for b in bs:
            la, lb = layer_of(unit(a)), layer_of(unit(b))
            if la is not None and lb is not None and lb > la:
                bad.append(f"{_rel(a)}:{lines[a, b]} imports {b} (layer {LAYERS[lb][0]!r} is "
                           f"above {LAYERS[la][0]!r})")
    return sorted(bad)


def torch_libs(module_imports) -> list[str]:
    """The torch-model imports among one module's third-party imports."""
    out = []
    for top, names, line in module_imports:
        if top in TORCH_LIBS:
            out.append(f"{top} (line {line})")
        elif top == "transformers" and (not names or not all(
                n.endswith(("Tokenizer", "TokenizerFast")) for n in names)):
            out.append(f"transformers {names or ''} (line {line})")
    return out


def request_side_violations() -> list[str]:
    edges, external, lines = graph()
    bad = []
    request = [m for m in edges if unit(m) in REQUEST_SIDE]
    for a in request:
        for b in edges[a]:
            if unit(b) in TORCH_SIDE:
                bad.append(f"{_rel(a)}:{lines[a, b]} imports {b} (torch side)")
    # Everything the request side can reach through the project's imports, lazy ones too
    # (breadth first, so each offender is shown with a shortest chain, and not walked past).
    via = {m: None for m in request}
    todo = list(request)
    while todo:
        v = todo.pop(0)
        hits = torch_libs(external[v])
        if hits:
            chain, w = [], v
            while w is not None:
                chain.append(w)
                w = via[w]
            bad.append(f"{' -> '.join(reversed(chain))} imports {', '.join(hits)}")
            continue
        for w in sorted(edges.get(v, ())):
            if w not in via:
                via[w] = v
                todo.append(w)
    return sorted(set(bad))


# ----------------------------------------------------------------------------- tests


def test_every_unit_is_placed_in_a_layer():
    assert not unplaced(), f"place these in LAYERS (tests/test_layers.py): {unplaced()}"


def test_units_import_only_their_own_layer_and_lower_ones():
    bad = upward_imports()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle_between_units():
    edges, _, _ = graph()
    found = cycles(unit_edges(edges))
    assert not found, f"units importing each other: {found}"


def test_no_import_cycle_between_files():
    edges, _, _ = graph()
    found = cycles(edges)
    assert not found, f"modules importing each other: {found}"


def test_the_request_side_never_reaches_torch():
    bad = request_side_violations()
    assert not bad, "\n".join(bad)


def test_only_commands_import_serving_and_nothing_imports_commands():
    """Implied by the order (serving and commands are the top two layers); stated so that a
    reordering of LAYERS that loses it fails here."""
    edges, _, lines = graph()
    bad = [f"{_rel(a)}:{lines[a, b]} imports {b}" for a, bs in edges.items() for b in bs
           if (unit(b) == "imageragturbo.commands" and unit(a) != unit(b))
           or (unit(b) == "imageragturbo.serving"
               and unit(a) not in {"imageragturbo.serving", "imageragturbo.commands"})]
    assert not bad, "\n".join(bad)


HELP_CHILD = r"""
import argparse, sys
for name in ("torch", "onnxruntime", "hnswlib", "diffusers", "transformers"):
    sys.modules[name] = None   # importing them raises
from imageragturbo.commands.main import build_parser

def walk(p, path):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from walk(sub, path + [name])

n = 0
for path, p in walk(build_parser(), []):
    assert p.format_help(), path
    n += 1
print(n)
"""


def test_every_commands_help_needs_no_torch_onnxruntime_or_hnswlib():
    """The command modules import heavy libraries in their handlers only: the whole parser,
    every subcommand's --help included, builds with torch, onnxruntime, hnswlib, diffusers
    and transformers unimportable."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", HELP_CHILD], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout) > 25  # every command and subcommand was rendered


def test_the_scan_sees_lazy_relative_and_dotted_imports(tmp_path):
    """The parser itself, on a tiny checkout: a lazy import inside a function, a relative one
    from a package's ``__init__`` and a submodule, and ``from pkg import submodule``."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"imageragturbo" = "src"\n"imageragturbo.extra" = "x"\n')
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "src" / "__init__.py").write_text("")
    (tmp_path / "src" / "sub" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "src" / "sub" / "a.py").write_text(
        "def f():\n    from ..b import g\n    import torch\n")
    (tmp_path / "src" / "b.py").write_text("from imageragturbo import sub\n")
    (tmp_path / "x" / "__init__.py").write_text("from imageragturbo.sub import a\n")
    known = modules(tmp_path)
    assert set(known) == {"imageragturbo", "imageragturbo.sub", "imageragturbo.sub.a",
                          "imageragturbo.b", "imageragturbo.extra"}
    edges, external, _ = graph.__wrapped__(tmp_path)
    assert edges["imageragturbo.sub"] == {"imageragturbo.sub.a"}
    assert edges["imageragturbo.sub.a"] == {"imageragturbo.b"}
    assert edges["imageragturbo.b"] == {"imageragturbo.sub"}
    assert edges["imageragturbo.extra"] == {"imageragturbo.sub.a"}
    assert [e[0] for e in external["imageragturbo.sub.a"]] == ["torch"]
    assert cycles(edges) == [["imageragturbo.b", "imageragturbo.sub", "imageragturbo.sub.a"]]
    assert torch_libs([("transformers", ["CLIPTokenizer"], 1)]) == []
    assert torch_libs([("transformers", ["CLIPTextModel"], 1)])


if __name__ == "__main__":
    e, _, _ = graph()
    for u, vs in sorted(unit_edges(e).items()):
        print(f"{u} -> {', '.join(sorted(vs))}")
    print("unplaced:", unplaced())
    print("unit cycles:", cycles(unit_edges(e)))
    print("file cycles:", cycles(e))
    print("upward:", *upward_imports(), sep="\n  ")
    print("request side:", *request_side_violations(), sep="\n  ")
