"""Helpers that bundle configs call."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLES_DIR", "as_bool", "bundle_dir"]

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
    known = sorted(p.parent.name for p in BUNDLES_DIR.glob("*/configs") if p.is_dir())
    raise FileNotFoundError(
        f"{name}: no such bundle in {BUNDLES_DIR} or ./bundles (known: {', '.join(known) or 'none'}); "
        "give a bundle folder, or pass --bundle_root explicitly"
    )


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off", "none", ""}


def as_bool(value: object) -> bool:
    """A config flag as a bool. ``--resume false`` on the command line arrives as the string
    "false" (python-fire only parses Python literals such as ``False``), which plain
    truthiness would read as True."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"not a yes/no value: {value!r} (use true or false)")
    return bool(value)
