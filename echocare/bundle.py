"""Helpers that bundle configs call."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLES_DIR", "bundle_dir"]

#: The ``bundles/`` folder of the source checkout this package was installed from.
BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def bundle_dir(name: str) -> str:
    """The folder of bundle ``name``: in this checkout's ``bundles/``, else in ``./bundles``.

    Configs use it as the default ``bundle_root`` (and so ``output_dir``); MONAI Label and
    users override ``bundle_root`` when the bundle lives elsewhere.
    """
    for root in (BUNDLES_DIR, Path.cwd() / "bundles"):
        if (root / name / "configs").is_dir():
            return str(root / name)
    raise FileNotFoundError(
        f"bundle {name!r} not found in {BUNDLES_DIR} or ./bundles; pass --bundle_root explicitly"
    )
