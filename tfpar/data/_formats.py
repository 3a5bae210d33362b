"""File-format sniffing for the readers: a few header bytes say what a file is before TensorFlow reads it.

Image signatures (the formats ``tf.io.decode_image`` reads), TFRecord record headers (masked
CRC32C of the length) and GZIP/ZLIB headers, ``.npy`` / ``.npz`` headers. Private to
:mod:`tfpar.data`; the public readers are in :mod:`tfpar.data.readers`.
"""

from __future__ import annotations

import os
import struct

import tensorflow as tf

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# The first bytes of every format tf.io.decode_image reads (it goes by content, not extension).
_IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
)
_SIGNATURE_BYTES = 16
COMPRESSION_TYPES = (None, "", "ZLIB", "GZIP")


def _is_local(path: str) -> bool:
    return "://" not in path


def _has_image(folder: str) -> bool:
    """Whether `folder` holds an image file at any depth (stops at the first one)."""
    return any(_is_image(f) for _, _, files in os.walk(folder) for f in files)


def _head(path: str, size: int) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as file:
        return file.read(size)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    """The checksum a TFRecord header stores for its 8 length bytes (TFRecord's masked CRC32C)."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord_problem(path: str, compression_type: str | None) -> str | None:
    """Why `path` cannot be a TFRecord file (from its first 12 bytes), or None if it may be one."""
    try:
        head = _head(path, 12)
    except (OSError, tf.errors.OpError) as error:
        return f"cannot be opened: {getattr(error, 'message', None) or error}"
    if compression_type == "GZIP":
        return None if head[:2] == b"\x1f\x8b" else f"is not GZIP-compressed (it starts with {head!r})"
    if compression_type == "ZLIB":
        zlib_header = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] * 256 + head[1]) % 31 == 0
        return None if zlib_header else f"is not ZLIB-compressed (it starts with {head!r})"
    if not head:
        return None  # an empty TFRecord file: no records
    if head[:2] == b"\x1f\x8b":
        return "is GZIP-compressed: pass compression_type='GZIP'"
    image = _image_format(head)
    if image is not None:
        return (
            f"is a {image} image: for images pass their folder (class sub-folders) or use "
            "tfpar.data.read_images([...])"
        )
    if len(head) < 12 or _masked_crc32c(head[:8]) != struct.unpack("<I", head[8:12])[0]:
        return f"does not start with a TFRecord record header (it starts with {head!r})"
    return None


def _check_tfrecord_file(path: str, compression_type: str | None, *, expected: str = "") -> None:
    problem = _tfrecord_problem(path, compression_type)
    if problem is not None:
        raise ValueError(
            f"{path!r} is not a TFRecord file: it {problem}. "
            f"{expected or 'Expected TFRecord files, as tfpar.data.write_tfrecords or tf.io.TFRecordWriter write them.'} "
            f"Received: path={path!r}"
        )


def _check_numpy_file(path: str) -> None:
    """Raises unless `path` starts like a .npy file (``\\x93NUMPY``) or a .npz (zip) archive."""
    with open(path, "rb") as file:
        head = file.read(8)
    if path.endswith(".npy"):
        ok, kind = head.startswith(b"\x93NUMPY"), "a .npy file (it starts with b'\\x93NUMPY')"
    else:
        ok, kind = head[:4] in (b"PK\x03\x04", b"PK\x05\x06"), "a .npz file (a zip archive, starting with b'PK')"
    if not ok:
        raise ValueError(
            f"{path!r} is not {kind}: it starts with {head!r}"
            f"{' (it is empty)' if not head else ''}. Expected a file written by "
            f"{'np.save' if path.endswith('.npy') else 'np.savez'}. Received: path={path!r}"
        )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_format(head: bytes) -> str | None:
    """The image format whose signature `head` (a file's first bytes) starts with, or None."""
    for signature, name in _IMAGE_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _image_file_problem(path: str) -> str | None:
    """Why `path` cannot be a readable image (from its first bytes), or None if it may be one."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SIGNATURE_BYTES)
    except OSError as error:
        return f"cannot be opened: {error.strerror or error}"
    if not head:
        return "is empty (0 bytes)"
    if _image_format(head) is None:
        return f"is not a JPEG, PNG, GIF, BMP, WebP or JPEG XL image (it starts with {head!r})"
    return None
