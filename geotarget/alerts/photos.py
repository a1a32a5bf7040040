"""Photos of the missing person, carried by every push's CAP as ``<resource>``.

A report may carry photos (a file path, or ``(bytes, mime_type)``).  Each is
checked before anything is logged: the MIME type must be one of
:data:`MIME_TYPES`, the bytes must start with that type's magic bytes, and the
size must be within the settings' ``[photos] max_bytes``.  Bad input is an
:class:`~geotarget.errors.InvalidInputError`.

The bytes are kept content-addressed in a :class:`PhotoStore` directory
(``<sha1>.<ext>``, mode 0600, written to a temporary file, fsynced, renamed,
directory fsynced).  The alert's log record keeps only the list of
:class:`Photo` descriptions (digest, MIME type, size, description), covered
by the log's checksum and HMAC like every other alert field.  Every push
reads each photo back and checks its SHA-1 against the recorded digest: a
file that was changed or lost is a :class:`~geotarget.errors.CorruptFileError`,
never a wrong digest in a CAP message.

CAP 1.2 names SHA-1 for ``<digest>``; it is used here as the CAP spec says,
and as a file name.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._fs import fsync_dir
from ..errors import CorruptFileError, InvalidInputError

__all__ = ["MIME_TYPES", "Photo", "PhotoStore", "check_photo_bytes", "photo_uri"]

#: Allowed MIME types and their file extensions.
MIME_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
_DIGEST = re.compile(r"[0-9a-f]{40}")
_MAX_DESC = 200


def _magic_ok(data: bytes, mime_type: str) -> bool:
    if mime_type == "image/jpeg":
        return data[:3] == b"\xff\xd8\xff"
    if mime_type == "image/png":
        return data[:8] == b"\x89PNG\r\n\x1a\n"
    if mime_type == "image/webp":
        return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return False


def check_photo_bytes(data: object, mime_type: object, max_bytes: int, name: str = "photo") -> bytes:
    """Return ``data`` as bytes if it is a photo of ``mime_type`` within ``max_bytes``; else raise."""
    if not isinstance(mime_type, str) or mime_type not in MIME_TYPES:
        raise InvalidInputError(f"{name}: mime_type={mime_type!r} must be one of {', '.join(MIME_TYPES)}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{name}: the photo must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInputError(f"{name}: the photo is empty")
    if len(data) > max_bytes:
        raise InvalidInputError(f"{name}: {len(data):,} bytes exceed the limit of {max_bytes:,} "
                                f"([photos] max_bytes)")
    if not _magic_ok(data, mime_type):
        raise InvalidInputError(f"{name}: the bytes are not a {mime_type} file (wrong magic bytes)")
    return data


def _check_desc(desc: object, name: str) -> str:
    if not isinstance(desc, str) or len(desc) > _MAX_DESC or any(
            (ord(c) < 32 and c not in "\t") or ord(c) == 127 for c in desc):
        raise InvalidInputError(f"{name}: description={desc!r} must be a string of at most "
                                f"{_MAX_DESC} printable characters")
    return desc


@dataclass(frozen=True)
class Photo:
    """What an alert records of one photo; the bytes live in the :class:`PhotoStore`."""

    digest: str        # SHA-1 of the bytes, lower-case hex
    mime_type: str
    size: int
    desc: str = ""

    def to_dict(self) -> dict:
        return {"digest": self.digest, "mime_type": self.mime_type, "size": self.size, "desc": self.desc}

    @classmethod
    def from_dict(cls, d: object, where: str = "photo") -> "Photo":
        """A Photo from its record; a malformed record is a :class:`CorruptFileError`."""
        ok = (isinstance(d, dict) and set(d) == {"digest", "mime_type", "size", "desc"}
              and isinstance(d["digest"], str) and _DIGEST.fullmatch(d["digest"])
              and d["mime_type"] in MIME_TYPES and isinstance(d["size"], int)
              and not isinstance(d["size"], bool) and d["size"] > 0 and isinstance(d["desc"], str))
        if not ok:
            raise CorruptFileError(f"{where}: malformed photo record {d!r}")
        return cls(d["digest"], d["mime_type"], d["size"], d["desc"])

    @property
    def file_name(self) -> str:
        return f"{self.digest}.{MIME_TYPES[self.mime_type]}"


def photo_uri(base_uri: str, photo: Photo) -> str:
    """The photo's ``<uri>``: the settings' base URI and its digest-based file name."""
    return base_uri.rstrip("/") + "/" + photo.file_name


class PhotoStore:
    """A directory of photos, each named by its SHA-1 digest (created 0700 on first write)."""

    def __init__(self, directory) -> None:
        try:
            self.directory = Path(os.fspath(directory))
        except TypeError:
            raise InvalidInputError(f"photo_dir must be a str or os.PathLike, got {directory!r}") from None

    def path(self, photo: Photo) -> Path:
        return self.directory / photo.file_name

    def put(self, data: bytes, mime_type: str, desc: str = "") -> Photo:
        """Store checked bytes durably (temp file, fsync, rename, fsync dir; 0600); return the Photo."""
        photo = Photo(hashlib.sha1(data).hexdigest(), mime_type, len(data), desc)
        dst = self.path(photo)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if dst.exists():
            try:
                self.read(photo)
                return photo            # the same bytes are already there, intact
            except CorruptFileError:
                pass                    # a damaged copy: write it again
        tmp = self.directory / f".{photo.digest}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, dst)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(self.directory)
        return photo

    def read(self, photo: Photo) -> bytes:
        """The photo's bytes, checked against its digest and size (:class:`CorruptFileError` if not)."""
        p = self.path(photo)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise CorruptFileError(f"photo {p}: missing (the alert records it)") from None
        except OSError as exc:
            raise CorruptFileError(f"photo {p}: cannot read: {exc}") from None
        if len(data) != photo.size or hashlib.sha1(data).hexdigest() != photo.digest:
            raise CorruptFileError(f"photo {p}: its bytes do not match the recorded digest "
                                   f"{photo.digest} and size {photo.size}")
        return data

    def delete(self, photo: Photo) -> bool:
        """Remove the photo's file; True if there was one."""
        try:
            os.unlink(self.path(photo))
        except FileNotFoundError:
            return False
        return True


def load_photo(item: object, max_bytes: int, index: int) -> tuple[bytes, str, str]:
    """``(bytes, mime_type, desc)`` of one ``photos`` item: a path, or ``(bytes, mime_type[, desc])``.

    A path's MIME type is read from its extension (.jpg/.jpeg, .png, .webp)
    and its bytes must match it.  The file is read at most ``max_bytes + 1``
    bytes far, so a huge file is refused without reading it all.
    """
    name = f"photos[{index}]"
    if isinstance(item, (str, os.PathLike)):
        p = Path(os.fspath(item))
        ext = p.suffix.lower().lstrip(".")
        mime = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(ext)
        if mime is None:
            raise InvalidInputError(f"{name}: {str(p)!r} must end in .jpg, .jpeg, .png or .webp")
        try:
            with open(p, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InvalidInputError(f"{name}: cannot read {str(p)!r}: {exc}") from None
        return check_photo_bytes(data, mime, max_bytes, name), mime, ""
    if isinstance(item, tuple) and len(item) in (2, 3):
        data, mime = item[0], item[1]
        desc = _check_desc(item[2], name) if len(item) == 3 else ""
        return check_photo_bytes(data, mime, max_bytes, name), mime, desc
    raise InvalidInputError(f"{name}: {type(item).__name__} is neither a file path nor a "
                            f"(bytes, mime_type[, description]) tuple")
