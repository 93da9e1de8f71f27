"""LMDB image databases: the format written by scripts/prepare_data.py and the dataset that reads it.

One database is one LMDB directory (data.mdb, lock.mdb) holding
    b"__len__"     ASCII decimal N, the number of records
    b"__shape__"   ASCII "C,H,W" (C is 1 or 3), the shape of every image
    b"__format__"  ASCII png | jpeg | raw
    b"%08d" % i    record i, 0 <= i < N: PNG or JPEG file bytes, or raw uint8 bytes in (C, H, W) order
The writer stores the metadata last, so a database cut short by a crash has none and is refused.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from nvae.data.base import DatasetError, DatasetInfo

FORMATS: tuple[str, ...] = ("png", "jpeg", "raw")
LEN_KEY = b"__len__"
SHAPE_KEY = b"__shape__"
FORMAT_KEY = b"__format__"
META_KEYS = (LEN_KEY, SHAPE_KEY, FORMAT_KEY)
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_PIL_MODE = {1: "L", 3: "RGB"}
COMMIT_EVERY = 1000  # records per write transaction: bounds the writer's dirty pages


def record_key(index: int) -> bytes:
    """Key of record index."""
    return b"%08d" % index


def encode_image(image: np.ndarray, fmt: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (C, H, W) -> record bytes in fmt (PNG is lossless, JPEG lossy, raw the bytes as they are)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in _PIL_MODE:
        raise ValueError(f"expected a uint8 (C, H, W) image with C in (1, 3), got {image.dtype} {image.shape}")
    if fmt == "raw":
        return np.ascontiguousarray(image).tobytes()
    pil = Image.fromarray(np.ascontiguousarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)  # 4:4:4 keeps small faces sharp
    elif fmt == "png":
        pil.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown record format {fmt!r}; choose from {FORMATS}")
    return buffer.getvalue()


def decode_record(value: bytes, fmt: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Record bytes -> uint8 (C, H, W); raises ValueError describing what is wrong with the record."""
    c, h, w = shape
    if fmt == "raw":
        if len(value) != c * h * w:
            raise ValueError(f"raw record has {len(value)} bytes, expected {c * h * w} for {c}x{h}x{w}")
        return np.frombuffer(value, dtype=np.uint8).reshape(c, h, w)
    try:
        with Image.open(io.BytesIO(value)) as pil:
            pil_format, mode = pil.format, pil.mode
            array = np.asarray(pil)  # forces the full decode, so truncated data fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ValueError(f"undecodable {fmt} data ({type(e).__name__}: {e})") from e
    if pil_format != _PIL_FORMAT[fmt]:
        raise ValueError(f"record is {pil_format} data, database says {fmt}")
    if mode != _PIL_MODE[c]:
        raise ValueError(f"image mode {mode}, expected {_PIL_MODE[c]} for {c} channel(s)")
    if array.shape[:2] != (h, w):
        raise ValueError(f"image is {array.shape[0]}x{array.shape[1]}, expected {h}x{w}")
    return array[None] if c == 1 else array.transpose(2, 0, 1)


@dataclass(frozen=True)
class LMDBMeta:
    """The metadata of one database."""

    length: int
    shape: tuple[int, int, int]  # (C, H, W)
    fmt: str


# py-lmdb refuses to open one database file twice in a process, so every reader in a process shares
# one handle per file: (st_dev, st_ino) of data.mdb -> (pid that opened it, environment).
_ENVIRONMENTS: dict[tuple[int, int], tuple[int, lmdb.Environment]] = {}


def _open_readonly(path: Path) -> lmdb.Environment:
    """Open without the lock file: readers never write, and nothing is shared between processes."""
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)


def shared_environment(path: Path) -> lmdb.Environment:
    """This process's read-only handle on the database at path.

    A handle inherited through fork (DataLoader workers) is closed in the child, which only drops the
    child's copy of the mapping, and the database is opened afresh: LMDB handles must not cross a fork.
    A database replaced on disk has a new inode and gets a new handle; the old one keeps serving the
    datasets that still read it.
    """
    st = (path / "data.mdb").stat()
    key = (st.st_dev, st.st_ino)
    cached = _ENVIRONMENTS.get(key)
    if cached is not None:
        pid, env = cached
        if pid == os.getpid():
            return env
        env.close()
    env = _open_readonly(path)
    _ENVIRONMENTS[key] = (os.getpid(), env)
    return env


def _rebuild_hint(name: str, path: Path) -> str:
    """How to (re)build the database at path (ROOT/split)."""
    return f"build it with: python scripts/prepare_data.py --dataset {name} --src IMAGE_DIR --out {path.parent}"


def _parse_meta(path: Path, txn: lmdb.Transaction, name: str) -> LMDBMeta:
    """Read and check the metadata keys."""
    raw = {}
    for key in META_KEYS:
        value = txn.get(key)
        if value is None:
            raise DatasetError(
                f"LMDB {path}: metadata key {key.decode()!r} missing (an incomplete database, or one not "
                f"written by scripts/prepare_data.py); {_rebuild_hint(name, path)}"
            )
        raw[key] = bytes(value).decode("ascii", errors="replace")
    try:
        length = int(raw[LEN_KEY])
        c, h, w = (int(v) for v in raw[SHAPE_KEY].split(","))
    except ValueError:
        raise DatasetError(f"LMDB {path}: unreadable metadata {raw[LEN_KEY]!r} / {raw[SHAPE_KEY]!r}; "
                           f"{_rebuild_hint(name, path)}") from None
    fmt = raw[FORMAT_KEY]
    if length < 1 or c not in _PIL_MODE or h < 1 or w < 1 or fmt not in FORMATS:
        raise DatasetError(f"LMDB {path}: invalid metadata (__len__={length}, __shape__={raw[SHAPE_KEY]}, "
                           f"__format__={fmt}); {_rebuild_hint(name, path)}")
    return LMDBMeta(length, (c, h, w), fmt)


def _check_database(path: Path, env: lmdb.Environment, name: str) -> LMDBMeta:
    """Metadata, record count and the first and last records of an open database."""
    with env.begin() as txn:
        meta = _parse_meta(path, txn, name)
        stored = env.stat()["entries"] - len(META_KEYS)
        if stored != meta.length:
            raise DatasetError(f"LMDB {path}: metadata key '__len__' says {meta.length} records but the "
                               f"database holds {stored}; {_rebuild_hint(name, path)}")
        for index in sorted({0, meta.length - 1}):
            _decode_checked(path, txn, index, meta, name)
    return meta


def read_lmdb_meta(path: Path, name: str = "lmdb") -> LMDBMeta:
    """Check a database (metadata, record count, first and last records) and return its metadata.

    Records in between are checked when read (decoding them all would cost minutes on CelebA).
    The handle stays open for this process's datasets (see shared_environment).
    """
    if not (path / "data.mdb").is_file():
        hint = " (ROOT must hold one directory per split)" if (path.parent / "data.mdb").is_file() else ""
        raise DatasetError(f"LMDB database {path} not found{hint}; {_rebuild_hint(name, path)}")
    try:
        env = shared_environment(path)
    except (lmdb.Error, OSError) as e:
        raise DatasetError(f"LMDB {path}: cannot open ({e}); {_rebuild_hint(name, path)}") from e
    return _check_database(path, env, name)


def verify_written(path: Path) -> LMDBMeta:
    """Check a database just written, through a handle closed afterwards (nothing stays open)."""
    env = _open_readonly(path)
    try:
        return _check_database(path, env, "lmdb")
    finally:
        env.close()


def _decode_checked(path: Path, txn: lmdb.Transaction, index: int, meta: LMDBMeta, name: str) -> np.ndarray:
    """Read and decode one record, turning any problem into a DatasetError naming file and key."""
    key = record_key(index)
    value = txn.get(key)
    if value is None:
        raise DatasetError(f"LMDB {path}: record key {key.decode()!r} missing; {_rebuild_hint(name, path)}")
    try:
        return decode_record(bytes(value), meta.fmt, meta.shape)
    except ValueError as e:
        raise DatasetError(
            f"LMDB {path}: record key {key.decode()!r} is corrupt: {e}; {_rebuild_hint(name, path)}"
        ) from e


class LMDBDataset(Dataset):
    """Images of one LMDB database as float32 (C, H, W) in [0, 1].

    The environment opens lazily in whichever process reads first (and again after a fork), so
    forked DataLoader workers each hold their own read-only handle; pickling drops it (spawn).
    """

    def __init__(self, path: Path, info: DatasetInfo, expected_shape: Optional[tuple[int, int, int]] = None) -> None:
        self.path = Path(path)
        self.info = info
        self.meta = read_lmdb_meta(self.path, info.name)
        if expected_shape is not None and self.meta.shape != tuple(expected_shape):
            got, want = ("x".join(map(str, s)) for s in (self.meta.shape, expected_shape))
            raise DatasetError(f"LMDB {self.path}: metadata key '__shape__' says {got} images, data set "
                               f"{info.name} needs {want}; {_rebuild_hint(info.name, self.path)}, "
                               f"or read it as --dataset lmdb")
        self._env: Optional[lmdb.Environment] = None
        self._pid = -1

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env = shared_environment(self.path)
            self._pid = os.getpid()
        return self._env

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, -1  # an environment handle cannot cross processes
        return state

    def __len__(self) -> int:
        return self.meta.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.meta.length:
            raise IndexError(f"index {index} out of range for {self.meta.length} records")
        with self._environment().begin() as txn:
            image = _decode_checked(self.path, txn, index, self.meta, self.info.name)
        return torch.from_numpy(image.copy()).float().div_(255.0)  # (C, H, W)


def write_lmdb(path: Path, records: Iterable[bytes], count: int, shape: tuple[int, int, int], fmt: str) -> None:
    """Write count encoded records into a new database at path, then its metadata.

    map_size bounds the file's growth, not its size: twice the raw bytes per record plus a page of
    slack covers PNG/JPEG overhead on tiny or incompressible images.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}; choose from {FORMATS}")
    c, h, w = shape
    map_size = count * (2 * c * h * w + 4096) + (1 << 24)
    env = lmdb.open(str(path), map_size=map_size, subdir=True, meminit=False)
    try:
        txn = env.begin(write=True)
        written = 0
        try:
            for value in records:
                txn.put(record_key(written), value)
                written += 1
                if written % COMMIT_EVERY == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            if written != count:
                raise ValueError(f"expected {count} records, got {written}")
            txn.put(LEN_KEY, str(count).encode())
            txn.put(SHAPE_KEY, f"{c},{h},{w}".encode())
            txn.put(FORMAT_KEY, fmt.encode())
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        env.sync(True)
    finally:
        env.close()
