"""Contact sheet of every DICOM in a folder, as read by ``echocare.io.read_ultrasound``.

One tile per file (first frame), plus a second tile with the middle frame for
multi-frame files, each titled with the file name, photometric interpretation and
shape. It is for a person to check orientation and colour at a glance.

Usage::

    python benchmarks/dicom_contact_sheet.py --data ../shared/data/dicom_us --out /tmp/dicom_contact_sheet.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: this script only writes a file
import matplotlib.pyplot as plt  # noqa: E402

from echocare.io.readers import UltrasoundReadError, count_frames, read_metadata, read_ultrasound


def _dicom_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in (".dcm", ".dicom")]
    return files


def make_contact_sheet(data: Path, out: Path, columns: int = 5) -> int:
    """Write the sheet to ``out``; returns the number of files that could not be read."""
    tiles: list[tuple[str, object]] = []
    failures = 0
    for path in _dicom_files(data):
        try:
            n = count_frames(path)
            meta = read_metadata(path)
            picks = [0] if n == 1 else [0, n // 2]
            frames = read_ultrasound(path, frames=picks)
        except UltrasoundReadError as exc:
            failures += 1
            tiles.append((f"{path.name}\nFAILED: {exc.problem[:60]}", None))
            continue
        for k, frame in zip(picks, frames):
            title = f"{path.name}\n{meta.get('photometric_interpretation')} {n}x{frame.shape[0]}x{frame.shape[1]}"
            if n > 1:
                title += f" f{k}"
            tiles.append((title, frame))
    if not tiles:
        raise SystemExit(f"no DICOM files in {data}")
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.6, rows * 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, frame) in zip(axes.flat, tiles):
        if frame is not None:
            # The arrays are RGB in [0, 1] with row 0 at the top: imshow's default
            # origin="upper" shows them as a person should see them.
            ax.imshow(frame, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"read_ultrasound on {data.name}/ ({len(tiles)} tiles)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding the DICOM files")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--columns", type=int, default=5)
    args = parser.parse_args(argv)
    failures = make_contact_sheet(args.data, args.out, args.columns)
    print(f"wrote {args.out} ({failures} unreadable file(s))")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
