"""Build train/test LMDB databases from a folder of images (the logic behind scripts/prepare_data.py).

Crops:
- ``celeba``: the crop NVAE used for CelebA 64. An aligned CelebA image (178x218) is cut to the
  148x148 box (left 15, top 40, right 163, bottom 188), i.e. centred horizontally and 5 px below the
  vertical centre, which frames the face; any other size gets a centred square of its shorter side.
- ``center``: a centred square of the shorter side.
Then a PIL bilinear (antialiased) resize to size x size, the same call torchvision's Resize makes.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from nvae.data.base import DatasetError, SPLITS
from nvae.data.lmdb_store import FORMATS, encode_image, verify_written, write_lmdb

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
CELEBA_ALIGNED_SIZE = (178, 218)  # (width, height) of img_align_celeba
CELEBA_BOX = (15, 40, 163, 188)  # (left, top, right, bottom): NVAE's CropCelebA64
Crop = Literal["celeba", "center"]


@dataclass(frozen=True)
class PrepareSpec:
    """How a folder of images becomes a data set's databases (default size, channels, crop)."""

    size: int
    channels: int
    crop: Crop
    fixed_shape: bool = False  # the data set's DatasetInfo fixes size and channels


def find_images(src: Path) -> list[Path]:
    """All image files under src, recursively, in a deterministic (sorted) order."""
    if not src.is_dir():
        raise DatasetError(f"source directory {src} does not exist or is not a directory")
    paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {src}")
    return paths


def crop_box(width: int, height: int, crop: Crop) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) for an image of the given size."""
    if crop == "celeba" and (width, height) == CELEBA_ALIGNED_SIZE:
        return CELEBA_BOX
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def load_image(path: Path, size: int, channels: int, crop: Crop) -> np.ndarray:
    """Read, crop, resize and convert one image file -> uint8 (C, size, size)."""
    try:
        with Image.open(path) as pil:
            pil = pil.convert("L" if channels == 1 else "RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e}); remove it from the source") from e
    pil = pil.crop(crop_box(pil.width, pil.height, crop)).resize((size, size), Image.BILINEAR)
    array = np.asarray(pil)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _encode_file(path: Path, size: int, channels: int, crop: Crop, fmt: str, jpeg_quality: int) -> bytes:
    """One source file -> one record (module level so worker processes can run it)."""
    return encode_image(load_image(path, size, channels, crop), fmt, jpeg_quality)


def split_indices(count: int, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """A seeded random train/test partition of range(count); each split keeps the sorted file order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, round(count * test_fraction))
    if n_test >= count:
        raise DatasetError(f"{count} image(s) cannot be split into non-empty train and test sets "
                           f"with test fraction {test_fraction}")
    order = np.random.default_rng(seed).permutation(count)
    return {"train": sorted(order[n_test:].tolist()), "test": sorted(order[:n_test].tolist())}


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory; unlike tempfile.mkdtemp it honours the umask (not 0700)."""
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def build_lmdb_dataset(
    src: Path,
    out: Path,
    spec: PrepareSpec,
    fmt: str = "png",
    test_fraction: float = 0.05,
    seed: int = 0,
    jpeg_quality: int = 95,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Write out/train and out/test from the images under src; returns the record count per split.

    Everything is written into a temporary directory next to out and renamed into place at the
    end, so on any error (or Ctrl-C) no partial database is left at out.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}; choose from {FORMATS}")
    paths = find_images(Path(src))
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists; pass --overwrite to replace it")
    splits = split_indices(len(paths), test_fraction, seed)
    shape = (spec.channels, spec.size, spec.size)
    encode = functools.partial(_encode_file, size=spec.size, channels=spec.channels, crop=spec.crop,
                               fmt=fmt, jpeg_quality=jpeg_quality)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.tmp-")
    pool: Optional[multiprocessing.pool.Pool] = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        for split in SPLITS:
            files = [paths[i] for i in splits[split]]
            records: Iterator[bytes] = pool.imap(encode, files, chunksize=32) if pool else map(encode, files)
            bar = tqdm(records, total=len(files), desc=f"{out.name}/{split}", unit="img", disable=not progress)
            write_lmdb(tmp / split, bar, len(files), shape, fmt)
            verify_written(tmp / split)  # read back what was written before it replaces anything
        if out.exists():
            old = _fresh_dir(out.parent, f".{out.name}.old-")
            os.replace(out, old)  # renaming onto an empty directory is allowed; onto a full one is not
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous databases back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    return {split: len(splits[split]) for split in SPLITS}
