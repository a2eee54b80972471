"""The code base's shape, read with ast (nothing is imported): no import cycle among the modules
of prepare/extract/model/infer, each stage imports only earlier ones (prepare < extract < model <
infer), and no function body is longer than MAX_LINES lines of its own."""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "extract", "model", "infer")
MAX_LINES = 60


def modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for s in STAGES for p in sorted((ROOT / s).glob("*.py"))}


def imports_of(name: str, path: Path, known) -> set[str]:
    """The project modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name.split(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{package}.{node.module}"
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}       # `from model import checkpoint`
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(g[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_stages_import_earlier_stages_only():
    bad = [f"{m} imports {n}" for m, deps in sorted(graph().items()) for n in sorted(deps)
           if STAGES.index(n.split(".")[0]) > STAGES.index(m.split(".")[0])]
    assert not bad, "a stage imports a later one:\n" + "\n".join(bad)


def own_lines(fn: ast.AST) -> int:
    """Lines of a function's body, not counting the lines of functions and classes nested in it."""
    lines = set(range(fn.body[0].lineno, fn.end_lineno + 1))
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            lines -= set(range(node.lineno, node.end_lineno + 1))
    return len(lines)


def long_functions() -> list[str]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and own_lines(node) > MAX_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({own_lines(node)} lines)")
    return sorted(out)


def test_no_long_functions():
    offenders = long_functions()
    assert not offenders, f"functions over {MAX_LINES} lines of their own:\n" + "\n".join(offenders)
