"""HDF5 read throughput of the feature cache, for each storage dtype and compression, against a raw read of the same bytes.

A cache of N x D features is written through ``pipeline.cache.write_features``, so it has the chunking and filters
``pipeline extract`` gives it (1 MiB chunks of whole rows; shuffle + lzf or gzip level 4). The same array is also
written as a plain binary file. Each is then read the ways the project reads:

- raw: the plain file into a preallocated array with ``readinto`` (the disk's speed for these bytes);
- whole: ``FeatureCache.features()``, what fit-head and evaluate do when the features fit in memory;
- blocks: contiguous blocks of ``block_rows_for(..., 64 MiB)`` rows, what the streaming scaler does;
- pieces: the shuffled pieces of ``pipeline.stream.minibatches`` (64 pieces per 64 MiB buffer, in random order),
  what a streamed head reads every epoch.

Throughput is counted in uncompressed feature bytes (N x D x itemsize): MB/s of features delivered, whatever the
file's size on disk. blocks and pieces convert to float32 as ``pipeline.stream`` does. Cold reads drop the page cache
first (``echo 3 > /proc/sys/vm/drop_caches``, root only); warm reads follow a read of the same file. Each figure
is the median of ``--repeats`` reads.

Usage: python bench/hdf5_read_bench.py [--rows 20000] [--dims 1280] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline.cache import COMPRESSIONS, DTYPES, read_cache, write_features
from pipeline.stream import block_rows_for, minibatches

BLOCK_BYTES = 64 * 2**20  # HeadConfig.block_mb's default


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _features(rows: int, dims: int, seed: int = 0) -> np.ndarray:
    """ReLU-like features: a per-dimension mean plus noise, clipped at zero (about 40 % zeros), in blocks."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.2, 0.5, dims).astype(np.float32)
    out = np.empty((rows, dims), np.float32)
    for a in range(0, rows, 4096):
        b = min(rows, a + 4096)
        out[a:b] = np.maximum(mean + rng.normal(0, 1, (b - a, dims)).astype(np.float32), 0)
    return out


def _time(read: Callable[[], object], repeats: int, cold: bool, path: Path) -> float | None:
    times = []
    for _ in range(repeats):
        if cold:
            if not _drop_caches():
                return None
        else:
            read()  # warm the page cache with this very file
        t0 = time.perf_counter()
        read()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _raw_reader(path: Path, shape: tuple[int, int], dtype: np.dtype) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        out = np.empty(shape, dtype)
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(out).cast("B"))
        return out

    return read


def _whole_reader(path: Path) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        with read_cache(path) as c:
            return c.features()

    return read


def _block_reader(path: Path) -> Callable[[], int]:
    def read() -> int:
        n = 0
        with read_cache(path) as c:
            d = c.dataset()
            step = block_rows_for(d, BLOCK_BYTES)
            for a in range(0, d.shape[0], step):
                n += np.asarray(d[a : a + step], dtype=np.float32).shape[0]
        return n

    return read


def _piece_reader(path: Path) -> Callable[[], int]:
    def read() -> int:
        n = 0
        with read_cache(path) as c:
            d = c.dataset()
            labels = np.zeros(d.shape[0], np.int64)
            batches = minibatches(d, labels, np.random.default_rng(0), block_rows=block_rows_for(d, BLOCK_BYTES),
                                  batch_size=1 << 30, transform=lambda X: X)
            for X, _ in batches:
                n += len(X)
        return n

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Where to write the test files (a real disk, not tmpfs).  [default: the system temp folder]")
    parser.add_argument("--out", default="bench/results/hdf5_read.json")
    args = parser.parse_args()
    X32 = _features(args.rows, args.dims)
    y = np.arange(args.rows) % 10
    settings = {"model": "synthetic", "weights": "none", "weights_sha256": None, "taps": ["pool:output"], "preprocess": {}, "amp": False}
    can_drop = _drop_caches()
    rows = []
    with tempfile.TemporaryDirectory(prefix="h5bench-", dir=args.dir) as tmp:
        for dtype in DTYPES:
            X = X32.astype(dtype)
            raw = Path(tmp) / f"raw-{dtype}.bin"
            X.tofile(raw)
            mb = X.nbytes / 1e6
            raw_read = _raw_reader(raw, X.shape, X.dtype)
            raw_cold = _time(raw_read, args.repeats, True, raw) if can_drop else None
            raw_warm = _time(raw_read, args.repeats, False, raw)
            assert np.array_equal(raw_read(), X)
            for compression in COMPRESSIONS:
                path = Path(tmp) / f"{dtype}-{compression}.h5"
                write_features(path, X, y, [f"c{i}" for i in range(10)], {**settings, "dtype": dtype}, tap="pool:output", compression=compression)
                with h5py.File(path, "r") as f:
                    d = f["features/pool:output"]
                    chunks, size = d.chunks, d.id.get_storage_size()
                assert np.array_equal(_whole_reader(path)(), X)
                for how, reader in (("whole", _whole_reader(path)), ("blocks", _block_reader(path)), ("pieces", _piece_reader(path))):
                    cold = _time(reader, args.repeats, True, path) if can_drop else None
                    warm = _time(reader, args.repeats, False, path)
                    row = {
                        "dtype": dtype, "compression": compression, "read": how, "chunks": list(chunks),
                        "stored_mb": round(size / 1e6, 1), "feature_mb": round(mb, 1),
                        "cold_mb_s": round(mb / cold, 1) if cold else None, "warm_mb_s": round(mb / warm, 1),
                        "raw_cold_mb_s": round(mb / raw_cold, 1) if raw_cold else None, "raw_warm_mb_s": round(mb / raw_warm, 1),
                    }
                    row["cold_vs_raw"] = round(raw_cold / cold, 2) if cold else None
                    row["warm_vs_raw"] = round(raw_warm / warm, 2)
                    rows.append(row)
                    print(f"{dtype:<8} {compression:<5} {how:<7} stored {row['stored_mb']:>6} MB  "
                          f"cold {row['cold_mb_s'] or '-':>7} MB/s ({row['cold_vs_raw'] or '-'} x raw {row['raw_cold_mb_s'] or '-'})  "
                          f"warm {row['warm_mb_s']:>7} MB/s ({row['warm_vs_raw']} x raw {row['raw_warm_mb_s']})", flush=True)
                path.unlink()
            raw.unlink()
    summary = {"rows": args.rows, "dims": args.dims, "repeats": args.repeats, "page_cache_dropped": can_drop,
               "machine": f"{platform.machine()} {os.cpu_count()} cores", "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
               "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"-> {args.out}" + ("" if can_drop else "  (page cache not dropped: cold figures missing, reads are warm)"))


if __name__ == "__main__":
    main()
