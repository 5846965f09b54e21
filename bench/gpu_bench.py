"""Extraction on a GPU, end to end from image files: img/s and where the time goes, for ResNet-50 and MobileNetV2.

Per model, in one run:

1. **end to end**: a fresh `pipeline.extract()` into its own cache folder, with its defaults for the device (on CUDA:
   bf16 autocast, channels_last, pinned memory, uint8 batches finished on the device); the img/s it reports.
2. **breakdown**: extract's own loader and stages, run one after another with the device synchronised between them, so
   each stage's time is its own: *decode* (what the loop waited for the DataLoader workers, which decode with PIL and
   crop on the host), *host-to-device* (the uint8 or float32 copy), *device preprocess* (normalising, and upscaling
   images smaller than the resize), *forward*, *write* (features back to the host, one shard per batch, then the HDF5
   assembly). The sum is slower than (1), which overlaps them; the largest share says what bounds it. Beside it, the
   workers' decode rate with nothing else running.
3. **GPU decode** (`--gpu-decode`, JPEG files only): extract's `decode="device"` path (`BatchInputs.decode`): the workers
   only read the files; `torchvision.io.decode_jpeg` decodes each batch at once on the device, which then resizes
   (antialiased), crops and normalises. Compared with the workers' decoding on the same files: decode and
   preprocessing alone, then through the forward pass; and a fresh `extract(decode="device")` end to end, against (1).

Then, once, for MobileNetV2 (skipped with `--no-ranks`):

4. **ranks**: `torchrun --standalone --nproc-per-node N -m pipeline extract` over the same images, N being every CUDA
   device (pipeline joins them with NCCL), or 2 ranks on gloo on the CPU to show the path; and one process with the
   same settings into another cache. The caches must hold the same rows, labels and paths in the same order, and
   every feature within `pipeline.distributed.RANK_TOLERANCE` of its tap's largest feature; otherwise the script
   fails. The img/s are those extract reports.

Without a CUDA device everything runs on the CPU to show the code path (the uint8 transfer forced on), and the output
says, at the top and the bottom, that its figures are not GPU figures.

Images: `--data DIR` (an image folder; its test split), else generated photo-like JPEGs of `--size` (default 375x500,
ImageNet-like), which `--gpu-decode` needs.

Usage: python bench/gpu_bench.py [--device cuda] [--images 2048] [--batch-size 256] [--workers 8] [--gpu-decode] [--no-ranks]
Smoke run on a CPU (seconds): python bench/gpu_bench.py --device cpu --images 12 --batch-size 4 --crop 32 --gpu-decode
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, for its helpers
from extract_bench import WEIGHTS  # noqa: E402
from synthetic import make_jpeg_folder  # noqa: E402
from results import machine, save  # noqa: E402

from pipeline import ExtractConfig, extract, load_backbone, read_cache  # noqa: E402
from pipeline.backbones import Backbone, WeightsUnavailableError  # noqa: E402
from pipeline.cache import PartialRun, write_cache  # noqa: E402
from pipeline.data import ImageDataset, load_split  # noqa: E402
from pipeline.distributed import RANK_TOLERANCE  # noqa: E402
from pipeline.extract import auto_workers  # noqa: E402
from pipeline.runtime import BatchInputs, Runtime, resolve_runtime  # noqa: E402
from pipeline.taps import TapExtractor, resolve_taps  # noqa: E402

STAGES = ("decode", "host-to-device", "device preprocess", "forward", "write")
RANKS_MODEL = "mobilenet_v2"  # one model shows the path; the smallest is the quickest
REPO = Path(__file__).resolve().parent.parent


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest difference between ``a`` and ``b``, as a fraction of ``b``'s largest magnitude."""
    return float(np.abs(a - b).max(initial=0.0) / max(1e-12, np.abs(b).max(initial=0.0)))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock reads what a stage really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backbone(args: argparse.Namespace, model: str) -> Backbone:
    crop = {"crop": args.crop, "resize": args.crop * 8 // 7} if args.crop else {}
    try:
        return load_backbone(model, WEIGHTS.get(model, "DEFAULT"), **crop)
    except WeightsUnavailableError:
        return load_backbone(model, "none", **crop)  # random weights: the same arithmetic, so the same time


def end_to_end(args: argparse.Namespace, data: Path, bb: Backbone, tmp: Path, decode: str = "host") -> dict:
    config = ExtractConfig(data=str(data), split="test", model=bb.name, weights=bb.weights, batch_size=args.batch_size, workers=args.workers,
                           device=args.device, cache_dir=str(tmp / f"e2e-{bb.name}-{decode}"), resize=bb.preprocess.resize, crop=bb.preprocess.crop,
                           decode=decode)
    t0 = time.perf_counter()
    result = extract(config, progress=False)
    if result.status != "extracted":
        raise SystemExit(f"extract reported {result.status!r}: the benchmark must time a fresh extraction")
    return {"engine": result.engine, "images": result.n_images, "extract_img_s": result.images_per_s, "wall_s": time.perf_counter() - t0}


def breakdown(args: argparse.Namespace, data: Path, bb: Backbone, runtime: Runtime, tmp: Path) -> dict:
    """Extract's stages one after another, each timed alone (see the module's docstring)."""
    split = load_split(ExtractConfig(data=str(data)).dataset, "test")
    inputs = runtime.inputs(bb.preprocess)
    loader = torch.utils.data.DataLoader(ImageDataset(data, split.paths, inputs.transform), batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=inputs.collate, pin_memory=runtime.pin_memory, prefetch_factor=4 if args.workers else None)
    t0 = time.perf_counter()
    n_alone = sum(len(index) for index, _, _ in loader)
    decode_alone = n_alone / (time.perf_counter() - t0)
    seconds = dict.fromkeys(STAGES, 0.0)
    taps = resolve_taps(bb.model, (), "output")
    partial = PartialRun(tmp / f"breakdown-{bb.name}" / "test.h5")
    partial.final.parent.mkdir(parents=True)
    partial.start({"bench": True})
    sent = n = 0
    with TapExtractor(bb.model, taps) as extractor, torch.inference_mode():
        model = runtime.prepare(extractor)
        warm = next(iter(loader))[1][:2]  # one untimed pass: kernel selection and the allocator's first blocks
        with runtime.autocast():
            model(runtime.to_device(warm, inputs))
        sync(runtime.device)
        t = time.perf_counter()
        for index, x, _ in loader:
            marks = [time.perf_counter()]
            xd = x.to(runtime.device, non_blocking=runtime.pin_memory)
            sync(runtime.device)
            marks.append(time.perf_counter())
            xd = inputs.finish(xd).contiguous(memory_format=runtime.memory_format)
            sync(runtime.device)
            marks.append(time.perf_counter())
            with runtime.autocast():
                outs = model(xd)
            sync(runtime.device)
            marks.append(time.perf_counter())
            partial.write(n, n + len(index), [o.float().cpu().numpy() for o in outs], index, [])
            marks.append(time.perf_counter())
            for stage, a, b in zip(STAGES, [t] + marks[:-1], marks):
                seconds[stage] += b - a
            sent += x.nbytes
            n += len(index)
            t = time.perf_counter()
    t = time.perf_counter()
    write_cache(partial, tap_names=[tp.name for tp in taps], paths=split.paths, labels=split.labels, classes=split.classes, rejected=[], attrs={})
    seconds["write"] += time.perf_counter() - t
    total = sum(seconds.values())
    return {"images": n, "seconds": seconds, "share": {k: v / total for k, v in seconds.items()}, "serial_img_s": n / total,
            "stage_img_s": {k: n / v if v else float("inf") for k, v in seconds.items()}, "decode_alone_img_s": decode_alone,
            "bytes_per_image_sent": sent / max(1, n), "batch_dtype": str(x.dtype).replace("torch.", ""),
            "float32_bytes_per_image": 3 * bb.preprocess.crop ** 2 * 4}


def device_decode(args: argparse.Namespace, data: Path, bb: Backbone, runtime: Runtime, tmp: Path) -> dict:
    """extract's ``decode="device"`` path (batched ``decode_jpeg`` on the device) against the workers' PIL decoding, on the
    same files; then a fresh ``extract(decode="device")`` end to end."""
    split = load_split(ExtractConfig(data=str(data)).dataset, "test")
    if not all(p.lower().endswith((".jpg", ".jpeg")) for p in split.paths):
        return {"skipped": "not every file is a JPEG"}

    def loader(inputs: BatchInputs) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(ImageDataset(data, split.paths, inputs.transform, encoded_jpegs=inputs.device_decode),
                                           batch_size=args.batch_size, num_workers=args.workers, collate_fn=inputs.collate,
                                           pin_memory=runtime.pin_memory, prefetch_factor=4 if args.workers else None)

    on_device = replace(runtime, decode="device").inputs(bb.preprocess)
    inputs = runtime.inputs(bb.preprocess)
    files, pil = loader(on_device), loader(inputs)
    batches = {
        "device decode_jpeg": lambda: (runtime.to_device(on_device.decode(b, runtime.device)[1], on_device) for b in files),
        "workers (PIL)": lambda: (runtime.to_device(x, inputs) for _, x, _ in pil),
    }
    taps = resolve_taps(bb.model, (), "output")
    out: dict[str, dict] = {}
    feats: dict[str, np.ndarray] = {}
    with TapExtractor(bb.model, taps) as extractor, torch.inference_mode():
        model = runtime.prepare(extractor)
        for name, make in batches.items():
            next(iter(make()))  # untimed: nvJPEG's and the kernels' first-call set-up
            sync(runtime.device)
            t0 = time.perf_counter()
            n = sum(len(x) for x in make())
            sync(runtime.device)
            prep = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = []
            for x in make():
                with runtime.autocast():
                    got.append(model(x)[0].float().cpu().numpy())
            sync(runtime.device)
            out[name] = {"decode_preprocess_img_s": prep, "through_forward_img_s": n / (time.perf_counter() - t0)}
            feats[name] = np.concatenate(got)
    a, b = feats.values()
    out["max_rel_feature_diff"] = max_rel_diff(a, b)  # other decoders, other resize: not equal
    out["end_to_end"] = end_to_end(args, data, bb, tmp, decode="device")
    return out


def _extract_cli(launcher: list[str], args: list[str], out: Path) -> Path:
    """``pipeline extract`` in a child process started by ``launcher``, writing ``out``; returns ``out``.

    It runs in ``out``'s folder, so a ``pipeline.toml`` where the script was started changes neither run.
    """
    env = {**os.environ, "PIPELINE_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out.parent.mkdir(parents=True)
    run = subprocess.run([*launcher, "-m", "pipeline", *args, "--output", str(out)], capture_output=True, text=True, env=env, cwd=out.parent)
    if run.returncode:
        raise SystemExit(f"{' '.join(launcher[1:]) or 'one process'}: pipeline extract failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return out


def ranks(args: argparse.Namespace, data: Path, bb: Backbone, runtime: Runtime, tmp: Path) -> dict:
    """torchrun with every CUDA device (NCCL), or 2 gloo ranks on the CPU, against one process: equal within RANK_TOLERANCE?"""
    n = torch.cuda.device_count() if runtime.device.type == "cuda" else 2
    # The same settings for both. The device goes without its index: under torchrun each rank takes cuda:LOCAL_RANK.
    # The eager engine: what CUDA runs anyway, and on the CPU what RANK_TOLERANCE is stated for.
    settings = ["extract", "--data", str(data), "--split", "test", "--model", bb.name, "--weights", bb.weights, "--resize", str(bb.preprocess.resize),
                "--crop", str(bb.preprocess.crop), "--batch-size", str(args.batch_size), "--device", runtime.device.type,
                "--amp" if runtime.amp else "--no-amp", "--engine", "eager", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    dist = _extract_cli(torchrun, settings, tmp / "ranks-torchrun" / "test.h5")
    single = _extract_cli([sys.executable], settings, tmp / "ranks-one-process" / "test.h5")
    with read_cache(dist) as got, read_cache(single) as one:
        same = len(got) == len(one) and got.taps == one.taps and np.array_equal(got.labels, one.labels) and got.paths == one.paths
        diff = max((max_rel_diff(got.features(t), one.features(t)) for t in one.taps), default=0.0) if same else None
        world = int(got.attrs["world_size"])
        out = {"model": bb.name, "weights": bb.weights, "images": len(got), "ranks": world, "torchrun_img_s": got.attrs["images_per_s"],
               "one_process_img_s": one.attrs["images_per_s"], "same_rows_labels_paths": same, "max_rel_feature_diff": diff}
    # pipeline.distributed.process_group's choice; one rank is a plain run, with no process group.
    out["backend"] = ("nccl" if runtime.device.type == "cuda" else "gloo") if world > 1 else "none (one rank)"
    out["tolerance"] = RANK_TOLERANCE
    out["pass"] = diff is not None and diff <= RANK_TOLERANCE
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto takes CUDA when there is one")
    ap.add_argument("--images", type=int, default=None, help="images per model  [default: 2048 on CUDA, 32 on the CPU]")
    ap.add_argument("--batch-size", type=int, default=None, help="[default: 256 on CUDA, 16 on the CPU]")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers  [default: extract's choice for the device]")
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--data", default=None, help="an image folder whose test split to use instead of generated JPEGs")
    ap.add_argument("--size", default="375x500", help="height x width of the generated JPEGs")
    ap.add_argument("--crop", type=int, default=None, help="override the weights' crop (smoke runs only)")
    ap.add_argument("--gpu-decode", action="store_true", help="also compare batched decode_jpeg on the device with worker decoding")
    ap.add_argument("--no-ranks", action="store_true", help=f"skip torchrun over every GPU (2 gloo ranks on the CPU) against one process, {RANKS_MODEL}")
    ap.add_argument("--out", default="bench/results/gpu.json")
    args = ap.parse_args()
    runtime = resolve_runtime(args.device)
    args.device = str(runtime.device)
    cuda = runtime.device.type == "cuda"
    banner = "" if cuda else (f"NO CUDA DEVICE ({'torch sees none' if not torch.cuda.is_available() else 'not asked for'}): running on "
                              f"{runtime.device} to show the code path, with the uint8 transfer forced on. These are not GPU figures.")
    if not cuda:
        runtime = replace(runtime, uint8=True)
    print(banner or f"CUDA device: {torch.cuda.get_device_name(runtime.device)}; runtime {runtime.describe()}", flush=True)
    args.images = args.images or (2048 if cuda else 32)
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.workers = auto_workers(runtime.device.type) if args.workers is None else args.workers
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline-gpu-") as tmp:
        tmp = Path(tmp)
        if args.data:
            from extract_bench import subset

            data = subset(Path(args.data), args.images, tmp / "subset")
        else:
            h, w = (int(v) for v in args.size.split("x"))
            data = make_jpeg_folder(tmp / "jpeg", {"test": max(1, args.images // 3)}, size=(h, w))
        for model in args.models:
            bb = backbone(args, model)
            row = {"model": model, "weights": bb.weights, "end_to_end": end_to_end(args, data, bb, tmp)}
            row["breakdown"] = breakdown(args, data, bb, runtime, tmp)
            if args.gpu_decode:
                row["gpu_decode"] = device_decode(args, data, bb, runtime, tmp)
            rows.append(row)
            e, b = row["end_to_end"], row["breakdown"]
            print(f"\n{model} ({bb.weights}), {e['images']} images, batch {args.batch_size}, {args.workers} workers: end to end "
                  f"{e['extract_img_s']:.1f} img/s ({e['engine']}); serial sum of stages {b['serial_img_s']:.1f} img/s; the loader alone "
                  f"(decode, host crop) {b['decode_alone_img_s']:.1f} img/s; {b['bytes_per_image_sent'] / 1024:.1f} KiB/image crossed as {b['batch_dtype']} "
                  f"(float32 would be {b['float32_bytes_per_image'] / 1024:.1f})")
            print("| stage | seconds | share | img/s alone |\n|---|---|---|---|")
            for stage in STAGES:
                print(f"| {stage} | {b['seconds'][stage]:.3f} | {b['share'][stage]:.0%} | {b['stage_img_s'][stage]:.1f} |")
            if args.gpu_decode:
                g = row["gpu_decode"]
                if "skipped" in g:
                    print(f"GPU decode skipped: {g['skipped']}")
                else:
                    print("| decoding | decode + preprocess img/s | through the forward img/s |\n|---|---|---|")
                    for name in ("device decode_jpeg", "workers (PIL)"):
                        print(f"| {name} | {g[name]['decode_preprocess_img_s']:.1f} | {g[name]['through_forward_img_s']:.1f} |")
                    print(f"features of the two differ by {g['max_rel_feature_diff']:.1e} of the largest (other decoder and resize)")
                    print(f"extract --decode device end to end: {g['end_to_end']['extract_img_s']:.1f} img/s ({g['end_to_end']['engine']}), "
                          f"against {e['extract_img_s']:.1f} with the workers decoding")
        ranked = r = None if args.no_ranks else ranks(args, data, backbone(args, RANKS_MODEL), runtime, tmp)
        if r:
            print(f"\n{r['model']} ({r['weights']}), {r['images']} images, batch {args.batch_size}: torchrun with {r['ranks']} ranks "
                  f"({r['backend']}) against one process, the same settings")
            print("| run | ranks | backend | img/s (extract's) |\n|---|---|---|---|")
            print(f"| torchrun | {r['ranks']} | {r['backend']} | {r['torchrun_img_s']:.1f} |\n| one process | 1 | - | {r['one_process_img_s']:.1f} |")
            diff = r["max_rel_feature_diff"]
            print(("rows, labels or paths DIFFER" if diff is None else f"the same rows, labels and paths; features differ by at most {diff:.1e} "
                   f"of the tap's largest (tolerance {RANK_TOLERANCE:.0e})") + f": {'PASS' if r['pass'] else 'FAIL'}")
    meta = {**machine(), "device": args.device, "cuda": torch.cuda.get_device_name(runtime.device) if cuda else None, "runtime": runtime.describe(), "images": args.images,
            "batch_size": args.batch_size, "workers": args.workers, "data": args.data or f"generated JPEGs {args.size}", "note": banner or None}
    save(args.out, meta, rows, ranks=ranked)
    print(f"\n{banner}" if banner else f"\n{meta}")
    if ranked and not ranked["pass"]:
        raise SystemExit(f"FAIL: torchrun's cache differs from one process's beyond RANK_TOLERANCE ({RANK_TOLERANCE:.0e}); see {args.out}")


if __name__ == "__main__":
    main()
