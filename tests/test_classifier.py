import inspect

import pytest
import torch

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss, predict_noise

T = 10
SHAPES = {"2d": (2, (1, 16, 16)), "3d": (3, (1, 8, 8, 8))}


def tiny(spatial_dims, num_classes=None, randomise=False):
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
    )
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("dims, shape", SHAPES.values(), ids=SHAPES.keys())
def test_output_shape(dims, shape):
    logits = tiny(dims)(torch.randn(3, *shape))
    assert logits.shape == (3, T + 2)


@pytest.mark.parametrize("dims, shape", SHAPES.values(), ids=SHAPES.keys())
def test_batch_independence_of_the_gradient_denoiser(dims, shape):
    model = tiny(dims, randomise=True).double()
    schedule = NoiseSchedule.linear(T)
    x = torch.randn(4, *shape, dtype=torch.float64)
    t = torch.tensor([1, 4, 7, 10])
    whole = predict_noise(model, x, t, schedule)
    single = torch.cat([predict_noise(model, x[i : i + 1], t[i : i + 1], schedule) for i in range(4)])
    torch.testing.assert_close(whole, single, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims, shape", SHAPES.values(), ids=SHAPES.keys())
def test_cdm_loss_backpropagates_through_the_double_backward(dims, shape):
    model = tiny(dims)
    out = cdm_loss(model, torch.randn(4, *shape), NoiseSchedule.linear(T), t=torch.tensor([1, 3, 5, 9]))
    out.mse.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    conv_in = grads["backbone.conv_in.conv.weight"]
    assert conv_in is not None and conv_in.abs().sum() > 0, "the MSE on the input-gradient must train the backbone"
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_no_time_input():
    assert list(inspect.signature(CDMClassifier.forward).parameters) == ["self", "x", "labels"]
    model = tiny(2)
    seen = []
    model.backbone.time_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    model(torch.randn(2, 1, 16, 16))
    model(5 * torch.randn(3, 1, 16, 16))
    embeddings = torch.cat(seen)
    assert torch.equal(embeddings, embeddings[:1].expand_as(embeddings)), "the backbone must get a constant timestep"


def test_class_conditional_model_uses_a_trained_null_label():
    model = tiny(2, num_classes=3, randomise=True)
    x = torch.randn(2, 1, 16, 16)
    null = torch.full((2,), model.null_label)
    torch.testing.assert_close(model(x), model(x, null))
    assert not torch.allclose(model(x, torch.tensor([0, 2])), model(x, null))
    assert model.backbone.class_embedding.num_embeddings == 4


def test_unconditional_model_rejects_labels():
    model = tiny(2)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="no null label"):
        _ = model.null_label


def test_logits_are_the_fixed_cumulative_sum_of_the_head():
    model = tiny(2, randomise=True)
    seen = []
    model.head.register_forward_hook(lambda mod, args, out: seen.append(out))
    logits = model(torch.randn(2, 1, 16, 16))
    torch.testing.assert_close(logits, seen[0].cumsum(dim=1), rtol=0, atol=0)
    assert not any("cumsum" in name for name, _ in model.named_parameters())
