"""Where everything lives on disk: caches, heads, evaluations, fine-tune runs and reports, and the file formats.

Plain functions of plain values. Every other module asks here for a path instead of building one, so the
whole disk layout reads from this one page::

    features/<dataset>/<model>-<weights>/<taps>/<split>.h5              a feature cache (train, val, test)
    features/<dataset>/<model>-<weights>/<taps>/<split>.h5.partial/     an unfinished extraction's shards
    .../<taps>/heads/<clf>.json (+ <clf>.<sha256[:16]>.pt or .skops)    a head fitted on that cache (its file named by content)
    .../<taps>/heads/subset-<N>/<clf>.json                              a head fitted on N images per class
    .../<taps>/heads/exclude-<N>/<clf>.json                             a head fitted without the audit's N most suspect images
    .../heads/<clf>-history.csv                                         the linear head's per-epoch history
    .../heads/<clf>-test.json, -test-predictions.npz, -confusion.png    its evaluation on the test split
    .../heads/<clf>.onnx                                                the head exported with its backbone (pipeline export)
    runs/<dataset>/<model>-<weights>/<name>/model.json (+ model.pt)      a fine-tuned model
    runs/.../<name>/last.pt, history.csv                                its resumable state and per-epoch history
    runs/.../<name>/model-test.json, ...                                its evaluation, named as a head's
    runs/.../<name>/model.onnx                                          the fine-tuned model exported
    .../<taps>/audit/label_issues.csv, duplicates.csv, outliers.csv     the audit of a dataset's labels, duplicates, outliers
    .../<taps>/audit/summary.json                                       its counts and settings (written last: marks it complete)
    reports/<dataset>/<model>-<weights>/index.html, index.md            the report (report.json marks it complete)
    .<name>.lock beside a cache, a head's .json or a run folder          held by the one process writing it
    features/<dataset>/.dataset-root (and in runs/, reports/)          the dataset folder that owns <dataset> there

``<dataset>`` is the dataset folder's name; a second folder of the same name gets ``<name>-<8 hex digits>``
(:func:`dataset_key`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = [
    "FEATURES_FORMAT", "FEATURES_FORMAT_VERSION", "HEAD_FORMAT", "FINETUNED_FORMAT", "FINETUNED_FORMAT_VERSION",
    "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION",
    "HeadFiles", "EvaluationFiles", "RunFiles", "ReportFiles", "AuditFiles",
    "DATASET_CLAIM", "dataset_key", "claim_dataset", "slug", "cache_path", "partial_dir", "dataset_caches", "unreadable_list", "sibling_cache", "heads_dir", "head_base", "head_files", "head_metadata",
    "subset_head_dirs", "exclude_head_dirs", "evaluation_files", "export_path", "run_dir", "run_files", "run_metadata", "report_dir", "report_files",
    "lock_file", "audit_dir", "audit_files",
]

# The ``format`` marker each artifact carries, so a reader can refuse a foreign file before using it.
FEATURES_FORMAT = "pipeline-features"
FEATURES_FORMAT_VERSION = 1
HEAD_FORMAT = "pipeline-head"
FINETUNED_FORMAT = "pipeline-finetuned"
FINETUNED_FORMAT_VERSION = 1
EXPORT_FORMAT = "pipeline-onnx"
EXPORT_FORMAT_VERSION = 1

_PathLike = str | os.PathLike


def slug(text: str) -> str:
    """A path component for any name: runs of characters other than letters, digits and ``._+-`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


# ---------------------------------------------------------------- datasets

# In a dataset's folder under features/, runs/ or reports/: the dataset folder that first used that name there.
DATASET_CLAIM = ".dataset-root"


def dataset_key(top: _PathLike, root: _PathLike) -> str:
    """The path component of the dataset folder ``root`` under ``top`` (``features``, ``runs`` or ``reports``).

    The folder's name, unless another folder of the same name (``~/a/photos`` and ``~/b/photos``) claimed that
    name under ``top`` first (:func:`claim_dataset`): then the name and 8 hex digits of the sha256 of the
    resolved path, ``photos-1f3a9c2e``. Every reader and writer asks this, so each finds its own files.
    """
    resolved = Path(root).resolve()
    base = slug(resolved.name) or "dataset"
    try:
        owner = (Path(top) / base / DATASET_CLAIM).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return base  # unclaimed: the first writer claims it
    if owner == str(resolved):
        return base
    return f"{base}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def claim_dataset(top: _PathLike, root: _PathLike) -> Path:
    """Claim the name :func:`dataset_key` gives ``root`` under ``top`` (before writing there); returns the folder."""
    folder = Path(top) / dataset_key(top, root)
    folder.mkdir(parents=True, exist_ok=True)
    claim = folder / DATASET_CLAIM
    if not claim.exists():
        try:
            with open(claim, "x", encoding="utf-8") as f:  # exclusive: of two first writers, one claims it
                f.write(f"{Path(root).resolve()}\n")
        except FileExistsError:
            pass
    if dataset_key(top, root) != folder.name:  # another folder of the same name claimed it since this run looked
        raise ValueError(f"{folder} was just claimed by another dataset folder of the same name; run the command again "
                         f"and it will use {Path(top) / dataset_key(top, root)}")
    return folder


# ---------------------------------------------------------------- stage one: feature caches


def cache_path(cache_dir: _PathLike, dataset: str, model: str, weights: str, tap_slugs: Sequence[str], split: str, *, flip: bool = False) -> Path:
    """Where a cache lives: ``CACHE_DIR/<dataset>/<model>-<weights>/<taps>/<split>.h5``, where ``<taps>`` ends in
    ``.flip`` for features averaged with the mirror images' (so they never overwrite the plain ones).

    Commands that share these settings find each other's caches without path arguments.
    """
    taps = "+".join(tap_slugs) + (".flip" if flip else "")
    return Path(cache_dir) / slug(dataset) / slug(f"{model}-{weights}") / slug(taps) / f"{split}.h5"


def partial_dir(cache: _PathLike) -> Path:
    """The folder of an unfinished extraction of ``cache``: ``<split>.h5.partial/``."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".partial")


def dataset_caches(cache: _PathLike) -> list[Path]:
    """The caches that exist for the dataset of a conventional cache path (every backbone, weights and tap), sorted."""
    cache = Path(cache)
    if len(cache.parents) < 3:
        return []
    return sorted(cache.parents[2].glob("*/*/*.h5"))


def unreadable_list(folder: _PathLike, split: str) -> Path:
    """The full list of a split's unreadable files, written when a refusal names too many to show."""
    return Path(folder) / f"unreadable-{split}.txt"


def sibling_cache(cache: _PathLike, split: str) -> Path:
    """The cache of another split made with the same settings (same folder)."""
    return Path(cache).with_name(f"{split}.h5")


# ---------------------------------------------------------------- stage two: heads and their evaluations


# The tag of a head's artifact named by its content: ``<clf>.<first 16 hex digits of its sha256>.pt``.
_CONTENT_TAG = re.compile(r"\.[0-9a-f]{16}$")
# What a head's files end in: its metadata, its artifacts, and the pickles of older versions (refused when read).
_HEAD_SUFFIXES = (".json", ".pt", ".skops", ".joblib")


@dataclass(frozen=True)
class HeadFiles:
    """The files of one head, from its base path (no suffix): its metadata, and one artifact, ``.pt`` or ``.skops``.

    The artifact is named by its content (:meth:`artifact`) and the metadata names it, so replacing a head writes
    the new artifact beside the old one and then the metadata: either is a whole head at every moment.
    ``<clf>.pt`` and ``<clf>.skops`` are the names of earlier versions, still read.
    Heads are never pickled: a head saved as ``.joblib`` by older versions is refused, to be fitted again.
    """

    base: Path

    @property
    def meta(self) -> Path:
        """The metadata JSON, which names the artifact and records its digest."""
        return self.base.with_name(self.base.name + ".json")

    @property
    def torch(self) -> Path:
        """``<clf>.pt``: a torch head's artifact (tensors, loadable with ``weights_only=True``) as earlier versions
        named it; a new one is written under this name, then named by its content."""
        return self.base.with_name(self.base.name + ".pt")

    @property
    def skops(self) -> Path:
        """``<clf>.skops``: a scikit-learn head's artifact (a skops file, loaded with an explicit list of trusted
        types) as earlier versions named it; a new one is written under this name, then named by its content."""
        return self.base.with_name(self.base.name + ".skops")

    @property
    def history(self) -> Path:
        """The linear head's per-epoch history."""
        return self.base.with_name(self.base.name + "-history.csv")

    def artifact(self, suffix: str, sha256: str) -> Path:
        """The artifact with these bytes: ``<clf>.<sha256[:16]><suffix>``."""
        return self.base.with_name(f"{self.base.name}.{sha256[:16]}{suffix}")

    def artifacts(self) -> list[Path]:
        """Every artifact file of this head on disk, in use or not: content-named, and of earlier versions."""
        name = re.compile(rf"{re.escape(self.base.name)}(\.[0-9a-f]{{16}})?\.(pt|skops|joblib)")
        folder = self.base.parent
        return sorted(p for p in (folder.iterdir() if folder.is_dir() else ()) if name.fullmatch(p.name))


def heads_dir(train_cache: _PathLike) -> Path:
    """Heads live beside the caches they were fitted on: ``<cache folder>/heads/``."""
    return Path(train_cache).parent / "heads"


def head_base(train_cache: _PathLike, clf: str, subset: int | None = None, exclude: int | None = None) -> Path:
    """A head's default base path (no suffix): ``heads/<clf>``, ``heads/subset-<N>/<clf>`` for N images per class, and
    ``.../exclude-<M>/<clf>`` for a head fitted without the M most suspect images of an audit."""
    folder = heads_dir(train_cache)
    if subset:
        folder = folder / f"subset-{subset}"
    if exclude is not None:
        folder = folder / f"exclude-{exclude}"
    return folder / clf


def head_files(path: _PathLike) -> HeadFiles:
    """The files of the head at ``path``: its base, its ``.json`` or its artifact (content-named or not). Only
    those suffixes are taken off: ``heads/features.16-output`` is a base, not ``heads/features`` with a suffix."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in _HEAD_SUFFIXES else path
    return HeadFiles(base.with_name(_CONTENT_TAG.sub("", base.name)))


def head_metadata(folder: _PathLike) -> list[Path]:
    """Candidate head metadata files in a heads folder (evaluations' JSON left out), sorted."""
    return sorted(p for p in Path(folder).glob("*.json") if not p.name.endswith("-test.json"))


def _numbered_dirs(folder: _PathLike, prefix: str) -> list[tuple[int, Path]]:
    found = []
    for p in Path(folder).glob(f"{prefix}-*"):
        n = p.name.removeprefix(f"{prefix}-")
        if p.is_dir() and n.isdigit():
            found.append((int(n), p))
    return sorted(found)


def subset_head_dirs(folder: _PathLike) -> list[tuple[int, Path]]:
    """The ``subset-<N>`` folders of a heads folder, as (N, folder), by N."""
    return _numbered_dirs(folder, "subset")


def exclude_head_dirs(folder: _PathLike) -> list[tuple[int, Path]]:
    """The ``exclude-<N>`` folders of a heads folder (heads fitted without an audit's N most suspect images), by N."""
    return _numbered_dirs(folder, "exclude")


@dataclass(frozen=True)
class EvaluationFiles:
    """The files of a test evaluation, beside the head or fine-tuned model it evaluates."""

    metrics: Path
    predictions: Path
    confusion: Path


def evaluation_files(artifact: _PathLike) -> EvaluationFiles:
    """Where the evaluation of a head (or fine-tuned model) is written: ``<base>-test.json``,
    ``<base>-test-predictions.npz`` and ``<base>-confusion.png``, its metrics JSON last."""
    base = head_files(artifact).base
    return EvaluationFiles(base.with_name(base.name + "-test.json"), base.with_name(base.name + "-test-predictions.npz"),
                           base.with_name(base.name + "-confusion.png"))


def export_path(artifact: _PathLike) -> Path:
    """Where a head or fine-tuned model is exported to ONNX by default: ``<base>.onnx`` beside its metadata
    (``heads/<clf>.onnx``, ``runs/.../<name>/model.onnx``)."""
    return Path(artifact).with_suffix(".onnx")


# ---------------------------------------------------------------- the audit


@dataclass(frozen=True)
class AuditFiles:
    """The files of an audit of one dataset's caches; other tools read the CSVs, so their names are fixed."""

    dir: Path

    @property
    def label_issues(self) -> Path:
        """``path,split,given,suggested,score``: every train and val image, most suspect first."""
        return self.dir / "label_issues.csv"

    @property
    def duplicates(self) -> Path:
        """``path_a,split_a,path_b,split_b,similarity,kind``: cross-split pairs first, then by similarity."""
        return self.dir / "duplicates.csv"

    @property
    def outliers(self) -> Path:
        """``path,split,score``: every image, most unusual first."""
        return self.dir / "outliers.csv"

    @property
    def summary(self) -> Path:
        """``summary.json``: counts, the estimated noise rate and the settings; written last, it marks the audit complete."""
        return self.dir / "summary.json"

    @property
    def work(self) -> Path:
        """A scratch folder for the duplicate search's projected features; removed when the audit ends."""
        return self.dir / ".work"


def audit_dir(train_cache: _PathLike) -> Path:
    """An audit lives beside the caches it audits: ``<cache folder>/audit/``."""
    return Path(train_cache).parent / "audit"


def audit_files(folder: _PathLike) -> AuditFiles:
    """The files of the audit in ``folder``."""
    return AuditFiles(Path(folder))


# ---------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class RunFiles:
    """The files of one fine-tune run."""

    dir: Path

    @property
    def meta(self) -> Path:
        """``model.json``: the finished model's metadata, written last."""
        return self.dir / "model.json"

    @property
    def model(self) -> Path:
        """``model.pt``: the kept epoch's weights."""
        return self.dir / "model.pt"

    @property
    def last(self) -> Path:
        """``last.pt``: the state after the last finished epoch, for resuming."""
        return self.dir / "last.pt"

    @property
    def history(self) -> Path:
        """``history.csv``: one row per epoch."""
        return self.dir / "history.csv"


def run_dir(output_dir: _PathLike, dataset: str, model: str, weights: str, name: str) -> Path:
    """Where a fine-tune writes: ``OUTPUT_DIR/<dataset>/<model>-<weights>/<name>/``."""
    return Path(output_dir) / slug(dataset) / slug(f"{model}-{weights}") / name


def run_files(folder: _PathLike) -> RunFiles:
    """The files of the run in ``folder``."""
    return RunFiles(Path(folder))


def run_metadata(output_dir: _PathLike, dataset: str, model: str, weights: str) -> list[Path]:
    """The ``model.json`` of every fine-tune run of one dataset and backbone, sorted."""
    return sorted(run_dir(output_dir, dataset, model, weights, "*").parent.glob("*/model.json"))


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class ReportFiles:
    """The files of a report."""

    dir: Path

    @property
    def html(self) -> Path:
        return self.dir / "index.html"

    @property
    def markdown(self) -> Path:
        return self.dir / "index.md"

    @property
    def data(self) -> Path:
        """``report.json``: what the report was made from; written last, it marks the report complete."""
        return self.dir / "report.json"

    @property
    def screenshot(self) -> Path:
        return self.dir / "screenshot.png"

    @property
    def render_check(self) -> Path:
        """What headless Chromium saw of ``index.html``, with the page's digest: reused while the page is unchanged."""
        return self.dir / "render-check.json"

    def figure(self, name: str) -> Path:
        return self.dir / f"{name}.png"


def report_dir(out_dir: _PathLike, dataset: str, model: str, weights: str) -> Path:
    """Where the report of one dataset and backbone is written: ``OUT_DIR/<dataset>/<model>-<weights>/``."""
    return Path(out_dir) / slug(dataset) / slug(f"{model}-{weights}")


def report_files(folder: _PathLike) -> ReportFiles:
    """The files of the report in ``folder``."""
    return ReportFiles(Path(folder))


# ---------------------------------------------------------------- writers


def lock_file(target: _PathLike) -> Path:
    """The lock file of a file or folder that one process at a time writes: ``.<name>.lock`` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")
