"""Run by the MONAI Label server environment's Python (see tests/test_apps_monailabel.py): reports
its package versions, checks them against echocare's stated requirements, and reads files with
echocare's readers so that the test compares them with the project environment's reads.

Usage: python monailabel_env_probe.py SPEC.json   (SPEC: {"out": DIR, "reads": [[path, frames], ...]})
Writes DIR/report.json and DIR/read_<i>.npy.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement

import echocare
from echocare.io import read_ultrasound


def unmet_requirements(distribution: str) -> list[str]:
    """``distribution``'s install requirements (no extras) that the installed versions miss."""
    problems = []
    for text in metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement}: not installed")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: installed {version}")
    return problems


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    versions = {name: metadata.version(name) for name in ("torch", "numpy", "pydicom", "monai", "monailabel", "itk")}
    for i, (path, frames) in enumerate(spec.get("reads", [])):
        np.save(out / f"read_{i}.npy", read_ultrasound(path, frames=frames))
    report = {"versions": versions, "unmet": unmet_requirements("echocare"), "echocare_file": echocare.__file__}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
