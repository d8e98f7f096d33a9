"""Request values are data: what each task accepts in a MONAI Label request, and the checks
that keep studies-folder ids and tags inside the studies folder.

Bundle configs evaluate any string that starts with ``$`` as Python, resolve ``@id``
references and ``%file::id`` macros, so a request value that reached a config unchecked could
run code or read files on the server. Every request is therefore checked against its task's
schema (field -> validator) before anything runs: unknown fields are refused, numbers must be
numbers, devices and names must match fixed patterns that no config syntax can start with.

A schema is a plain mapping, so a task declares the fields it reads::

    MY_TASK_FIELDS = {**INFER_FIELDS, "points": integer(minimum=0)}

Imports nothing from MONAI Label (tested in the project's own environment too).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from echocare.io.readers import SUPPORTED_SUFFIXES

__all__ = [
    "BATCH_FIELDS",
    "BATCH_INFER_FIELDS",
    "ENHANCEMENT_TRAIN_FIELDS",
    "IMAGE_EXTENSIONS",
    "INFER_FIELDS",
    "JSON_LABEL_LIMIT",
    "LABEL_EXTENSIONS",
    "REPORT_INFER_FIELDS",
    "RequestFieldError",
    "SEQUENCE_INFER_FIELDS",
    "SERVER_INFER_FIELDS",
    "TRAIN_FIELDS",
    "Validator",
    "batch_infer_fields",
    "boolean",
    "check_extension",
    "check_json_label",
    "check_store_name",
    "choice",
    "device",
    "gpus",
    "integer",
    "label_tag",
    "number",
    "optional",
    "safe_name",
    "tracking_uri",
    "validate_request",
]

#: A validator returns the value it accepts (possibly normalised) or raises ValueError with the
#: problem (the field name is added by :func:`validate_request`).
Validator = Callable[[Any], Any]

#: Image files an upload may add to the studies folder: what echocare's readers take.
IMAGE_EXTENSIONS = frozenset(SUPPORTED_SUFFIXES)
#: Label files a save may add: masks the train task reads (``echocare.tasks.supervised.read_label_map``),
#: enhancement targets (images of the same kinds), and the JSON labels of the other tasks (class,
#: ellipses, landmarks, EF, report).
LABEL_EXTENSIONS = frozenset({".png", ".bmp", ".gif", ".tif", ".tiff", ".nii", ".nii.gz", ".npy", ".json"})
#: The largest JSON label file accepted, in bytes (a report or a few hundred points fit many times).
JSON_LABEL_LIMIT = 256 * 1024

# Names (run names, experiment names, tags, model names): a letter or digit first, so that no
# config syntax ($ expression, @ reference, % macro) can start one; no '#', '/' or spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,2})?")
_GPUS = re.compile(r"all|[0-9]{1,2}(,[0-9]{1,2})*")
_HTTP_URI = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~\-/]*)?")
_SQLITE_URI = re.compile(r"sqlite:///[A-Za-z0-9._~\-/]+\.db")
_FILE_URI = re.compile(r"file:(//)?/[A-Za-z0-9._~\-/]+")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class RequestFieldError(ValueError):
    """A request field with a value the task does not accept; the message is
    ``"<field>: <problem>"``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a refused payload can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(minimum: int | None = None, maximum: int | None = None) -> Validator:
    """An int (not a bool, not a string of digits) in ``[minimum, maximum]``."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{_shown(value)} is not an integer")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"{value} is outside {minimum if minimum is not None else '-inf'}.."
                             f"{maximum if maximum is not None else 'inf'}")
        return value

    return check


def number(minimum: float | None = None, below: float | None = None, above: float | None = None) -> Validator:
    """A finite int or float (not a bool): ``>= minimum``, ``< below``, ``> above`` where given."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{_shown(value)} is not a number")
        if minimum is not None and value < minimum:
            raise ValueError(f"{value} is below {minimum}")
        if below is not None and value >= below:
            raise ValueError(f"{value} is not below {below}")
        if above is not None and value <= above:
            raise ValueError(f"{value} is not above {above}")
        return float(value)

    return check


def boolean(value: Any) -> bool:
    """``true``/``false`` (JSON booleans only)."""
    if not isinstance(value, bool):
        raise ValueError(f"{_shown(value)} is not true or false")
    return value


def choice(*allowed: str, case_sensitive: bool = True) -> Validator:
    """One of ``allowed`` (strings)."""

    def check(value: Any) -> str:
        if isinstance(value, str):
            for option in allowed:
                if value == option or (not case_sensitive and value.lower() == option.lower()):
                    return option
        raise ValueError(f"{_shown(value)} is not one of {', '.join(allowed)}")

    return check


def device(value: Any) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"{_shown(value)} is not a device; use cpu, cuda or cuda:N")
    return value


def gpus(value: Any) -> str:
    """``all`` or comma-separated GPU indices (``0,1``), as MONAI Label's task runner sets."""
    if not isinstance(value, str) or not _GPUS.fullmatch(value):
        raise ValueError(f"{_shown(value)} is not 'all' or GPU indices such as 0,1")
    return value


def safe_name(value: Any) -> str:
    """A name of letters, digits, ``_``, ``.`` and ``-`` (at most 128), starting with a letter or
    digit, without ``..``: it can be neither a config expression, reference or macro, nor a path."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{_shown(value)} is not a plain name (letters, digits, _ . -, starting with a letter "
                         "or digit)")
    return value


#: A label tag names a folder of the studies folder's ``labels/``: a plain name.
label_tag = safe_name


def tracking_uri(value: Any) -> str:
    """An MLflow tracking URI: ``http(s)://host[:port][/path]``, ``sqlite:///path.db`` or
    ``file:///path`` (no credentials, query, fragment, ``..``, spaces or quotes)."""
    if isinstance(value, str) and ".." not in value and any(
        pattern.fullmatch(value) for pattern in (_HTTP_URI, _SQLITE_URI, _FILE_URI)
    ):
        return value
    raise ValueError(f"{_shown(value)} is not a tracking URI; use http(s)://host[:port][/path], "
                     "sqlite:///path.db or file:///path")


def optional(validator: Validator) -> Validator:
    """``""`` or ``None`` (meaning "the default"), else what ``validator`` accepts."""

    def check(value: Any) -> Any:
        return "" if value in (None, "") else validator(value)

    return check


def _image_source(value: Any) -> str:
    """An image id of the studies folder, or the path MONAI Label gave an uploaded file (the app
    checks that the id exists, or that the path is in its own upload folders)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_shown(value)} is not an image id")
    return value if os.path.isabs(value) else check_store_name(value, "image")


def _studies_image(value: Any) -> str:
    """An image id of the studies folder (the app checks that it exists); never a path."""
    return check_store_name(value, "image2")


def _upload_path(value: Any) -> str:
    """The path MONAI Label gave an uploaded file (the app checks that it is in its upload folders)."""
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"{_shown(value)} is set by the server for an uploaded file")
    return value


def _batch_images(value: Any) -> list[str] | str:
    """``all``, ``labeled``, ``unlabeled`` or a list of image ids of the studies folder."""
    if isinstance(value, list):
        return [check_store_name(item, "images") for item in value]
    return choice("all", "labeled", "unlabeled")(value)


def _session(value: Any) -> Mapping:
    """MONAI Label's session record (set by the server from ``session_id``; the tasks ignore it)."""
    if not isinstance(value, Mapping):
        raise ValueError("is set by the server from session_id")
    return value


#: Fields MONAI Label's ``/infer`` route itself sets, the same for every infer task: the model
#: (from the path), the image (an id, or the server's copy of an upload), an uploaded label and
#: the session record.
SERVER_INFER_FIELDS: dict[str, Validator] = {
    "model": safe_name,
    "image": _image_source,
    "label": _upload_path,
    "session": _session,
}

#: What the segmentation and classification infer tasks read (``EchoCareInfer`` and MONAI
#: Label's ``BasicInferTask`` and ``MONAILabelApp.infer`` around it).
INFER_FIELDS: dict[str, Validator] = {
    **SERVER_INFER_FIELDS,
    "frame": integer(-100_000, 100_000),
    "device": device,
    "save_label": boolean,
    "label_tag": label_tag,
    "logging": choice(*_LOG_LEVELS, case_sensitive=False),
    "timeout": number(above=0),
}

#: What the sequence infer task reads (``camus_ef``: the whole sequence, so no ``frame``).
SEQUENCE_INFER_FIELDS: dict[str, Validator] = {key: value for key, value in INFER_FIELDS.items() if key != "frame"}

#: What the report infer task reads (``usreport``): the second view as an image id of the
#: studies folder (the app checks that it exists); without it the image is used as both views.
REPORT_INFER_FIELDS: dict[str, Validator] = {
    **SEQUENCE_INFER_FIELDS,
    "image2": _studies_image,
}

#: What MONAI Label's batch inference itself reads (``images``: which images of the studies
#: folder, or a list of their ids); it sets ``image`` for every image.
BATCH_FIELDS: dict[str, Validator] = {
    "images": _batch_images,
    "max_batch_size": integer(0),
    "max_workers": integer(0),
    "multi_gpu": boolean,
    "gpus": gpus,
}


def batch_infer_fields(infer_fields: Mapping[str, Validator]) -> dict[str, Validator]:
    """The schema of a batch inference with an infer task of schema ``infer_fields``: the task's
    fields but the per-image ones MONAI Label sets, and :data:`BATCH_FIELDS`."""
    per_image = ("image", "image2", "label", "session")
    return {**{key: value for key, value in infer_fields.items() if key not in per_image}, **BATCH_FIELDS}


#: The batch inference schema of the segmentation and classification infer tasks.
BATCH_INFER_FIELDS = batch_infer_fields(INFER_FIELDS)

#: What the train task (``EchoCareTrain``) reads; ``gpus`` and ``local_rank`` are set by MONAI
#: Label's background task runner (``monailabel.interfaces.utils.app``).
TRAIN_FIELDS: dict[str, Validator] = {
    "model": safe_name,
    "max_epochs": integer(1, 100_000),
    "val_split": number(minimum=0, below=1),
    "pretrained": boolean,
    "seed": integer(0, 2**32 - 1),
    "label_tag": label_tag,
    "device": device,
    "tracking_uri": optional(tracking_uri),
    "tracking_experiment_name": optional(safe_name),
    "run_name": optional(safe_name),
    "gpus": gpus,
    "local_rank": integer(0, 1023),
}


#: What the enhancement train task reads: the high-quality ``target`` images are labels saved
#: under ``target_tag`` (default ``target``), paired with the images they are saved for.
ENHANCEMENT_TRAIN_FIELDS: dict[str, Validator] = {
    **{key: value for key, value in TRAIN_FIELDS.items() if key != "label_tag"},
    "target_tag": label_tag,
}


def validate_request(fields: Mapping[str, Validator], request: Mapping[str, Any]) -> dict[str, Any]:
    """``request`` checked field by field against ``fields`` (a task's schema).

    Returns:
        the request with each value as its validator returned it.

    Raises:
        RequestFieldError: an unknown field (the message lists the accepted ones), or a value
            its validator refuses; the message starts with the field name.
    """
    checked: dict[str, Any] = {}
    for key, value in request.items():
        validator = fields.get(key) if isinstance(key, str) else None
        if validator is None:
            raise RequestFieldError(str(key), f"unknown field; this task accepts {', '.join(sorted(fields))}")
        try:
            checked[key] = validator(value)
        except RequestFieldError:
            raise
        except (TypeError, ValueError) as error:
            raise RequestFieldError(key, str(error)) from None
    return checked


def check_store_name(value: Any, what: str) -> str:
    """An image id, label id or label tag of the studies folder: one path component, without
    ``..``, not absolute, no NUL.

    Raises:
        RequestFieldError: ``"<what>: <problem>"``.
    """
    if not isinstance(value, str) or not value:
        raise RequestFieldError(what, f"{_shown(value)} is not a name")
    if os.path.isabs(value) or "/" in value or "\\" in value or "\0" in value or ".." in value:
        raise RequestFieldError(what, f"{_shown(value)} must be a plain name inside the studies folder "
                                      "(no path separator, '..' or absolute path)")
    return value


def check_extension(filename: str, allowed: Iterable[str], what: str) -> str:
    """The extension of ``filename`` that is in ``allowed`` (``.nii.gz`` before ``.gz``;
    case-insensitive), as the file has it.

    Raises:
        RequestFieldError: no allowed extension (the message lists them).
    """
    name = os.path.basename(filename)
    for extension in sorted(allowed, key=len, reverse=True):
        if name.lower().endswith(extension) and len(name) > len(extension):
            return name[-len(extension):]
    # MONAI Label names its copy of an upload tmpXXXX<the upload's suffixes>: show the suffixes
    suffixes = "".join(Path(name).suffixes)
    kind = f"a {_shown(suffixes)} file" if suffixes else "a file without extension"
    raise RequestFieldError(what, f"{kind} is not one of the file types this app serves ({', '.join(sorted(allowed))})")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_json_label(path: str | os.PathLike[str], limit: int = JSON_LABEL_LIMIT) -> dict[str, Any]:
    """A JSON label file read as data: at most ``limit`` bytes, UTF-8, one JSON object, no
    ``NaN``/``Infinity``. Nothing in it is evaluated; what its keys must hold is checked by the
    task that reads it (``lib.labels``).

    Raises:
        RequestFieldError: ``"label: <file>: <problem>"``.
    """
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise ValueError(f"{size} bytes; a JSON label holds at most {limit}")
        with open(path, "rb") as handle:
            content = json.loads(handle.read().decode("utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RequestFieldError("label", f"{name}: not a usable JSON label ({error})") from None
    if not isinstance(content, dict):
        raise RequestFieldError("label", f"{name}: a JSON label is an object {{key: value}}, not {type(content).__name__}")
    return content
