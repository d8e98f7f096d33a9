"""docs/architecture.md stays true: its import picture and layering rules match the code, the
names of its "Moved" section import from where it says, its links resolve, and nothing refers to
a design document outside the repository."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"

#: Files that still mention the old design document; another branch changes them now, and
#: their references are rewritten when it is merged. The list may only shrink.
def section(title: str) -> str:
    """The text of one ``## `` section of docs/architecture.md."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_import_picture_and_layering_match_the_code():
    """Every import points down the rows of the doc, and its picture is the one the code gives
    (after changing imports: ``python3 docs/import_graph.py`` and paste the picture)."""
    result = subprocess.run(
        [sys.executable, "docs/import_graph.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def moved_rows(title: str) -> list[list[str]]:
    """Table rows (cells) under the ``### `` heading of the Moved section that starts with ``title``."""
    text = section("Moved")
    part = text[text.index(f"### {title}") :]
    part = part[: part.find("\n### ", 1) if "\n### " in part[1:] else None]
    rows = [line.strip("|").split(" | ") for line in part.splitlines() if line.startswith("| `")]
    assert rows, f"no table under {title!r}"
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_moved_names_import_from_their_new_place_only():
    for old, listed, new in moved_rows("Names that left"):
        (old,), (new,) = names(old), names(new)
        module = importlib.import_module(new)
        for name in names(listed):
            assert hasattr(module, name), f"{new}.{name} (docs/architecture.md, Moved)"
            if old != "echocare.metrics":
                assert not hasattr(importlib.import_module(old), name), f"{old}.{name} still imports"
    assert not (REPO / "echocare" / "metrics").exists()


def source_file(module: str) -> Path | None:
    """The file of ``module`` in this checkout, if any (checked on disk: an editable install of
    another checkout could still import an old module)."""
    base = REPO.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def test_old_data_names_warn_and_point_to_their_new_place():
    import echocare.data

    for listed, new in moved_rows("Names of `echocare.data`"):
        (new,) = names(new)
        module = importlib.import_module(new)
        for name in names(listed):
            with pytest.warns(DeprecationWarning, match=re.escape(name)):
                forwarded = getattr(echocare.data, name)
            assert forwarded is getattr(module, name), f"echocare.data.{name} is not {new}.{name}"


def test_moved_modules_exist_and_old_ones_are_gone():
    for old, new in moved_rows("Modules"):
        (old,), (new,) = names(old), names(new)
        assert source_file(new) is not None, f"{new}: no such module"
        importlib.import_module(new)
        assert source_file(old) is None, f"{old} is still there"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    """Links between the repository's Markdown pages (README, docs, bundle READMEs) resolve,
    anchors into docs/architecture.md included."""
    pages = [p for p in REPO.rglob("*.md") if not any(x.startswith(".") or x == "mlruns" for x in p.relative_to(REPO).parts)]
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text(encoding="utf-8")):
            where = (page.parent / target).resolve() if target else page
            assert where.exists(), f"{page.relative_to(REPO)}: broken link {target}"
            if anchor and where == DOC:
                assert anchor in anchors(DOC), f"{page.relative_to(REPO)}: no #{anchor} in docs/architecture.md"


def test_readme_links_the_architecture_page():
    assert "](docs/architecture.md)" in (REPO / "README.md").read_text(encoding="utf-8")


def test_no_reference_to_a_design_document_outside_the_repository():
    word = "DES" "IGN"  # split, so that this file does not match itself
    pattern = re.compile(rf"shared/{word}|{word}\.md|\b{word}:|\({word}\b|{word}'s")
    found = set()
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO)
        if (
            path.is_file()
            and path.suffix in {".md", ".py", ".yaml", ".json", ".cfg", ".conf"}
            and not any(part.startswith(".") or part == "mlruns" for part in relative.parts)
            and pattern.search(path.read_text(encoding="utf-8", errors="ignore"))
        ):
            found.add(relative.as_posix())
    assert not found, sorted(found)
