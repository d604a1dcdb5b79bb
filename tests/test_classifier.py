import inspect

import pytest
import torch

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss, predict_noise
from cdm_ood.diffusion.classifier import ARCHS

T = 10
SHAPES = {"2d": (2, (1, 16, 16)), "3d": (3, (1, 8, 8, 8))}
arches = pytest.mark.parametrize("arch", ARCHS)
BF16_TOLERANCE = 0.05  # relative; bfloat16 keeps 8 significant bits (0.4% per rounding)


def tiny(spatial_dims, num_classes=None, randomise=False, arch="unet"):
    """A small CDMClassifier; `randomise` lifts MONAI's zero-initialised residual branches, as training would."""
    torch.manual_seed(0)
    model = CDMClassifier(
        spatial_dims,
        1,
        T,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_classes=num_classes,
        norm_num_groups=8,
        num_head_channels=8,
        arch=arch,
    )
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


@arches
@pytest.mark.parametrize("dims, shape", SHAPES.values(), ids=SHAPES.keys())
def test_output_shape(dims, shape, arch):
    logits = tiny(dims, arch=arch)(torch.randn(3, *shape))
    assert logits.shape == (3, T + 2)


@arches
@pytest.mark.parametrize("dims, shape", SHAPES.values(), ids=SHAPES.keys())
def test_batch_independence_of_the_gradient_denoiser(dims, shape, arch):
    model = tiny(dims, randomise=True, arch=arch).double()
    schedule = NoiseSchedule.linear(T)
    x = torch.randn(4, *shape, dtype=torch.float64)
    t = torch.tensor([1, 4, 7, 10])
    whole = predict_noise(model, x, t, schedule)
    single = torch.cat([predict_noise(model, x[i : i + 1], t[i : i + 1], schedule) for i in range(4)])
    torch.testing.assert_close(whole, single, rtol=1e-10, atol=1e-12)


@arches
@pytest.mark.parametrize("dims, shape", SHAPES.values(), ids=SHAPES.keys())
def test_cdm_loss_backpropagates_through_the_double_backward(dims, shape, arch):
    model = tiny(dims, arch=arch)
    out = cdm_loss(model, torch.randn(4, *shape), NoiseSchedule.linear(T), t=torch.tensor([1, 3, 5, 9]))
    out.mse.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    conv_in = grads["backbone.conv_in.conv.weight"]
    assert conv_in is not None and conv_in.abs().sum() > 0, "the MSE on the input-gradient must train the backbone"
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


@arches
def test_no_time_input(arch):
    assert list(inspect.signature(CDMClassifier.forward).parameters) == ["self", "x", "labels"]
    model = tiny(2, arch=arch)
    seen = []
    model.backbone.time_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    model(torch.randn(2, 1, 16, 16))
    model(5 * torch.randn(3, 1, 16, 16))
    embeddings = torch.cat(seen)
    assert torch.equal(embeddings, embeddings[:1].expand_as(embeddings)), "the backbone must get a constant timestep"


@arches
def test_class_conditional_model_uses_a_trained_null_label(arch):
    model = tiny(2, num_classes=3, randomise=True, arch=arch)
    x = torch.randn(2, 1, 16, 16)
    null = torch.full((2,), model.null_label)
    torch.testing.assert_close(model(x), model(x, null))
    assert not torch.allclose(model(x, torch.tensor([0, 2])), model(x, null))
    assert model.backbone.class_embedding.num_embeddings == 4


@arches
def test_unconditional_model_rejects_labels(arch):
    model = tiny(2, arch=arch)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="no null label"):
        _ = model.null_label


@arches
def test_logits_are_the_fixed_cumulative_sum_of_the_head(arch):
    model = tiny(2, randomise=True, arch=arch)
    seen = []
    model.head.register_forward_hook(lambda mod, args, out: seen.append(out))
    logits = model(torch.randn(2, 1, 16, 16))
    torch.testing.assert_close(logits, seen[0].cumsum(dim=1), rtol=0, atol=0)
    assert not any("cumsum" in name for name, _ in model.named_parameters())


def test_encoder_drops_the_decoder_and_keeps_the_head():
    unet, encoder = tiny(2, arch="unet"), tiny(2, arch="encoder")
    names = [n for n, _ in encoder.named_parameters()]
    assert not any(n.startswith(("backbone.up_blocks", "backbone.out.2")) for n in names)
    assert any(n.startswith("backbone.up_blocks") for n, _ in unet.named_parameters())
    assert encoder.head[-1].in_features == 16 and unet.head[-1].in_features == 8, "last / first level's width"
    assert sum(p.numel() for p in encoder.parameters()) < sum(p.numel() for p in unet.parameters()) / 2
    with pytest.raises(ValueError, match="arch 'resnet' is not one of unet, encoder"):
        tiny(2, arch="resnet")


@arches
def test_bf16_autocast_keeps_the_head_float32_and_stays_close_to_float32(arch):
    """`train.precision: bf16` runs the backbone under autocast: the logits stay float32 and the gradient denoiser
    and the loss stay within bfloat16's precision of the float32 ones (on CPU here; the same code path on GPU)."""
    model = tiny(2, randomise=True, arch=arch)
    schedule = NoiseSchedule.linear(T)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([1, 4, 7, 10])
    full = predict_noise(model, x, t, schedule)
    loss = cdm_loss(model, x, schedule, t=t, noise=torch.ones_like(x)).loss
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(x)
        half = predict_noise(model, x, t, schedule)
        half_loss = cdm_loss(model, x, schedule, t=t, noise=torch.ones_like(x)).loss
    assert logits.dtype == torch.float32 and half.dtype == torch.float32
    assert torch.linalg.norm(half - full) / torch.linalg.norm(full) < BF16_TOLERANCE
    assert abs(half_loss - loss) / loss < BF16_TOLERANCE
    half_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
