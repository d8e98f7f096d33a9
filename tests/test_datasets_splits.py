"""data_lists/: the shipped split files, reading and applying them, and ``echocare datalist --split``.

Real-data checks use ``$ECHOCARE_DATA`` or ``../shared/data`` and skip without it; the rule path
and the CLI run on phantoms of the datasets that are not present.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from echocare.datasets.converters import DATALIST_CONVERTERS, convert_datalist, grouped_split
from echocare.datasets.splits import (
    SplitFileError,
    apply_split,
    assign_cases,
    load_split,
    split_lists,
)
from conftest import REPO_ROOT

DATA_LISTS = REPO_ROOT / "data_lists"
BENCHMARKS = ["ddti", "musv", "abdomen", "thyroid_cine", "busbra", "fll_ceus", "focus", "brain_landmark", "camus",
              "usenhance", "usreport", "hc18", "carotid"]


def _write(tmp_path, content: dict, name: str = "split.json"):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return load_split(path)


def _datalist(parts: dict[str, list[str]]) -> dict:
    """A converter-like datalist: two items per case, ``image`` ``<case>_<k>.png``."""
    return {"name": "toy", "description": "toy.", **{
        part: [{"image": f"{c}_{k}.png", "case": c} for c in cases for k in (0, 1)] for part, cases in parts.items()
    }}


def test_every_benchmark_has_a_split_file_tracked_by_git() -> None:
    shipped = sorted(p.stem for p in DATA_LISTS.glob("*.json"))
    assert shipped == sorted(BENCHMARKS) == sorted(DATALIST_CONVERTERS)
    for name in BENCHMARKS:
        split = load_split(DATA_LISTS / f"{name}.json")
        assert split.unit and split.source
        assert split.lists or split.folds or split.rule is not None
        readme = (DATA_LISTS / "README.md").read_text()
        assert f"--split data_lists/{name}.json" in readme
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "data_lists/ddti.json"], cwd=REPO_ROOT)
        assert ignored.returncode == 1  # 1: not ignored


def test_seeded_rule_is_the_converters_split() -> None:
    rng = random.Random(3)
    for n in (1, 2, 3, 7, 40, 311):
        ids = [str(rng.randrange(10_000)) for _ in range(n)]
        items = [{"case": c} for c in ids]
        train, val = grouped_split(items, seed=5)
        part = assign_cases(ids, 5, {"training": 0.8, "validation": 0.2})
        assert {it["case"] for it in val} == {c for c, p in part.items() if p == "validation"}
        assert {it["case"] for it in train} == {c for c, p in part.items() if p == "training"}
    three = assign_cases([str(i) for i in range(100)], 0, {"training": 0.7, "validation": 0.1, "test": 0.2})
    assert sorted(list(three.values()).count(p) for p in ("training", "validation", "test")) == [10, 20, 70]


def test_lists_win_unlisted_follow_the_rule_and_are_reported(tmp_path) -> None:
    split = _write(tmp_path, {
        "source": "toy", "unit": "patient",
        "training": ["1", "2"], "validation": ["3"], "test": ["9"],
        "rule": {"id_pattern": r"\d+", "seed": 0, "fractions": {"training": 0.5, "validation": 0.5}},
    })
    # the converter put 1 and 3 the other way round; 4..7 are unlisted; 9 is listed but absent
    datalist = _datalist({"training": ["3", "4", "5"], "validation": ["1", "2", "6", "7"]})
    result, report = apply_split(datalist, split, root="DL")
    cases = {part: {it["case"] for it in result[part]} for part in ("training", "validation")}
    expected_rule = assign_cases(["4", "5", "6", "7"], 0, {"training": 0.5, "validation": 0.5})
    assert cases["training"] == {"1", "2"} | {c for c, p in expected_rule.items() if p == "training"}
    assert cases["validation"] == {"3"} | {c for c, p in expected_rule.items() if p == "validation"}
    assert "test" not in result and result["split_file"] == str(split.path)
    assert len(result["training"]) + len(result["validation"]) == 14  # nothing dropped, nothing added
    lines = report.lines()
    assert len(lines) == 2
    assert lines[0].startswith("DL: 4 cases not listed in ") and "rule" in lines[0] and "4, 5, 6, 7" in lines[0]
    assert "1 of 4 listed cases are not in DL" in lines[1] and lines[1].endswith(": 9")


def test_without_a_rule_unlisted_cases_are_left_out_and_reported(tmp_path) -> None:
    split = _write(tmp_path, {"source": "toy", "unit": "case", "training": ["1"], "validation": ["2"]})
    result, report = apply_split(_datalist({"training": ["1", "2", "3"] + [str(i) for i in range(10, 20)]}), split)
    assert [it["case"] for it in result["training"]] == ["1", "1"]
    assert [it["case"] for it in result["validation"]] == ["2", "2"]
    (line,) = report.lines()
    assert "11 cases not listed" in line and "left out" in line and "3, 10, 11, 12, 13, ... (6 more)" in line


def test_release_parts_and_folds(tmp_path) -> None:
    split = _write(tmp_path, {
        "source": "toy", "unit": "patient", "folds": {"1": ["1", "2"], "2": ["3"]},
        "rule": {"id_pattern": r"\d+", "release": {"parts": ["training", "validation"], "from": "folds.csv"}},
    })
    datalist = {**_datalist({"training": ["1", "2", "4"], "validation": ["3", "5"]}), "fold": 2}
    result, report = apply_split(datalist, split)  # the converter's fold (2) validates
    assert {it["case"] for it in result["validation"]} == {"3", "5"} and result["fold"] == 2
    result, _ = apply_split(datalist, split, fold=1)
    assert {it["case"] for it in result["validation"]} == {"1", "2", "5"}
    assert {it["case"] for it in result["training"]} == {"3", "4"}
    assert "kept in the part the download's own split gives them: 4, 5" in report.lines()[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"source": "s", "unit": "u", "training": ["1"], "validation": ["1"]}, "in both training and validation"),
        ({"source": "s", "unit": "u", "training": ["a"], "rule": {"id_pattern": r"\d+"}}, "do not match its id_pattern"),
        ({"source": "s", "unit": "u", "rule": {"id_pattern": ".+", "seed": 0, "fractions": {"training": 0.5}}}, "summing to 1"),
        ({"source": "s", "unit": "u", "trainin": ["1"]}, "unknown keys"),
        ({"source": "s", "unit": "u", "training": "1 2"}, "list of case ids"),
        ({"source": "s", "unit": "u"}, "lists no case and states no rule"),
    ],
)
def test_bad_split_files_are_refused_naming_the_file(tmp_path, content, message) -> None:
    with pytest.raises(SplitFileError, match=message) as caught:
        _write(tmp_path, content, "bad.json")
    assert str(caught.value).startswith(str(tmp_path / "bad.json"))


def test_a_split_file_of_another_dataset_is_refused(tmp_path) -> None:
    split = load_split(DATA_LISTS / "camus.json")
    with pytest.raises(SplitFileError, match=r"2 case ids of toy do not match its id_pattern .*: 1, 2"):
        apply_split(_datalist({"training": ["1", "2"]}), split)


@pytest.mark.parametrize("name", ["ddti", "hc18", "carotid"])
def test_converters_reproduce_the_shipped_seeded_splits(real_data_dir, name) -> None:
    split = load_split(DATA_LISTS / f"{name}.json")
    datalist = convert_datalist(name, real_data_dir / name)
    present = {it["case"] for part in ("training", "validation") for it in datalist[part]}
    listed = split.assignment(None)
    if present != set(listed):
        pytest.skip(f"{real_data_dir / name} holds other cases than {split.path} lists (a seeded split depends on the set)")
    assert split_lists(datalist) == {part: list(ids) for part, ids in split.lists.items()}
    with_split = convert_datalist(name, real_data_dir / name, split=split.path)
    assert with_split["split_report"] == []
    for part in ("training", "validation"):
        assert [it["image"] for it in with_split[part]] == [it["image"] for it in datalist[part]]


def test_busbra_folds_are_the_official_partition(real_data_dir) -> None:
    split = load_split(DATA_LISTS / "busbra.json")
    datalist = convert_datalist("busbra", real_data_dir / "busbra")
    fold_of = {}
    for item in datalist["training"] + datalist["validation"]:
        fold_of.setdefault(item["case"], set()).add(item["kfold"])
    checked = 0
    for fold, ids in split.folds.items():
        for case in ids:
            if case in fold_of:
                assert fold_of[case] == {fold}, case
                checked += 1
    assert checked > 400
    result = convert_datalist("busbra", real_data_dir / "busbra", fold=2, split=split.path)
    assert {it["kfold"] for it in result["validation"]} == {2} and 2 not in {it["kfold"] for it in result["training"]}


def test_rule_path_and_cli_on_a_phantom(tmp_path, capsys) -> None:
    from echocare.cli import main
    from echocare.phantoms import generate_demo_data

    generate_demo_data("musv_seg", tmp_path / "ph", n=10, image_size=64)
    root = tmp_path / "ph" / "musv"
    plain = convert_datalist("musv", root, seed=0)
    out = tmp_path / "musv.json"
    main(["datalist", "musv", "--root", str(root), "--split", str(DATA_LISTS / "musv.json"), "--out", str(out)])
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert split_lists(written) == split_lists(plain) and len(split_lists(plain)["validation"]) == 1
    assert written["split_file"] == str(DATA_LISTS / "musv.json")
    assert f"5 cases not listed in {DATA_LISTS / 'musv.json'}, assigned by its rule's seeded split" in printed
    # the rule's seed is the file's, not --seed's; the root may be positional as before
    main(["datalist", "musv", str(root), "--split", str(DATA_LISTS / "musv.json"), "--out", str(out), "--seed", "7"])
    assert split_lists(json.loads(out.read_text())) == split_lists(plain)
    main(["datalist", "musv", str(root), "--out", str(out), "--seed", "7"])  # no --split: as before
    assert json.loads(out.read_text()).get("split_file") is None
