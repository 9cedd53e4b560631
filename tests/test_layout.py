"""The package's layout is its architecture: rooms import only the rooms below them, nothing imports
in a circle, the node side needs nothing but a python, and README's "How it works" names every module."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# lowest first: each room may import only rooms before it (and itself)
ROOMS = ["cluster", "cluster.errors", "cluster.quoting", "cluster.node", "cluster.spec", "cluster.image", "cluster.container",
         "cluster.plan", "cluster.run", "cluster.backends", "cluster.submit", "cluster.cli", "cluster.__main__"]


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((REPO / "cluster").rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function, relative imports resolved."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def room(mod: str) -> str:
    """The room of a module: its package under cluster/, or the top-level module itself."""
    return next((r for r in ROOMS[1:] if mod == r or mod.startswith(r + ".")), "cluster")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(m, p) if i in mods and i != m} for m, p in mods.items()}


def test_no_module_imports_in_a_circle():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_rooms_import_only_the_rooms_below_them():
    bad = [f"{m} imports {n}" for m, ns in graph().items() for n in ns
           if ROOMS.index(room(n)) > ROOMS.index(room(m))]
    assert not bad, bad


def test_the_node_side_needs_only_the_standard_library():
    """cluster/node/ runs on the hosts with whatever python is there: at import, the standard library
    and itself only; inside functions also what the job itself runs on (torch for warm start and
    torchrun, submitit inside a SLURM task), never the submitting side's code."""
    bad = []
    for m, p in modules().items():
        if room(m) != "cluster.node":
            continue
        tree = ast.parse(p.read_text())
        at_import = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        at_import |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        for i in imports(m, p):
            top = i.split(".")[0]
            if top == "cluster":
                ok = i == "cluster" or i.startswith("cluster.node")
            else:
                ok = top in sys.stdlib_module_names or top == "__future__" or (
                    top in ("torch", "submitit") and i not in at_import)
            if not ok:
                bad.append(f"{m} imports {i}")
    assert not bad, bad


def test_readme_names_every_module():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## How it works"):]
    section = section[:section.index("\n## ", 4)]
    missing = [str(p.relative_to(REPO)) for m, p in modules().items()
               if p.name != "__init__.py" and str(p.relative_to(REPO)) not in section]
    assert not missing, f"README's 'How it works' does not name: {missing}"
