"""What a client may send to ``POST /predict``, checked before anything is decoded.

The HTTP process does the cheap checks here, so a bad request costs no model time and gets the
right status code: the body is read with a size cap and a deadline (a slow client cannot hold
a connection open forever, a large one is refused from its ``Content-Length`` before it is
read), the multipart form is parsed with a cap on its parts, and every image's header is
opened (format allow-list, pixel limit, minimum size) without decoding its pixels. Only bytes
leave this module: no client input ever becomes a file path or a URL.
"""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from detector.data.decode import IMAGE_FORMATS, pixel_limit_reason
from detector.data.scan import _describe_non_image as describe_non_image

FIELD = "file"
# Content types taken as one image in the raw body (with none, the bytes decide).
RAW_TYPES = ("image/", "application/octet-stream")
MULTIPART = "multipart/form-data"


class UploadError(Exception):
    """A request the service refuses: an HTTP status and one line that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """The service's caps on one request (conf/serve.yaml)."""

    max_bytes: int
    max_files: int
    max_pixels: int
    min_size: int
    upload_timeout: float


@dataclass(frozen=True)
class Upload:
    """One image as received: a display name (never used as a path) and its bytes."""

    name: str
    data: bytes
    width: int
    height: int
    format: str


Receive = Callable[[], Awaitable[dict]]


async def read_body(receive: Receive, headers: Headers, limits: Limits) -> bytes:
    """The whole body, or UploadError: 413 as soon as it is known to be over the cap (from
    ``Content-Length``, before reading, or while reading a chunked one), 408 when the client
    has not sent it all within ``upload_timeout`` seconds."""
    mb = limits.max_bytes / 2**20
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limits.max_bytes:
            raise UploadError(
                413, f"upload of {int(declared) / 2**20:.1f} MB is over max_upload_mb={mb:g}"
            )
    deadline = time.monotonic() + limits.upload_timeout
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
        except TimeoutError:
            raise UploadError(
                408,
                f"upload not received within upload_timeout={limits.upload_timeout:g} s "
                f"({size:,} bytes arrived)",
            ) from None
        if message["type"] == "http.disconnect":
            raise UploadError(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_bytes:
            raise UploadError(413, f"upload is over max_upload_mb={mb:g}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _form_files(headers: Headers, body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    parser = MultiPartParser(
        headers, _replay(body), max_files=limits.max_files, max_fields=limits.max_files
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise UploadError(
                413, f"more than max_files={limits.max_files} '{FIELD}' fields in one request"
            ) from None
        raise UploadError(400, f"malformed multipart body: {e.message}") from None
    try:
        files = []
        for key, value in form.multi_items():
            if key != FIELD or not isinstance(value, UploadFile):
                raise UploadError(
                    400, f"form field {key!r} is not accepted: send images as '{FIELD}' files"
                )
            files.append((value.filename or f"{FIELD}{len(files) + 1}", await value.read()))
        return files
    finally:
        await form.close()


async def parse_uploads(headers: Headers, body: bytes, limits: Limits) -> list[Upload]:
    """Images of a multipart form (``file`` fields) or of a raw body, header-checked."""
    content_type = headers.get("content-type", "").strip().lower()
    if not body:
        raise UploadError(
            400, f"empty body: send an image as multipart field '{FIELD}' or as the raw body"
        )
    if content_type.startswith(MULTIPART):
        files = await _form_files(headers, body, limits)
        if not files:
            raise UploadError(400, f"no '{FIELD}' field in the multipart form")
    elif not content_type or content_type.startswith(RAW_TYPES):
        files = [("body", body)]
    else:
        raise UploadError(
            415,
            f"Content-Type {content_type.split(';')[0]} is not accepted: send {MULTIPART} with "
            f"'{FIELD}' fields, or the image itself as image/* or application/octet-stream",
        )
    return [check_image(name, data, limits, i, len(files)) for i, (name, data) in enumerate(files)]


def check_image(name: str, data: bytes, limits: Limits, index: int = 0, n: int = 1) -> Upload:
    """Opens the header only (PIL reads no pixels before ``load``): 413 for a decompression
    bomb, 422 for anything that is not a usable image, with the file named."""
    label = f"file {index + 1} of {n} ({name!r})" if n > 1 else repr(name)
    if not data:
        raise UploadError(422, f"{label}: empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise UploadError(413, f"{label}: refused without decoding ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            reason = describe_non_image(data[:512])
            raise UploadError(422, f"{label}: {reason}") from None
    with img:
        if img.format not in IMAGE_FORMATS:
            allowed = ", ".join(sorted(IMAGE_FORMATS))
            raise UploadError(
                422, f"{label}: unsupported format {img.format} (accepted: {allowed})"
            )
        width, height = img.size
        too_big = pixel_limit_reason(width, height, limits.max_pixels)
        if too_big:
            raise UploadError(413, f"{label}: {too_big.replace('data.max_pixels', 'max_pixels')}")
        if min(width, height) < limits.min_size:
            raise UploadError(
                422,
                f"{label}: {width}x{height} pixels is smaller than min_size={limits.min_size}",
            )
        return Upload(name, data, width, height, img.format)
