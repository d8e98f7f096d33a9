"""The studies folder as MONAI Label's datastore, with uploads kept inside it.

MONAI Label's ``LocalDatastore`` joins image ids and label tags from requests
(``PUT /datastore/image?image=ID``, ``PUT /datastore/label?image=ID&tag=TAG``) onto the studies
folder unchecked, so ``../../x`` writes outside it, and it stores a file of any extension. Here
every id and tag a request names must be one plain path component, an upload must be a file
kind the app serves (images for images; masks, enhancement targets and JSON labels for labels, a
JSON label size-limited and read as data), and an image
upload never replaces an image already in the folder. Viewer sessions (``POST /session/``)
take files but not archives, which ``shutil.unpack_archive`` would unpack outside the session
folder when a member is named ``../...``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.utils.sessions import Sessions

from lib.validation import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    RequestFieldError,
    check_extension,
    check_json_label,
    check_store_name,
)

__all__ = ["StudiesDatastore", "UploadSessions"]


def _checked(check: Any, *args: Any) -> Any:
    """``check(*args)``, a refusal answered as HTTP 422 naming the request field."""
    try:
        return check(*args)
    except RequestFieldError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None


class StudiesDatastore(LocalDatastore):
    """``LocalDatastore`` on a studies folder that refuses ids and tags with a path separator,
    ``..`` or an absolute path (HTTP 422, naming the request field), uploads of other file kinds
    than ``image_extensions`` / ``label_extensions`` (422), labels for images it does not hold
    (404) and image uploads over an image it holds (409).

    Args:
        datastore_path: the studies folder.
        image_extensions: image file extensions an upload may have (``.nii.gz`` form).
        label_extensions: label file extensions a saved label may have.
        kwargs: ``LocalDatastore``'s other arguments (``extensions``, ``auto_reload``, ``read_only``).
    """

    def __init__(
        self,
        datastore_path: str,
        image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
        label_extensions: Iterable[str] = LABEL_EXTENSIONS,
        **kwargs: Any,
    ) -> None:
        self.image_extensions = frozenset(e.lower() for e in image_extensions)
        self.label_extensions = frozenset(e.lower() for e in label_extensions)
        super().__init__(datastore_path, **kwargs)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        _checked(check_extension, image_filename, self.image_extensions, "file")
        if not image_id:
            image_id = self._to_id(os.path.basename(image_filename))[0]
        _checked(check_store_name, image_id, "image")
        extension = self._to_id(os.path.basename(image_filename))[1]
        destination = os.path.join(self._datastore.image_path(), self._filename(image_id, extension))
        if image_id in self._datastore.objects or os.path.lexists(destination):
            # an upload never replaces a study: the annotators' labels refer to it
            raise HTTPException(status_code=409, detail=f"image: {image_id!r} is already in the studies folder; "
                                                        "upload it under another id")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        _checked(check_store_name, image_id, "image")
        _checked(check_store_name, label_tag, "tag")
        extension = _checked(check_extension, label_filename, self.label_extensions, "label")
        if extension.lower() == ".json":  # read as data: size-limited, one object, nothing evaluated
            _checked(check_json_label, label_filename)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"image: no image {image_id!r} in the studies folder")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        _checked(check_store_name, image_id, "id")
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        _checked(check_store_name, label_id, "id")
        _checked(check_store_name, label_tag, "tag")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        _checked(check_store_name, image_id, "image")
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        _checked(check_store_name, label_id, "label")
        _checked(check_store_name, label_tag, "tag")
        super().update_label_info(label_id, label_tag, info)


class UploadSessions(Sessions):
    """MONAI Label's viewer sessions without unpacking archives: ``POST /session/?uncompress=true``
    is answered HTTP 422 (Python 3.11's ``shutil.unpack_archive`` writes a tar member named
    ``../x`` outside the folder it unpacks to)."""

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None) -> Any:
        if uncompress:
            raise HTTPException(status_code=422, detail="uncompress: this app does not unpack archives; upload the "
                                                        "image files themselves")
        return super().add_session(data_file, expiry, uncompress=False, session_id=session_id)
