"""Fault injection: kill -9 `pipeline extract`, `fit-head`, `finetune` and `export` at random moments and at their save points.

Every trial runs the real command in a child process on a generated dataset with tiny random-weight models and
SIGKILLs it. Then:

- extract: any reader must refuse what is on disk unless the final cache is there; a re-run of the same command
  must end with a cache identical (features, labels, paths) to an uninterrupted run's;
- fit-head, finetune and export: what is on disk must either load and equal the uninterrupted run's result, or
  be refused with a ValueError; a re-run must end with the uninterrupted result.

A trial that breaks any of this counts as data lost. Kill moments come from a seeded generator: random times
over the whole run (import, model load, batches, final write), and the save points: the temporary file cut to
half its bytes (a kill mid-write), whole but not renamed, and renamed with nothing after it.

Usage: python bench/fault_inject.py [--extract-trials 24] [--head-trials 16] [--finetune-trials 8] [--export-trials 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import load_finetuned, load_head
from pipeline.cache import IncompleteCacheError, PartialRun, read_cache
from pipeline.onnx_model import load_onnx_model

# bench/ is on sys.path when a script of it runs.
from faults import cache_rows, kill_at_save_command, kill_when, pipeline_command  # noqa: E402
from synthetic import make_image_folder  # noqa: E402

EXTRACT = ["extract", "--model", "mobilenet_v2", "--weights", "none", "--crop", "64", "--resize", "72", "--batch-size", "4",
           "--workers", "0", "--engine", "eager", "--device", "cpu", "--no-progress"]
FINETUNE = ["finetune", "--model", "resnet18", "--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--epochs", "3", "--subset", "16", "--optimizer", "sgd", "--lr", "0.05",
            "--no-progress"]


@dataclass
class Tally:
    """Counts of one command's trials."""

    trials: int = 0
    kills: int = 0
    mid_run: int = 0  # kills that left unfinished work on disk and no finished result
    refused: int = 0  # readers that refused what a kill left (a clear ValueError)
    accepted_valid: int = 0  # results that loaded after a kill and equal the uninterrupted run's
    reruns_identical: int = 0
    data_lost: int = 0
    notes: list[str] = field(default_factory=list)

    def lost(self, why: str) -> None:
        self.data_lost += 1
        self.notes.append(why)


def _env() -> dict[str, str]:
    return {**os.environ, "PIPELINE_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _pipeline(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline_command(args), cwd=cwd, env=_env(), capture_output=True, text=True)


def _kill_at(args: list[str], cwd: Path, seconds: float) -> bool:
    """Run the command and SIGKILL it after ``seconds``; True if it was still running then."""
    return kill_when(pipeline_command(args), lambda: True, seconds, cwd=cwd, env=_env())


def _kill_at_save(args: list[str], cwd: Path, suffix: str, nth: int, point: str) -> bool:
    """Run the command and SIGKILL it at a save point (see bench/faults.py); True if the kill happened."""
    run = subprocess.run(kill_at_save_command(suffix, nth, point, args), cwd=cwd, env=_env(), capture_output=True, text=True)
    return run.returncode == -signal.SIGKILL


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- extract


def extract_trials(work: Path, n: int, rng: np.random.Generator) -> tuple[Tally, dict]:
    tally = Tally()
    data = work / "ds"
    cache = Path("ds/mobilenet_v2-none/classifier-input/train.h5")
    t0 = time.perf_counter()
    ref = _pipeline([*EXTRACT, "--data", str(data), "--split", "train", "--split", "val", "--cache-dir", "ref"], work)
    assert ref.returncode == 0, ref.stderr
    # How long one uninterrupted run of the train split takes, and when its batches start to be saved.
    probe = work / "probe"
    child = subprocess.Popen(pipeline_command([*EXTRACT, "--data", str(data), "--cache-dir", str(probe)]), cwd=work, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    first = done = None
    while child.poll() is None:
        if first is None and PartialRun(probe / cache).exists():
            first = time.perf_counter() - start
        if done is None and (probe / cache).exists():
            done = time.perf_counter() - start  # the cache is in place; what follows is the interpreter's exit
        time.sleep(0.002)
    total = time.perf_counter() - start
    first = first if first is not None else total / 2
    done = done if done is not None else total
    reference = cache_rows(work / "ref" / cache)
    timing = {"reference_seconds": round(time.perf_counter() - t0, 2), "run_seconds": round(total, 2), "batches_start_at_s": round(first, 2),
              "cache_done_at_s": round(done, 2), "images": int(len(reference["labels"]))}
    saved: list[int] = []  # images saved when a kill landed mid-run
    batches = -(-timing["images"] // 4)  # --batch-size 4
    for i in range(n):
        tally.trials += 1
        out = work / f"x{i}"
        args = [*EXTRACT, "--data", str(data), "--cache-dir", str(out)]
        partial = PartialRun(out / cache)
        final = out / cache
        kills = 2 if i % 4 == 3 else 1  # every fourth trial also kills the resuming run
        for k in range(kills):
            if i % 8 == 5 and k == 0:  # now and then, a moment of start-up: imports, model, dataset scan
                at = float(rng.uniform(0, first))
                killed, where = _kill_at(args, work, at), f"{at:.2f} s after launch"
            else:  # mostly a moment of the batches or of the final write
                before = len(partial.shards()) if partial.exists() else 0
                if i % 2:
                    # A random batch, then a random moment within it: the run's own pace, whatever the load.
                    target = before + int(rng.integers(0, batches - before + 1))
                    at = float(rng.uniform(0, (done - first) / batches))
                    where = f"{at:.3f} s after batch {target} was saved"
                else:
                    # A random moment from the run's start of work (its partial run appears, or for a resumed run its
                    # first new batch) to a little after the cache is done in the uninterrupted run.
                    target = 0 if before == 0 and not partial.exists() else before + 1
                    at = float(rng.uniform(0, 1.1 * (done - first)))
                    where = f"{at:.2f} s into the {'run' if target == 0 else 'resumed run'}"
                started = (lambda: partial.exists() and len(partial.shards()) >= target) if target else partial.exists
                # Timed from the child's own start of work, not from its launch (see faults.kill_when).
                killed = kill_when(pipeline_command(args), lambda: started() or final.exists(), at, cwd=work, env=_env())
            if not killed:
                break
            tally.kills += 1
            if final.exists():
                try:
                    if not _same(cache_rows(final), reference):
                        tally.lost(f"trial {i}: a kill {where} left a final cache that differs from the reference")
                    else:
                        tally.accepted_valid += 1
                except ValueError as e:
                    tally.lost(f"trial {i}: a kill {where} left an unreadable final cache: {e}")
                continue
            if partial.exists():
                tally.mid_run += 1
                saved.append(partial.done_until())
            try:
                read_cache(final).close()
                tally.lost(f"trial {i}: a reader accepted the partial cache left by a kill {where}")
            except IncompleteCacheError:
                tally.refused += 1
            except ValueError:
                tally.refused += 1  # killed before the partial run was recorded: there is no cache at all
        rerun = _pipeline(args, work)
        if rerun.returncode != 0:
            tally.lost(f"trial {i}: the re-run failed: {rerun.stderr.strip()[-300:]}")
        elif _same(cache_rows(out / cache), reference):
            tally.reruns_identical += 1
        else:
            tally.lost(f"trial {i}: the re-run's cache differs from the reference")
        shutil.rmtree(out, ignore_errors=True)
    timing["saved_at_kill"] = sorted(saved)
    return tally, timing


# ---------------------------------------------------------------- fit-head


def _predictions(meta_path: Path, X: np.ndarray) -> np.ndarray:
    return load_head(meta_path).pipeline.predict(X)


def head_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    tally = Tally()
    caches = work / "ref/ds/mobilenet_v2-none/classifier-input"
    with read_cache(caches / "val.h5") as c:
        X_val = c.features()
    for i in range(n):
        clf = ("linear", "logreg")[i % 2]
        args = ["fit-head", "--clf", clf, "--grid", "0.001" if clf == "linear" else "1", "--epochs", "5",
                "--train-cache", str(caches / "train.h5"), "--val-cache", str(caches / "val.h5")]
        ref_meta = work / f"heads-ref/{clf}.json"
        if not ref_meta.exists():
            assert _pipeline([*args, "--output", str(ref_meta.with_suffix(""))], work).returncode == 0
        expected = _predictions(ref_meta, X_val)
        out = work / f"heads-{i}/h"
        if i % 4 == 3:  # an older head of other settings is already there and is being replaced
            assert _pipeline([*args[:4], "0.1" if clf == "linear" else "10", *args[5:], "--output", str(out)], work).returncode == 0
        tally.trials += 1
        artifact = ".pt" if clf == "linear" else ".skops"
        kind = i % 4
        if kind == 0:  # a random moment of the whole run
            killed = _kill_at([*args, "--output", str(out)], work, float(rng.uniform(1.0, 6.0)))
        else:
            suffix, point = [(artifact, "mid-write"), (artifact, "after-rename"), (".json", str(rng.choice(["mid-write", "before-rename"])))][kind - 1]
            killed = _kill_at_save([*args, "--output", str(out)], work, suffix, 1, point)
        tally.kills += killed
        try:
            got = _predictions(out.with_suffix(".json"), X_val)
        except ValueError:
            tally.refused += killed
            tally.mid_run += killed
        else:
            old = i % 4 == 3 and not np.array_equal(got, expected)
            if np.array_equal(got, expected) or old:
                tally.accepted_valid += killed  # the new head whole, or the old one untouched
            else:
                tally.lost(f"trial {i}: a {clf} head loaded after the kill but predicts otherwise")
        rerun = _pipeline([*args, "--output", str(out)], work)
        if rerun.returncode == 0 and np.array_equal(_predictions(out.with_suffix(".json"), X_val), expected):
            tally.reruns_identical += 1
        else:
            tally.lost(f"trial {i}: the re-run of fit-head {clf} failed or differs: {rerun.stderr.strip()[-300:]}")
    return tally


# ---------------------------------------------------------------- finetune


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_finetuned(path).model.state_dict()


def finetune_trials(work: Path, n: int, rng: np.random.Generator) -> tuple[Tally, float]:
    tally = Tally()
    data = work / "ds"
    t0 = time.perf_counter()
    ref = _pipeline([*FINETUNE, "--data", str(data), "--output-dir", "ft-ref"], work)
    seconds = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr
    run = Path("ds/resnet18-none/finetune")
    expected = _state(work / "ft-ref" / run / "model.json")
    points = [("last.pt", 1, "mid-write"), ("last.pt", 2, "after-rename"), ("last.pt", 3, "mid-write"), ("model.pt", 1, "mid-write"),
              ("model.pt", 1, "after-rename"), ("model.json", 1, "before-rename"), ("history.csv", 2, "mid-write")]
    for i in range(n):
        tally.trials += 1
        out = work / f"ft-{i}"
        args = [*FINETUNE, "--data", str(data), "--output-dir", str(out)]
        if i % 2 == 0:
            killed = _kill_at(args, work, float(rng.uniform(2.0, seconds)))
        else:
            suffix, nth, point = points[int(rng.integers(len(points)))]
            killed = _kill_at_save(args, work, suffix, nth, point)
        tally.kills += killed
        try:
            got = _state(out / run / "model.json")
        except ValueError:
            tally.refused += killed
            tally.mid_run += killed
        else:
            if all(torch.equal(got[k], expected[k]) for k in expected):
                tally.accepted_valid += killed
            else:
                tally.lost(f"trial {i}: a model loaded after the kill but differs from the uninterrupted one")
        rerun = _pipeline(args, work)
        if rerun.returncode == 0 and all(torch.equal(a, expected[k]) for k, a in _state(out / run / "model.json").items()):
            tally.reruns_identical += 1
        else:
            tally.lost(f"trial {i}: the re-run of finetune failed or differs: {rerun.stderr.strip()[-300:]}")
        shutil.rmtree(out, ignore_errors=True)
    return tally, seconds


# ---------------------------------------------------------------- export


def _outputs(model: Path, images: np.ndarray) -> np.ndarray:
    return load_onnx_model(model)(images)[0]


def export_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    """Kill ``pipeline export`` of the logreg head that head_trials fitted; a file left must run as the whole one does."""
    tally = Tally()
    head = work / "heads-ref/logreg.json"
    assert _pipeline(["export", str(head), "-o", str(work / "export-ref.onnx")], work).returncode == 0
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    expected = _outputs(work / "export-ref.onnx", images)
    for i in range(n):
        tally.trials += 1
        out = work / f"export-{i}/model.onnx"
        args = ["export", str(head), "-o", str(out)]
        if i % 2 == 0:
            killed = _kill_at(args, work, float(rng.uniform(1.0, 6.0)))
        else:
            killed = _kill_at_save(args, work, ".onnx", 1, str(rng.choice(["mid-write", "before-rename", "after-rename"])))
        tally.kills += killed
        try:
            got = _outputs(out, images)
        except ValueError:
            tally.refused += killed
            tally.mid_run += killed
        else:
            if np.allclose(got, expected, atol=1e-6):
                tally.accepted_valid += killed
            else:
                tally.lost(f"trial {i}: an exported model loaded after the kill but computes otherwise")
        rerun = _pipeline(args, work)
        if rerun.returncode == 0 and np.allclose(_outputs(out, images), expected, atol=1e-6):
            tally.reruns_identical += 1
        else:
            tally.lost(f"trial {i}: the re-run of export failed or differs: {rerun.stderr.strip()[-300:]}")
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extract-trials", type=int, default=24)
    parser.add_argument("--head-trials", type=int, default=16)
    parser.add_argument("--finetune-trials", type=int, default=8)
    parser.add_argument("--export-trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/fault_inject.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault-inject-") as tmp:
        work = Path(tmp)
        make_image_folder(work / "ds", {"train": 36, "test": 4}, size=(40, 48))
        ex, timing = extract_trials(work, args.extract_trials, rng)
        heads = head_trials(work, args.head_trials, rng)
        ft, ft_seconds = finetune_trials(work, args.finetune_trials, rng)
        exported = export_trials(work, args.export_trials, rng)
    rows = {"extract": ex, "fit-head": heads, "finetune": ft, "export": exported}
    print(f"\n{'command':<10} {'trials':>6} {'kills':>6} {'mid-run':>8} {'refused':>8} {'loaded ok':>9} {'reruns identical':>17} {'data lost':>9}")
    for name, t in rows.items():
        print(f"{name:<10} {t.trials:>6} {t.kills:>6} {t.mid_run:>8} {t.refused:>8} {t.accepted_valid:>9} {t.reruns_identical:>17} {t.data_lost:>9}")
    total = {k: sum(getattr(t, k) for t in rows.values()) for k in ("trials", "kills", "mid_run", "refused", "accepted_valid", "reruns_identical", "data_lost")}
    print(f"{'total':<10} {total['trials']:>6} {total['kills']:>6} {total['mid_run']:>8} {total['refused']:>8} {total['accepted_valid']:>9} {total['reruns_identical']:>17} {total['data_lost']:>9}")
    for name, t in rows.items():
        for note in t.notes:
            print(f"  {name}: {note}")
    summary = {"seed": args.seed, "seconds": round(time.perf_counter() - t0, 1), "extract_timing": timing, "finetune_reference_seconds": round(ft_seconds, 2),
               "commands": {k: asdict(v) for k, v in rows.items()}, "total": total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"-> {args.out} ({summary['seconds']} s)")
    sys.exit(1 if total["data_lost"] else 0)


if __name__ == "__main__":
    main()
