#!/usr/bin/env python3
"""Who imports whom inside ``echocare``, read from the code (not from memory).

Run from the repository root:

    python3 docs/import_graph.py            # the Mermaid picture of docs/architecture.md
    python3 docs/import_graph.py --check    # exit 1 when an import points up a row, or the picture
                                            # in docs/architecture.md differs from the code
    python3 docs/import_graph.py --edges    # every edge with the modules that make it

A node is a part of the package: a top-level module (``bundle``, ``cli``, ...), a layer
package (``io``, ``networks``, ...) or one task package (``tasks/detection``, ...). An edge
``a --> b`` means some module of ``a`` imports some module of ``b``; an import made inside a
function (a lazy import) is drawn dashed unless another import makes the same edge at module
level. The deprecated ``echocare.data`` shim is left out: it imports on attribute access only.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path("echocare")
DOC = Path("docs/architecture.md")
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"
LEFT_OUT = {"echocare", "data"}
#: Rows of the picture, top to bottom: an import may point within its row or to a lower row,
#: never up (``--check`` says which edges do). A node not listed is drawn outside the rows.
TIERS = {
    "entry points": ["cli", "predict", "experiments", "registry"],
    "phantoms": ["phantoms"],
    "tasks": ["tasks/supervised", "tasks/detection", "tasks/landmarks", "tasks/regression",
              "tasks/enhancement", "tasks/report", "tasks/pretrain"],
    "layers": ["io", "datasets", "networks", "engines", "ontology", "visualize"],
    "shared helpers": ["bundle", "registered_models", "tracking", "ray_cluster"],
    "errors": ["errors"],
}


def part(module: str) -> str:
    """``echocare.tasks.detection.metrics`` -> ``tasks/detection``; ``echocare.io.readers`` -> ``io``."""
    names = module.split(".")
    if len(names) == 1:
        return module
    if names[1] == "tasks" and len(names) > 2:
        return "tasks/" + names[2]
    return names[1]


def module_name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts).replace(".__init__", "")


def imported_modules(path: Path, tree: ast.AST) -> list[tuple[str, bool]]:
    """``(absolute module, inside a function)`` for every ``echocare`` import of one file."""
    module = module_name(path)
    inner = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, id(node) in inner) for t in targets if t.split(".")[0] == "echocare"]
    return found


def import_edges(root: Path = PACKAGE) -> dict[tuple[str, str], dict[str, bool]]:
    """``(part, part)`` -> ``{"a.py -> b": lazy}`` for every import between two different parts."""
    edges: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for path in sorted(root.rglob("*.py")):
        source = part(module_name(path))
        if source in LEFT_OUT:
            continue
        for target, lazy in imported_modules(path, ast.parse(path.read_text(encoding="utf-8"))):
            dest = part(target)
            if dest != source and dest not in LEFT_OUT:
                edges[(source, dest)][f"{path.as_posix()} -> {target}"] = lazy
    return edges


def node_id(name: str) -> str:
    return name.replace("/", "_")


def mermaid(edges: dict[tuple[str, str], dict[str, bool]]) -> str:
    """The picture: one subgraph per tier, solid edges for module-level imports, dashed for lazy ones."""
    nodes = sorted({n for e in edges for n in e})
    lines = ["```mermaid", "flowchart TD"]
    placed = set()
    for tier, members in TIERS.items():
        present = [n for n in members if n in nodes]
        placed.update(present)
        if present:
            lines.append(f'  subgraph row_{tier.replace(" ", "_")}["{tier}"]')
            lines += [f'    {node_id(n)}["{n}"]' for n in present]
            lines.append("  end")
    lines += [f'  {node_id(n)}["{n}"]' for n in nodes if n not in placed]
    for (a, b), imports in sorted(edges.items()):
        arrow = "-.->" if all(imports.values()) else "-->"
        lines.append(f"  {node_id(a)} {arrow} {node_id(b)}")
    lines.append("```")
    return "\n".join(lines)


def upward(edges: dict[tuple[str, str], dict[str, bool]]) -> list[str]:
    """Edges that point to a higher row of :data:`TIERS` (or touch a node in no row)."""
    row = {n: i for i, members in enumerate(TIERS.values()) for n in members}
    wrong = []
    for (a, b), imports in sorted(edges.items()):
        if a not in row or b not in row or row[b] < row[a]:
            wrong.append(f"{a} -> {b}: " + ", ".join(sorted(imports)))
    return wrong


def documented(doc: Path = DOC) -> str:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the picture in docs/architecture.md")
    parser.add_argument("--edges", action="store_true", help="list every edge with the imports behind it")
    args = parser.parse_args()
    edges = import_edges()
    if args.edges:
        for (a, b), imports in sorted(edges.items()):
            print(f"{a} -> {b}")
            for line, lazy in sorted(imports.items()):
                print(f"    {line}{'  (in a function)' if lazy else ''}")
        return 0
    picture = mermaid(edges)
    if args.check:
        wrong = upward(edges)
        if wrong:
            print("imports against the layering of docs/architecture.md:\n  " + "\n  ".join(wrong), file=sys.stderr)
            return 1
        if documented() != picture:
            print(f"{DOC}: the import picture is out of date; paste the output of python3 docs/import_graph.py "
                  f"between {BEGIN} and {END}", file=sys.stderr)
            return 1
        print(f"{DOC}: the import picture matches the code")
        return 0
    print(picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
