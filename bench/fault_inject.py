"""Fault injection: kill -9 `pipeline extract`, `fit-head`, `finetune` and `export` at random moments and at their save points;
run two writers of one target at once; fill the disk while the HDF5 cache is written.

Every trial runs the real command in a child process on a generated dataset with tiny random-weight models and
injects one fault (a SIGKILL, a second writer, a full disk). Then:

- extract: any reader must refuse what is on disk unless the final cache is there; a re-run of the same command
  must end with a cache identical (features, labels, paths) to an uninterrupted run's;
- fit-head, finetune and export: what is on disk must either load and equal the uninterrupted run's result, or
  be refused with a ValueError; a re-run must end with the uninterrupted result;
- concurrent: two `fit-head` (or two `extract`) of the same target started a random moment apart must each end
  with success or the one-line "is being written by another process", and leave a whole head (cache) equal to
  an uninterrupted run's;
- replace-head: a refit killed while it replaces an existing head must leave a head that loads, the old one or
  the new one, never a refusal;
- extract-force: `extract --force` with other settings, killed, must leave the old cache or the new one whole at
  the cache's path, never nothing;
- disk-full: `extract` on a small tmpfs (root only), where the batches fit and the final file does not, with the
  free-space check told there is room (the disk fills up after it) or not, must end with exit code 1 and one
  "no space left" line (no crash), keep every batch, and resume to the same cache once there is room.

A trial that breaks any of this counts as data lost. Kill moments come from a seeded generator: random times
over the whole run (import, model load, batches, final write), and the save points: the temporary file cut to
half its bytes (a kill mid-write), whole but not renamed, and renamed with nothing after it.

Usage: python bench/fault_inject.py [--extract-trials 24] [--head-trials 16] [--finetune-trials 8] [--export-trials 8]
       [--concurrent-trials 8] [--replace-trials 10] [--force-trials 8] [--disk-full-trials 4] [--seed 0]
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
    kills: int = 0  # faults injected: kills, second writers, full disks
    mid_run: int = 0  # kills that left unfinished work on disk and no finished result
    refused: int = 0  # readers that refused what a kill left (a clear ValueError); for concurrent, writers refused
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


def _head_args(caches: Path, clf: str) -> list[str]:
    return ["fit-head", "--clf", clf, "--grid", "0.001" if clf == "linear" else "1", "--epochs", "5",
            "--train-cache", str(caches / "train.h5"), "--val-cache", str(caches / "val.h5")]


def _head_reference(work: Path, name: str, args: list[str]) -> Path:
    """The head fitted without faults by ``args``, made once and kept as ``heads-ref/<name>``."""
    ref_meta = work / f"heads-ref/{name}.json"
    if not ref_meta.exists():
        assert _pipeline([*args, "--output", str(ref_meta.with_suffix(""))], work).returncode == 0
    return ref_meta


def _head_inputs(work: Path) -> tuple[Path, np.ndarray]:
    """The reference caches' folder and the val features the heads' predictions are compared on."""
    caches = work / "ref/ds/mobilenet_v2-none/classifier-input"
    with read_cache(caches / "val.h5") as c:
        return caches, c.features()


def _older_head(work: Path, args: list[str], clf: str, out: Path) -> bool:
    """Fit a head of other settings (its swept value changed) at ``out``, for a trial that replaces it; whether it worked."""
    return _pipeline([*args[:4], "0.1" if clf == "linear" else "10", *args[5:], "--output", str(out)], work).returncode == 0


def head_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    tally = Tally()
    caches, X_val = _head_inputs(work)
    for i in range(n):
        clf = ("linear", "logreg")[i % 2]
        args = _head_args(caches, clf)
        expected = _predictions(_head_reference(work, clf, args), X_val)
        out = work / f"heads-{i}/h"
        if i % 4 == 3:  # an older head of other settings is already there and is being replaced
            assert _older_head(work, args, clf, out)
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
    if n == 0:
        return tally, 0.0
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


# ---------------------------------------------------------------- two writers of one target

BUSY = "is being written by another process"


def _one_line_or_ok(run: subprocess.CompletedProcess) -> str | None:
    """``ok``, ``busy`` (the one-line refusal of a second writer), or None for any other end (a crash, a traceback)."""
    if run.returncode == 0:
        return "ok"
    lines = run.stderr.strip().splitlines()
    if run.returncode == 1 and len(lines) == 1 and BUSY in lines[0]:
        return "busy"
    return None


def _together(args: list[str], cwd: Path, stagger: float) -> list[subprocess.CompletedProcess]:
    children = []
    for k in range(2):
        children.append(subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
        if k == 0:
            time.sleep(stagger)
    return [subprocess.CompletedProcess(c.args, c.wait(), *c.communicate()) for c in children]


def concurrent_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    tally = Tally()
    data = work / "ds"
    caches = work / "ref/ds/mobilenet_v2-none/classifier-input"
    cache = Path("ds/mobilenet_v2-none/classifier-input/train.h5")
    reference = cache_rows(caches / "train.h5")
    with read_cache(caches / "val.h5") as c:
        X_val = c.features()
    overlapped = 0
    for i in range(n):
        tally.trials += 1
        if i % 2 == 0:
            clf = ("linear", "logreg")[(i // 2) % 2]
            out = work / f"heads-c{i}/h"
            # A sweep of several values, so that the first writer holds the head long enough for the second to meet it.
            base = [*_head_args(caches, clf)[:4], "0.0001,0.001,0.01" if clf == "linear" else "0.1,1,10", "--epochs", "40", *_head_args(caches, clf)[7:]]
            expected = _predictions(_head_reference(work, f"sweep-{clf}", base), X_val)
            args = [*base, "--output", str(out)]
            stagger = float(rng.uniform(0, 1.0))
            what = f"trial {i}: two fit-head {clf} {stagger:.2f} s apart"
        else:
            out = work / f"xc{i}"
            args = [*EXTRACT, "--data", str(data), "--cache-dir", str(out)]
            stagger = float(rng.uniform(0, 4.0))
            what = f"trial {i}: two extract {stagger:.2f} s apart"
        runs = _together(args, work, stagger)
        tally.kills += 1
        ends = [_one_line_or_ok(r) for r in runs]
        if None in ends:
            bad = runs[ends.index(None)]
            tally.lost(f"{what}: one ended with exit code {bad.returncode}: {bad.stderr.strip()[-300:]}")
            continue
        tally.refused += ends.count("busy")
        overlapped += "busy" in ends
        if "ok" not in ends:
            tally.lost(f"{what}: neither finished")
            continue
        leftovers = [p.name for p in out.parent.rglob(".*") if p.name.endswith((".tmp", ".lock"))] if i % 2 == 0 else \
            [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".lock"))]
        if leftovers:
            tally.lost(f"{what}: left {leftovers}")
        try:
            if i % 2 == 0:
                same = np.array_equal(_predictions(out.with_suffix(".json"), X_val), expected)
            else:
                same = _same(cache_rows(out / cache), reference)
        except (ValueError, OSError) as e:
            tally.lost(f"{what}: the result does not load: {e}")
            continue
        if same:
            tally.accepted_valid += 1
        else:
            tally.lost(f"{what}: the result differs from an uninterrupted run's")
        rerun = _pipeline(args, work)
        if rerun.returncode == 0:
            tally.reruns_identical += 1
        else:
            tally.lost(f"{what}: the re-run failed: {rerun.stderr.strip()[-300:]}")
        shutil.rmtree(out.parent if i % 2 == 0 else out, ignore_errors=True)
    tally.notes.append(f"{overlapped} of {n} pairs overlapped (one writer refused); in the others the second found the work done")
    return tally


# ---------------------------------------------------------------- kill -9 while a head is replaced


def replace_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    tally = Tally()
    caches, X_val = _head_inputs(work)
    for i in range(n):
        clf = ("linear", "logreg")[i % 2]
        args = _head_args(caches, clf)
        new = _predictions(_head_reference(work, clf, args), X_val)
        out = work / f"heads-r{i}/h"
        assert _older_head(work, args, clf, out)
        old = _predictions(out.with_suffix(".json"), X_val)
        tally.trials += 1
        artifact = ".pt" if clf == "linear" else ".skops"
        points = [None, (artifact, "mid-write"), (artifact, "before-rename"), (artifact, "after-rename"), (".json", "mid-write"),
                  (".json", "before-rename")]
        point = points[int(rng.integers(len(points)))] if i >= len(points) else points[i]
        if point is None:
            at = float(rng.uniform(1.0, 6.0))
            killed, where = _kill_at([*args, "--output", str(out)], work, at), f"{at:.2f} s into the refit"
        else:
            killed, where = _kill_at_save([*args, "--output", str(out)], work, point[0], 1, point[1]), f"at {point[1]} of *{point[0]}"
        tally.kills += killed
        try:
            got = _predictions(out.with_suffix(".json"), X_val)
        except ValueError as e:
            tally.refused += 1
            tally.lost(f"trial {i}: {clf} killed {where}: the head is refused: {e}")
        else:
            if np.array_equal(got, old) or np.array_equal(got, new):
                tally.accepted_valid += killed
            else:
                tally.lost(f"trial {i}: {clf} killed {where}: the head loads but is neither the old nor the new one")
        rerun = _pipeline([*args, "--output", str(out)], work)
        artifacts = sorted(p.name for p in out.parent.glob(f"h.*{artifact}"))
        if rerun.returncode == 0 and np.array_equal(_predictions(out.with_suffix(".json"), X_val), new) and len(artifacts) == 1:
            tally.reruns_identical += 1
        else:
            tally.lost(f"trial {i}: the re-run of fit-head {clf} failed, differs or left {artifacts}: {rerun.stderr.strip()[-300:]}")
    return tally


# ---------------------------------------------------------------- kill -9 during extract --force


def force_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    tally = Tally()
    data = work / "ds"
    cache = Path("ds/mobilenet_v2-none/classifier-input/train.h5")
    if n == 0:
        return tally
    old = cache_rows(work / "ref" / cache)
    ref16 = _pipeline([*EXTRACT, "--data", str(data), "--dtype", "float16", "--cache-dir", "ref16"], work)
    assert ref16.returncode == 0, ref16.stderr
    new = cache_rows(work / "ref16" / cache)
    for i in range(n):
        tally.trials += 1
        out = work / f"xf{i}"
        (out / cache).parent.mkdir(parents=True)
        shutil.copy(work / "ref" / cache, out / cache)  # the old cache, up to date for the float32 settings
        args = [*EXTRACT, "--data", str(data), "--cache-dir", str(out), "--dtype", "float16", "--force"]
        partial = PartialRun(out / cache)
        if i % 2 == 0:
            at = float(rng.uniform(0, 2.0))
            killed = kill_when(pipeline_command(args), partial.exists, at, cwd=work, env=_env())
            where = f"{at:.2f} s after its partial run appeared"
        else:
            point = ("mid-write", "before-rename")[(i // 2) % 2]
            killed = _kill_at_save(args, work, "train.h5", 1, point)
            where = f"at {point} of the new cache"
        tally.kills += killed
        try:
            got = cache_rows(out / cache)
        except ValueError as e:
            tally.lost(f"trial {i}: killed {where}: no readable cache left: {e}")
        else:
            if _same(got, old):
                tally.accepted_valid += 1
                tally.mid_run += killed and partial.exists()
            elif _same(got, new):
                tally.accepted_valid += 1
            else:
                tally.lost(f"trial {i}: killed {where}: the cache is neither the old nor the new one")
        rerun = _pipeline(args, work)
        if rerun.returncode == 0 and _same(cache_rows(out / cache), new):
            tally.reruns_identical += 1
        else:
            tally.lost(f"trial {i}: the re-run of extract --force failed or differs: {rerun.stderr.strip()[-300:]}")
        shutil.rmtree(out, ignore_errors=True)
    return tally


# ---------------------------------------------------------------- a full disk during the final HDF5 write

# Runs the pipeline command with the free-space check told there is plenty of room, as if the disk filled up
# between the check and the write.
AFTER_CHECK = """
import sys, collections
import pipeline.cache
pipeline.shards.shutil.disk_usage = lambda path: collections.namedtuple("usage", "total used free")(2**40, 0, 2**40)
from pipeline.cli import cli
cli(sys.argv[1:], prog_name="pipeline")
"""


def _mount(where: Path, kib: int, remount: bool = False) -> bool:
    opts = f"remount,size={kib}k" if remount else f"size={kib}k"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


def disk_full_trials(work: Path, n: int, rng: np.random.Generator) -> Tally:
    tally = Tally()
    data = work / "ds"
    cache = Path("ds/mobilenet_v2-none/classifier-input/train.h5")
    reference = cache_rows(work / "ref" / cache)
    size = (work / "ref" / cache).stat().st_size
    for i in range(n):
        disk = work / f"disk{i}"
        disk.mkdir()
        # Room for the batches (about the size of the cache) and for part of the final file, never all of it.
        kib = int((1.15 * size + rng.uniform(0.1, 0.9) * size) / 1024)
        if os.geteuid() != 0 or not _mount(disk, kib):
            tally.notes.append("skipped: mounting a tmpfs needs root")
            break
        try:
            tally.trials += 1
            after_check = i % 2 == 0
            args = [*EXTRACT, "--data", str(data), "--cache-dir", str(disk)]
            run = subprocess.run([sys.executable, "-c", AFTER_CHECK, *args] if after_check else [sys.executable, "-m", "pipeline", *args],
                                 cwd=work, env=_env(), capture_output=True, text=True)
            tally.kills += 1
            what = f"trial {i}: a {kib} KiB disk, {'full after the free-space check' if after_check else 'too small at the check'}"
            lines = run.stderr.strip().splitlines()
            if run.returncode != 1 or len(lines) != 1 or "no space left on the disk" not in lines[0]:
                tally.lost(f"{what}: exit code {run.returncode}: {run.stderr.strip()[-300:]}")
            else:
                tally.refused += 1
            partial = PartialRun(disk / cache)
            if partial.exists() and not (disk / cache).exists():
                tally.mid_run += 1
            if (disk / cache).exists():
                tally.lost(f"{what}: a final cache exists although the disk was full")
            _mount(disk, 8 * 1024, remount=True)
            rerun = _pipeline(args, work)
            if rerun.returncode == 0 and _same(cache_rows(disk / cache), reference) and "resumed: 0 computed" in rerun.stdout:
                tally.reruns_identical += 1
            else:
                tally.lost(f"{what}: the re-run failed, recomputed batches or differs: {rerun.stdout.strip()[-200:]} {rerun.stderr.strip()[-300:]}")
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extract-trials", type=int, default=24)
    parser.add_argument("--head-trials", type=int, default=16)
    parser.add_argument("--finetune-trials", type=int, default=8)
    parser.add_argument("--export-trials", type=int, default=8)


    parser.add_argument("--concurrent-trials", type=int, default=8)
    parser.add_argument("--replace-trials", type=int, default=10)
    parser.add_argument("--force-trials", type=int, default=8)
    parser.add_argument("--disk-full-trials", type=int, default=4)
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
        concurrent = concurrent_trials(work, args.concurrent_trials, rng)
        replaced = replace_trials(work, args.replace_trials, rng)
        forced = force_trials(work, args.force_trials, rng)
        full = disk_full_trials(work, args.disk_full_trials, rng)
    rows = {"extract": ex, "fit-head": heads, "finetune": ft, "export": exported, "concurrent": concurrent, "replace-head": replaced,
            "extract-force": forced, "disk-full": full}
    print(f"\n{'case':<13} {'trials':>6} {'faults':>6} {'mid-run':>8} {'refused':>8} {'loaded ok':>9} {'reruns identical':>17} {'data lost':>9}")
    for name, t in rows.items():
        print(f"{name:<13} {t.trials:>6} {t.kills:>6} {t.mid_run:>8} {t.refused:>8} {t.accepted_valid:>9} {t.reruns_identical:>17} {t.data_lost:>9}")
    total = {k: sum(getattr(t, k) for t in rows.values()) for k in ("trials", "kills", "mid_run", "refused", "accepted_valid", "reruns_identical", "data_lost")}
    print(f"{'total':<13} {total['trials']:>6} {total['kills']:>6} {total['mid_run']:>8} {total['refused']:>8} {total['accepted_valid']:>9} {total['reruns_identical']:>17} {total['data_lost']:>9}")
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
