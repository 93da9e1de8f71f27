"""Build train/test LMDB databases from a folder of images.

    python scripts/prepare_data.py --dataset celeba64 --src DIR --out data/celeba64_lmdb

celeba64 applies NVAE's CelebA 64 crop (148x148 face box of the aligned 178x218 images, else a
centred square) and resizes to 64; lmdb applies a centred square crop and resizes to --size.
The databases are read back by nvae.data.get_dataset(NAME, split, root=OUT).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from nvae.data import DatasetError, build_lmdb_dataset, lmdb_datasets, prepare_spec  # noqa: E402
from nvae.data.lmdb_store import FORMATS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, in groups."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--dataset", type=str, required=True, choices=lmdb_datasets(), help="data set to build")
    io.add_argument("--src", type=Path, required=True, help="folder of images, searched recursively")
    io.add_argument("--out", type=Path, required=True, help="output directory; receives train/ and test/")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    images = parser.add_argument_group("images")
    images.add_argument("--size", type=int, default=None, help="side in pixels (default: the data set's, 64)")
    images.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="1 (grey) or 3 (RGB) (default: the data set's, 3)")
    images.add_argument("--format", type=str, choices=FORMATS, default="png",
                        help="record encoding: png (lossless), jpeg (lossy, smaller), raw (fastest to read)")
    images.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality for --format jpeg")
    split = parser.add_argument_group("split")
    split.add_argument("--test-fraction", type=float, default=0.05, help="fraction of images held out as test")
    split.add_argument("--seed", type=int, default=0, help="seed of the random train/test split")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1, help="processes decoding and encoding images")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    default = prepare_spec(args.dataset)
    if default.fixed_shape and (args.size not in (None, default.size) or args.channels not in (None, default.channels)):
        parser.error(f"{args.dataset} images are {default.channels}x{default.size}x{default.size}; "
                     f"use --dataset lmdb for other sizes or channel counts")
    if args.workers < 1 or (args.size is not None and args.size < 1) or not 1 <= args.jpeg_quality <= 100:
        parser.error("--workers and --size must be >= 1 and --jpeg-quality in 1..100")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the databases; returns the exit status."""
    args = parse_args(argv)
    default = prepare_spec(args.dataset)
    spec = dataclasses.replace(default, size=args.size or default.size, channels=args.channels or default.channels)
    try:
        counts = build_lmdb_dataset(args.src, args.out, spec, fmt=args.format, test_fraction=args.test_fraction,
                                    seed=args.seed, jpeg_quality=args.jpeg_quality, workers=args.workers,
                                    overwrite=args.overwrite, progress=not args.no_progress)
    except DatasetError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
