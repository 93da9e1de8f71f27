"""Data sets for NVAE / EVaLP: one registry, items are float32 (C, H, W) images in [0, 1]."""
from nvae.data.base import HELD_OUT_PARTS, ArrayDataset, DatasetError, DatasetInfo, binarize_if_needed, held_out_part
from nvae.data.lmdb_store import LMDBDataset
from nvae.data.prepare import PrepareSpec, build_lmdb_dataset
from nvae.data.registry import available_datasets, dataset_info, get_dataset, lmdb_datasets, prepare_spec

__all__ = [
    "HELD_OUT_PARTS",
    "ArrayDataset",
    "DatasetError",
    "DatasetInfo",
    "LMDBDataset",
    "PrepareSpec",
    "available_datasets",
    "binarize_if_needed",
    "build_lmdb_dataset",
    "dataset_info",
    "get_dataset",
    "held_out_part",
    "lmdb_datasets",
    "prepare_spec",
]
