"""The base of the errors EchoCare expects users to meet (bad input, missing file, refused request).

``echocare`` (the command) prints such an error as one line, ``error: <file>: <problem>``, and
exits with status 2; any other exception is a bug and keeps its traceback for ``--debug``. Most
of the project's own errors also subclass ``ValueError`` (e.g.
:class:`echocare.io.readers.UltrasoundReadError`), which the command treats the same way.
"""

from __future__ import annotations

__all__ = ["EchoCareError"]


class EchoCareError(Exception):
    """An expected failure whose message is the whole story: one line that starts with the file,
    folder or address concerned, then the problem (and what to do about it, where it is not obvious)."""
