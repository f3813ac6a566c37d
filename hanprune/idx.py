"""The IDX format of MNIST's files: uint8 images, (N, H, W) for one channel (magic 2051, as MNIST)
or (N, C, H, W) (magic 2052), and uint8 labels (magic 2049), each behind a big-endian header of
the magic number and the dimensions."""
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_MAGICS = (2051, 2052)  # uint8, 3 dimensions (N, H, W) or 4 (N, C, H, W)
LABEL_MAGIC = 2049  # uint8, 1 dimension


def idx_images(images: np.ndarray) -> bytes:
    """IDX bytes of uint8 images (N, H, W) or (N, C, H, W)."""
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
    magic = IMAGE_MAGICS[images.ndim - 3]
    return struct.pack(f">I{images.ndim}I", magic, *images.shape) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", LABEL_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes()


def read_idx(path: Path, magics: tuple[int, ...]) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: missing; run the download stage")
    data = path.read_bytes()
    header = 4 + 4 * (magics[0] & 0xFF)
    if len(data) < 4:
        raise DataError(f"{path}: truncated ({len(data)} bytes, header needs {header})")
    (found,) = struct.unpack(">I", data[:4])
    if found not in magics:
        raise DataError(f"{path}: wrong magic number {found}, expected {' or '.join(map(str, magics))}")
    header = 4 + 4 * (found & 0xFF)
    if len(data) < header:
        raise DataError(f"{path}: truncated ({len(data)} bytes, header needs {header})")
    dims = struct.unpack(f">{found & 0xFF}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: truncated or padded: {len(data)} bytes, header implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
