import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from cdm_ood.data.presets import ct_preset, uint8_preset
from cdm_ood.data.transforms import ImageTransformd, ToChannels, check_spatial_size, image_transform


def test_to_channels():
    rgb = np.stack([np.full((2, 2), v, np.float32) for v in (100, 50, 10)])
    np.testing.assert_allclose(ToChannels(1)(rgb), np.full((1, 2, 2), 0.299 * 100 + 0.587 * 50 + 0.114 * 10))
    assert ToChannels(3)(np.ones((1, 2, 2))).shape == (3, 2, 2)
    assert ToChannels(1)(torch.ones(3, 2, 2)).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="2 channels"):
        ToChannels(1)(np.ones((2, 4, 4)))


def test_image_transform_gives_float32_model_input_in_range():
    hu = np.random.default_rng(0).uniform(-3000, 3000, (1, 50, 70)).astype(np.float32)
    out = image_transform(ct_preset(), (32, 48))(hu)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (1, 32, 48)
    assert out.min() >= -1 and out.max() <= 1


def test_spatial_size_must_suit_the_unet():
    assert check_spatial_size((28, 28)) == (28, 28)
    assert check_spatial_size((8, 16, 16)) == (8, 16, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        check_spatial_size((30, 28))


def test_volumes_are_resized_in_3d():
    vol = np.random.default_rng(2).uniform(-1000, 1000, (1, 10, 20, 20)).astype(np.float32)
    out = image_transform(ct_preset(), (8, 16, 16))(vol)
    assert out.shape == (1, 8, 16, 16) and out.dtype == torch.float32


def test_dictionary_wrapper_in_a_monai_dataset():
    rng = np.random.default_rng(1)
    data = [{"image": rng.integers(0, 255, (1, 8, 8)).astype(np.float32), "label": i, "meta": {"index": i}}
            for i in range(4)]  # fmt: skip
    ds = Dataset(data, transform=ImageTransformd("image", uint8_preset(), (8, 8)))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 8, 8)
    np.testing.assert_allclose(batch["image"][2].numpy(), data[2]["image"] / 127.5 - 1, atol=1e-5)
