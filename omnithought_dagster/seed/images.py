"""A record's images read inside the roots it was granted, checked as rasters, normalised and hashed."""

from __future__ import annotations

import functools
import io
import stat
from dataclasses import dataclass
from pathlib import Path

from omnithought_dagster.ids import bytes_id
from omnithought_dagster.seed.fields import Reject
from omnithought_dagster.seed.settings import SeedSettings
from omnithought_dagster.seed.sources.base import (
    ImageRef,
    QuarantineReason,
    error_text,
)
from omnithought_dagster.seed.sources.confine import OutsideRoots, inside, open_regular, opened_path

_EXIF_ORIENTATION = 0x0112


# The raster formats a seed image may be in (PIL format names); anything else is unsupported_image_format.
SEED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


_RASTER_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # WEBP: RIFF....WEBP


@dataclass
class CheckedImage:
    image_id: str
    data: bytes | None  # None once a worker stored it (the bytes need not travel back)
    width: int
    height: int
    format: str
    mode: str
    phash: str
    n_bytes: int
    stored: bool | None = None  # set by a worker that stored the bytes: True when new to the store


def load_image(
    ref: ImageRef,
    position: int,
    image_root: Path | None,
    settings: SeedSettings,
    allowed_roots: list[Path] = (),
    read_roots: tuple[str, ...] | None = None,
) -> CheckedImage:
    """Read, bound-check, decode and hash one image, or reject the record with the reason."""
    label = f"image {position} ({ref.describe()})"
    data = ref.data if ref.data is not None else _read_image_file(ref.path or "", label, image_root, settings, allowed_roots, read_roots)
    if not data:
        raise Reject(QuarantineReason.EMPTY_IMAGE, f"{label} is zero bytes")
    if len(data) > settings.max_image_bytes:
        raise Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {len(data)} bytes, limit {settings.max_image_bytes}")

    import imagehash
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Only the raster formats a seed pool holds are tried: without `formats`, PIL tries every plugin it
        # has, and some (EPS) run external programs.
        with Image.open(io.BytesIO(data), formats=SEED_IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise Reject(
                    QuarantineReason.OVERSIZED_IMAGE,
                    f"{label} is {width}x{height} = {width * height} pixels, limit {settings.max_image_pixels}",
                )
            image.load()
            fmt = image.format or "unknown"
            # What a person sees: the EXIF orientation applied before the size and the hash are taken (looked up
            # first: exif_transpose copies the image even when there is nothing to turn).
            upright = (ImageOps.exif_transpose(image) or image) if image.getexif().get(_EXIF_ORIENTATION, 1) != 1 else image
            width, height = upright.size
            phash = str(imagehash.phash(upright))
            mode = upright.mode
    except Reject:
        raise
    except Image.DecompressionBombError as exc:
        raise Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label}: {exc}") from None
    except UnidentifiedImageError:
        if not data.startswith(_RASTER_SIGNATURES) and data[8:12] != b"WEBP":
            raise Reject(
                QuarantineReason.UNSUPPORTED_IMAGE_FORMAT, f"{label} is not one of {', '.join(SEED_IMAGE_FORMATS)} (starts {data[:12]!r})"
            ) from None
        raise Reject(QuarantineReason.CORRUPT_IMAGE, f"{label} does not decode as the format its header names") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad bytes
        raise Reject(QuarantineReason.CORRUPT_IMAGE, f"{label} does not decode: {type(exc).__name__}: {exc}") from None
    return CheckedImage(bytes_id(data), data, width, height, fmt, mode, phash, len(data))


def _read_image_file(
    path: str,
    label: str,
    image_root: Path | None,
    settings: SeedSettings,
    allowed_roots: list[Path] = (),
    read_roots: tuple[str, ...] | None = None,
) -> bytes:
    if image_root is None:
        raise Reject(QuarantineReason.MALFORMED_RECORD, f"{label}: a path, but this source has no image root")
    if not path.strip():
        raise Reject(QuarantineReason.MISSING_IMAGE, f"{label}: empty path")
    try:
        root, allowed = _resolved_roots(image_root, tuple(allowed_roots))
        target = (root / path).resolve()  # absolute paths replace root; symlinks are followed
        if not any(target.is_relative_to(folder) for folder in allowed):
            hint = (
                "; an absolute path - if the source's images live there, list that folder in its allowed_image_roots"
                if Path(path).is_absolute()
                else ""
            )
            raise Reject(QuarantineReason.PATH_ESCAPE, f"{label} resolves to {target}, outside the source root {root}{hint}")
        try:
            info = target.stat()  # before any open: a FIFO or a device would block or never end
        except FileNotFoundError:
            raise Reject(QuarantineReason.MISSING_IMAGE, f"{label}: no file at {target}") from None
        if not stat.S_ISREG(info.st_mode):
            raise Reject(QuarantineReason.MISSING_IMAGE, f"{label}: no file at {target} (a folder, pipe or device)")
        if info.st_size == 0:
            raise Reject(QuarantineReason.EMPTY_IMAGE, f"{label} is zero bytes")
        if info.st_size > settings.max_image_bytes:
            raise Reject(QuarantineReason.OVERSIZED_IMAGE, f"{label} is {info.st_size} bytes, limit {settings.max_image_bytes}")
        try:  # checked again on what was opened: a name swapped since its check (or a FIFO) is not read
            handle = open_regular(target, [str(folder) for folder in allowed])
            if read_roots is not None and not any(inside(opened_path(handle.fileno(), target), root) for root in read_roots):
                handle.close()
                raise OutsideRoots(f"{label} lies outside the folders this source may read")
        except OutsideRoots:
            raise Reject(
                QuarantineReason.PATH_ESCAPE,
                f"{label} changed between its check and its read, or lies outside the folders this source may read; not read",
            ) from None
        with handle:
            return handle.read(settings.max_image_bytes + 1)
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names too long, NUL bytes, permissions
        raise Reject(QuarantineReason.UNREADABLE_IMAGE, f"{label} cannot be read: {error_text(exc)}") from None


@functools.lru_cache(maxsize=64)
def _resolved_roots(image_root: Path, allowed_roots: tuple[Path, ...]) -> tuple[Path, list[Path]]:
    """The image root and every folder image paths may resolve into, resolved once per source (not per image)."""
    root = image_root.resolve()
    return root, [root, *(folder.resolve() for folder in allowed_roots)]
