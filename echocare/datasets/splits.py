"""Benchmark split files (``data_lists/<name>.json``): reading them and applying them to a datalist.

A split file says which case (patient, recording, image: its ``unit``) goes to which part of a
benchmark, by id, never by path::

    {
      "source": "...", "citation": "...", "unit": "patient",
      "training": ["1", "7", ...], "validation": [...], "test": [...],     (any of them)
      "folds": {"1": [...], "2": [...]},                                   (cross-validation)
      "rule": {"id_pattern": "\\\\d+", "seed": 0, "fractions": {"training": 0.8, "validation": 0.2},
               "release": {"parts": ["test"], "from": "test_datasets/"}}
    }

Ids are the ``case`` values the converters of :mod:`echocare.datasets.converters` give their
items. ``rule`` covers the cases a file cannot list because their ids are only known from the
download: ``id_pattern`` (a regular expression every case id of the download must match, so a
split file of another dataset is refused), ``release`` (the parts the download's own split files
define: cases the converter put in one of those parts stay there) and ``seed``/``fractions``
(every other unlisted case: the sorted ids are shuffled with ``random.Random(seed)`` and cut by
the fractions, exactly as :func:`echocare.datasets.converters.grouped_split` does, so a file
made from a converter's output agrees with that converter).

Public API
----------
``load_split(path) -> DatasetSplit``
    Read and check a split file (path as given, relative to the current folder).
``apply_split(datalist, split, fold=None, root=None) -> (datalist, SplitReport)``
    Re-assign a converter's items to the split's parts; the report counts the cases the file
    does not list (and what became of them) and the listed cases the download lacks.
``assign_cases(case_ids, seed, fractions) -> dict``
    The seeded rule: case id -> part.
``split_lists(datalist) -> dict``
    part -> sorted case ids of a datalist (what a split file lists).
``SplitFileError``
    a split file that cannot be used, named with its problem.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "PARTS",
    "DatasetSplit",
    "SplitFileError",
    "SplitReport",
    "SplitRule",
    "apply_split",
    "assign_cases",
    "case_sort_key",
    "load_split",
    "split_lists",
]

#: The datalist parts a split assigns cases to, in the order the seeded rule fills them
#: (after ``training``, which takes what is left).
PARTS = ("training", "validation", "test")
_KEYS = {"source", "citation", "unit", "training", "validation", "test", "folds", "rule", "note"}


class SplitFileError(ValueError):
    """A split file that cannot be read or applied; the message starts with the file."""


def case_sort_key(case_id: str) -> list:
    """Natural order of ids ("2" before "10"): text and digit runs alternate, digits as numbers."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", str(case_id)))]


def assign_cases(case_ids: Iterable[str], seed: int, fractions: Mapping[str, float]) -> dict[str, str]:
    """The seeded patient-level rule: case id -> part.

    The sorted, de-duplicated ids are shuffled with ``random.Random(seed)``; ``validation`` then
    ``test``, when named in ``fractions``, take the next ``round(fraction * n)`` ids each (at
    least one each when there are two or more cases), ``training`` the rest. With fractions
    ``{"training": 0.8, "validation": 0.2}`` this is the converters' 8:2 split.
    """
    cases = sorted({str(c) for c in case_ids})
    random.Random(seed).shuffle(cases)
    assignment, start = {}, 0
    for part in PARTS[1:]:
        if part not in fractions:
            continue
        n = 0 if len(cases) < 2 else max(1, int(round(float(fractions[part]) * len(cases))))
        for case in cases[start : start + n]:
            assignment[case] = part
        start += n
    for case in cases[start:]:
        assignment[case] = "training"
    return assignment


def split_lists(datalist: Mapping) -> dict[str, list[str]]:
    """part -> the sorted case ids of a datalist's items in that part (parts without items left out)."""
    lists = {}
    for part in PARTS:
        ids = {str(item["case"]) for item in datalist.get(part, [])}
        if ids:
            lists[part] = sorted(ids, key=case_sort_key)
    return lists


@dataclass(frozen=True)
class SplitRule:
    """How cases a split file does not list are assigned (see the module docstring)."""

    id_pattern: str
    seed: int | None = None
    fractions: Mapping[str, float] | None = None
    release_parts: tuple[str, ...] = ()
    release_from: str = ""


@dataclass(frozen=True)
class DatasetSplit:
    """A read split file: ``lists`` part -> ids, ``folds`` fold number -> ids, optional ``rule``."""

    path: Path
    source: str
    citation: str
    unit: str
    lists: Mapping[str, tuple[str, ...]]
    folds: Mapping[int, tuple[str, ...]]
    rule: SplitRule | None

    def assignment(self, fold: int | None) -> dict[str, str]:
        """Listed case id -> part; with folds, fold ``fold`` validates and the other folds train."""
        assigned = {case: part for part, ids in self.lists.items() for case in ids}
        for k, ids in self.folds.items():
            for case in ids:
                assigned[case] = "validation" if k == fold else "training"
        return assigned


@dataclass
class SplitReport:
    """What applying a split did beyond its lists.

    ``unlisted``: cases of the download the file does not list (by what became of them:
    ``"rule"``, ``"release"`` or ``"left out"``); ``missing``: listed cases the download lacks.
    """

    split_path: Path
    root: str
    unlisted: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    listed: int = 0

    def lines(self, shown: int = 5) -> list[str]:
        """One line per finding (count and the first few ids); none when the split covers the download exactly."""

        def few(ids: list[str]) -> str:
            ids = sorted(ids, key=case_sort_key)
            return ", ".join(ids[:shown]) + (f", ... ({len(ids) - shown} more)" if len(ids) > shown else "")

        out = []
        how = {
            "rule": "assigned by its rule's seeded split",
            "release": "kept in the part the download's own split gives them",
            "left out": "left out (the file has no rule for them)",
        }
        for kind, ids in self.unlisted.items():
            if ids:
                out.append(f"{self.root}: {len(ids)} cases not listed in {self.split_path}, {how[kind]}: {few(ids)}")
        if self.missing:
            out.append(
                f"{self.split_path}: {len(self.missing)} of {self.listed} listed cases are not in {self.root} "
                f"(normal for a subset of the download): {few(self.missing)}"
            )
        return out


def _id_list(path: Path, key: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise SplitFileError(f"{path}: {key!r} must be a list of case ids (strings)")
    return tuple(str(v) for v in value)


def _read_rule(path: Path, rule) -> SplitRule | None:
    if rule is None:
        return None
    if not isinstance(rule, dict) or not isinstance(rule.get("id_pattern"), str):
        raise SplitFileError(f"{path}: 'rule' must be an object with an 'id_pattern' (a regular expression)")
    try:
        re.compile(rule["id_pattern"])
    except re.error as e:
        raise SplitFileError(f"{path}: rule id_pattern {rule['id_pattern']!r} is not a regular expression ({e})") from e
    unknown = set(rule) - {"id_pattern", "seed", "fractions", "release"}
    if unknown:
        raise SplitFileError(f"{path}: unknown rule keys {sorted(unknown)}")
    seed, fractions = rule.get("seed"), rule.get("fractions")
    if (seed is None) != (fractions is None):
        raise SplitFileError(f"{path}: the rule needs both 'seed' and 'fractions', or neither")
    if fractions is not None:
        if (
            not isinstance(seed, int)
            or not isinstance(fractions, dict)
            or set(fractions) - set(PARTS)
            or not all(isinstance(v, (int, float)) and v >= 0 for v in fractions.values())
            or abs(sum(fractions.values()) - 1.0) > 1e-6
        ):
            raise SplitFileError(
                f"{path}: rule seed must be an integer and fractions an object over {list(PARTS)} summing to 1"
            )
    release = rule.get("release") or {}
    parts = tuple(release.get("parts", ())) if isinstance(release, dict) else None
    if parts is None or set(parts) - set(PARTS):
        raise SplitFileError(f"{path}: rule release must be {{'parts': [some of {list(PARTS)}], 'from': '...'}}")
    return SplitRule(rule["id_pattern"], seed, fractions, parts, str(release.get("from", "")))


def load_split(path: str | Path) -> DatasetSplit:
    """Read and check the split file at ``path`` (relative to the current folder, not the package).

    Raises:
        SplitFileError: no such file, not JSON, unknown keys, a case in two parts, a bad rule.
    """
    path = Path(path)
    if not path.is_file():
        raise SplitFileError(f"{path}: no such split file (the files are in data_lists/ at the repository root)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SplitFileError(f"{path}: not a JSON split file ({e})") from e
    if not isinstance(content, dict):
        raise SplitFileError(f"{path}: expected a JSON object with source, citation, unit and lists or a rule")
    unknown = set(content) - _KEYS
    if unknown:
        raise SplitFileError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    lists = {part: _id_list(path, part, content[part]) for part in PARTS if part in content}
    folds_raw = content.get("folds", {})
    if not isinstance(folds_raw, dict) or not all(str(k).isdigit() for k in folds_raw):
        raise SplitFileError(f"{path}: 'folds' must be an object fold number -> list of case ids")
    folds = {int(k): _id_list(path, f"folds/{k}", v) for k, v in folds_raw.items()}
    rule = _read_rule(path, content.get("rule"))
    if not lists and not folds and rule is None:
        raise SplitFileError(f"{path}: lists no case and states no rule")
    seen: dict[str, str] = {}
    for where, ids in [*lists.items(), *((f"fold {k}", v) for k, v in folds.items())]:
        for case in ids:
            if case in seen:
                raise SplitFileError(f"{path}: case {case!r} is in both {seen[case]} and {where}")
            seen[case] = where
    if rule is not None:
        pattern = re.compile(rule.id_pattern)
        bad = [c for c in seen if not pattern.fullmatch(c)]
        if bad:
            raise SplitFileError(f"{path}: listed ids do not match its id_pattern {rule.id_pattern!r}: {', '.join(bad[:5])}")
    for key in ("source", "unit"):
        if not isinstance(content.get(key), str) or not content[key]:
            raise SplitFileError(f"{path}: needs a {key!r} text")
    return DatasetSplit(path, content["source"], str(content.get("citation", "")), content["unit"], lists, folds, rule)


def apply_split(
    datalist: dict, split: DatasetSplit, fold: int | None = None, root: str | Path | None = None
) -> tuple[dict, SplitReport]:
    """Re-assign a converter's items (``training``/``validation``/``test``, by their ``case``) to the split's parts.

    Listed cases go where the file says (with ``folds``: fold ``fold`` validates, default the
    datalist's own ``fold`` or else the smallest listed fold). Unlisted cases follow the rule:
    kept in a ``release`` part the converter read from the download, else the seeded split, else
    left out; each outcome is counted in the report, as are listed cases the download lacks.
    Items keep the converter's order; the result's non-list keys are the converter's plus
    ``split_file``.

    Raises:
        SplitFileError: a case id of the download does not match the rule's ``id_pattern``.
    """
    root_text = str(root if root is not None else datalist.get("name", "the download"))
    where = {}  # case -> the part the converter gave it
    for part in PARTS:
        for item in datalist.get(part, []):
            where.setdefault(str(item["case"]), part)
    if split.rule is not None:
        pattern = re.compile(split.rule.id_pattern)
        bad = sorted((c for c in where if not pattern.fullmatch(c)), key=case_sort_key)
        if bad:
            raise SplitFileError(
                f"{split.path}: {len(bad)} case ids of {root_text} do not match its id_pattern "
                f"{split.rule.id_pattern!r} (a split file of another dataset?): {', '.join(bad[:5])}"
            )
    if fold is None and split.folds:
        fold = datalist.get("fold") if datalist.get("fold") in split.folds else min(split.folds)
    assigned = split.assignment(fold)
    report = SplitReport(split.path, root_text, listed=len(assigned))
    report.missing = [c for c in assigned if c not in where]
    unlisted = [c for c in where if c not in assigned]
    rule = split.rule
    released = [c for c in unlisted if rule is not None and where[c] in rule.release_parts]
    seeded = [c for c in unlisted if c not in set(released)] if rule is not None and rule.seed is not None else []
    dropped = [c for c in unlisted if c not in set(released) | set(seeded)]
    assigned.update({c: where[c] for c in released})
    if seeded:
        assigned.update(assign_cases(seeded, rule.seed, rule.fractions))
    report.unlisted = {"release": released, "rule": seeded, "left out": dropped}
    items = [item for part in PARTS for item in datalist.get(part, [])]
    result = {k: v for k, v in datalist.items() if k not in PARTS}
    for part in PARTS:
        chosen = [item for item in items if assigned.get(str(item["case"])) == part]
        if chosen or part != "test":
            result[part] = chosen
    result["split_file"] = str(split.path)
    if fold is not None and split.folds:
        result["fold"] = fold
    result["description"] = f"{datalist.get('description', '')} Split: {split.path} ({split.source})".strip()
    return result, report
