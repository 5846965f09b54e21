"""Extraction on a busy CPU: img/s alone and beside N busy-looping processes, for both ways ONNX Runtime uses the cores.

The two modes are `--parallel operators` (one session, every operator split over all cores, a barrier after each) and
`--parallel batches` (one single-threaded run per core, each on its own batch). Each measurement is a fresh
`pipeline.extract()` into its own cache folder (the script stops if extract reports anything but a fresh extraction),
and two figures come from it:

- **extract**: the img/s that extract reports and `pipeline extract` prints: its batch loop, with the ONNX export and
  its check against eager on the first batch, and the shard writes;
- **steady**: the same loader driven by `BatchRunner` with its engine built and checked beforehand, every batch timed,
  so the start-up does not hide or exaggerate the ratio on a few hundred images.

Neighbours are separate Python processes spinning in `while True: pass`, started before a measurement and stopped
after it. Rounds interleave quiet and busy, and alternate which mode goes first, so that drift in the machine's other
load reaches every cell alike. Printed: per mode the quiet and busy medians, busy/quiet, and the quiet ratio
batches/operators; the issue's goal is busy/quiet >= 0.4 with 2 neighbours, without losing quiet throughput.

Usage: python bench/busy_bench.py [--data data/fashion-mnist] [--images 300] [--neighbours 2] [--rounds 3]
Smoke run (seconds, numbers meaningless): python bench/busy_bench.py --images 12 --rounds 1 --neighbours 1 --crop 32 --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, for its helpers
from extract_bench import WEIGHTS, subset  # noqa: E402
from synthetic import make_image_folder  # noqa: E402
from results import machine, save  # noqa: E402

from pipeline import ExtractConfig, extract, load_backbone  # noqa: E402
from pipeline.backbones import WeightsUnavailableError  # noqa: E402
from pipeline.config import PARALLEL  # noqa: E402
from pipeline.data import ImageDataset, load_split  # noqa: E402
from pipeline.engines import BatchRunner, make_engine  # noqa: E402
from pipeline.extract import auto_workers  # noqa: E402
from pipeline.runtime import resolve_runtime  # noqa: E402
from pipeline.taps import TapExtractor, resolve_taps  # noqa: E402

GOAL = 0.4  # busy/quiet with 2 neighbours, from the issue


@contextmanager
def neighbours(n: int) -> Iterator[None]:
    """``n`` processes that keep a core each busy for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)  # let them start spinning before the clock does
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def dataset(args: argparse.Namespace, tmp: Path) -> Path:
    """The images: a class-balanced subset of the real test split when --data exists, else generated 28 px images."""
    if Path(args.data).is_dir():
        return subset(Path(args.data), args.images, tmp / "subset")
    print(f"{args.data} not found: generating {args.images} 28x28 PNGs instead (run `make dataset` for the real ones)")
    return make_image_folder(tmp / "generated", {"test": max(1, args.images // 3)}, size=(28, 28))


def settings(args: argparse.Namespace, data: Path, weights: str, mode: str, cache_dir: Path) -> ExtractConfig:
    crop = {"crop": args.crop, "resize": args.crop * 8 // 7} if args.crop else {}
    return ExtractConfig(data=str(data), split="test", model=args.model, weights=weights, batch_size=args.batch_size,
                         device="cpu", engine="onnx", parallel=mode, cache_dir=str(cache_dir), **crop)


def extract_rate(config: ExtractConfig) -> float:
    """img/s as extract reports it, for one fresh extraction."""
    result = extract(config, progress=False)
    if result.status != "extracted":
        raise SystemExit(f"extract reported {result.status!r}: the benchmark must time a fresh extraction")
    return result.images_per_s


def steady_rate(config: ExtractConfig) -> float:
    """img/s of extract's batch loop with the engine already built and checked: every batch, no start-up."""
    split = load_split(config.dataset, config.split)
    bb = load_backbone(config.model, config.weights, resize=config.resize, crop=config.crop)
    runtime = resolve_runtime(config.device, config.amp)
    inputs = runtime.inputs(bb.preprocess)
    workers = auto_workers("cpu") if config.workers is None else config.workers
    loader = torch.utils.data.DataLoader(ImageDataset(Path(config.data), split.paths, inputs.transform), batch_size=config.batch_size,
                                         num_workers=workers, collate_fn=inputs.collate)
    with TapExtractor(bb.model, resolve_taps(bb.model, config.layers, config.capture)) as extractor:
        runner = BatchRunner(loader, extractor, config.engine, runtime, parallel=config.parallel, inputs=inputs)
        runner.engine = make_engine(config.engine, extractor, runtime, next(iter(loader))[1][:2], parallel=config.parallel, inputs=inputs)
        t0 = time.perf_counter()
        n = sum(len(index) for index, _, _ in runner)
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--images", type=int, default=300, help="images extracted per measurement")
    ap.add_argument("--neighbours", type=int, default=2, help="busy-looping processes beside the busy measurements")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--crop", type=int, default=None, help="override the weights' crop (smoke runs only)")
    ap.add_argument("--out", default="bench/results/busy.json")
    args = ap.parse_args()
    weights = WEIGHTS.get(args.model, "DEFAULT")
    try:
        load_backbone(args.model, weights)
    except WeightsUnavailableError:
        weights = "none"  # random weights: the same arithmetic, so the same time
    rates: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-busy-") as tmp:
        tmp = Path(tmp)
        data = dataset(args, tmp)
        n = len(load_split(ExtractConfig(data=str(data)).dataset, "test"))
        for r in range(args.rounds):
            modes = PARALLEL if r % 2 == 0 else PARALLEL[::-1]
            for label, count in (("quiet", 0), ("busy", args.neighbours)):
                with neighbours(count):
                    for mode in modes:
                        config = settings(args, data, weights, mode, tmp / f"{mode}-{label}-{r}")
                        rates.setdefault((mode, label, "extract"), []).append(extract_rate(config))
                        rates.setdefault((mode, label, "steady"), []).append(steady_rate(config))
            print(f"round {r + 1}: " + ", ".join(f"{m} {c} {k} {v[-1]:.1f}" for (m, c, k), v in rates.items()), flush=True)
    med = {key: statistics.median(v) for key, v in rates.items()}
    rows = []
    for kind in ("extract", "steady"):
        for mode in PARALLEL:
            quiet, busy = med[(mode, "quiet", kind)], med[(mode, "busy", kind)]
            rows.append({"figure": kind, "parallel": mode, "quiet_img_s": quiet, "busy_img_s": busy, "busy_over_quiet": busy / quiet,
                         "quiet_over_operators": quiet / med[("operators", "quiet", kind)],
                         "runs_quiet": rates[(mode, "quiet", kind)], "runs_busy": rates[(mode, "busy", kind)]})
    meta = {**machine(), "model": args.model, "weights": weights, "images": n, "neighbours": args.neighbours, "rounds": args.rounds, "batch_size": args.batch_size,
            "crop": args.crop, "data": str(args.data) if Path(args.data).is_dir() else "generated 28x28"}
    save(args.out, meta, rows)
    print(f"\n{args.model} ({weights}), {n} images, {args.neighbours} busy neighbour(s), medians of {args.rounds} round(s):\n")
    print("| figure | --parallel | quiet img/s | busy img/s | busy / quiet | quiet vs operators |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['figure']} | {row['parallel']} | {row['quiet_img_s']:.1f} | {row['busy_img_s']:.1f} | {row['busy_over_quiet']:.2f}x | "
              f"{row['quiet_over_operators']:.2f}x |")
    print(f"\ngoal: busy / quiet >= {GOAL} with 2 neighbours, quiet no lower than operators'; {meta}")


if __name__ == "__main__":
    main()
