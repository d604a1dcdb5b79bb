"""Samplers against an exact Gaussian-mixture classifier (F_t = log p_t): they must reproduce the mixture."""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from closed_form import ConditionalMixture, GaussianMixture
from exact_mixture import MEANS, MIXTURE, ROWS, SCHEDULE, STDS, WEIGHTS, draw, mixture_errors
from PIL import Image

from cdm_ood import predict_noise
from cdm_ood.diffusion.sampling import (
    ddim_step,
    ddpm_step,
    denoise,
    dpm2_step,
    guided_denoiser,
    matching_level,
    sample,
    strided_levels,
)

# The long runs (steps x samples of 30,000 or more) are left out of the mutation run (`make mutants`).
SLOW_ROWS = [pytest.param(*row, marks=pytest.mark.slow) if row.steps * row.samples >= 30_000 else row for row in ROWS]


@pytest.mark.parametrize("method, steps, n, tolerance", SLOW_ROWS)
def test_samplers_reproduce_the_mixture(method, steps, n, tolerance):
    x = draw(method, steps, n)
    errors = mixture_errors(x)
    assert all(e <= tol for e, tol in zip(errors, tolerance, strict=True)), (method, steps, errors)
    assert x.min() >= -1 and x.max() <= 1


def test_dtype_is_kept_and_no_graph_survives_a_step():
    seen = []
    x = sample(MIXTURE, SCHEDULE, (4, 1, 1, 1), "ddim", 5, dtype=torch.float64,
               callback=lambda i, t, x: seen.append((i, t, x.dtype, x.requires_grad, x.grad_fn)))  # fmt: skip
    assert x.dtype == torch.float64
    assert seen == [(i, t, torch.float64, False, None) for i, t in enumerate(strided_levels(SCHEDULE.T, 5))]


def test_reproducible_with_a_generator():
    def draw(seed):
        return sample(MIXTURE, SCHEDULE, (8, 1, 1, 1), "ddpm", 20, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_timesteps_are_the_strided_levels_rounded_half_up_exactly():
    """top - i (top - 1) / (steps - 1), rounded half up in exact arithmetic: float64 gives 25 at (50, 23, 11)."""
    for top in range(1, 61):
        for steps in range(1, top + 1):
            gaps = max(steps - 1, 1)
            exact = [math.floor(top - Fraction((top - 1) * i, gaps) + Fraction(1, 2)) for i in range(steps)]
            assert strided_levels(top, steps) == exact, (top, steps)
    assert strided_levels(50, 23)[11] == 26


def test_timesteps_are_distinct_and_strided():
    assert strided_levels(1000, 1000) == list(range(1000, 0, -1))
    levels = strided_levels(1000, 100)
    assert len(levels) == len(set(levels)) == 100 and levels[0] == 1000 and levels[-1] == 1
    with pytest.raises(ValueError, match="steps"):
        strided_levels(10, 11)


def test_dpm_solver_first_step_is_ddim():
    x, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(
        dpm2_step(x, eps, 800, 700, SCHEDULE, None, None), ddim_step(x, eps, 800, 700, SCHEDULE, None)
    )


def log_snr(t: int) -> float:
    """lambda_t = log(alpha_t / sigma_t)."""
    return float((SCHEDULE.sqrt_alpha_bar[t] / SCHEDULE.sigma[t]).log())


def test_dpm_solver_2_step_solves_the_flow_exactly_when_eps_is_affine_in_lambda():
    """The second-order rule integrates the probability-flow ODE in lambda, dx/dlambda = sigma^2 x - sigma eps
    (alpha^2 = sigmoid(2 lambda)), with eps extrapolated linearly through (lambda_prev, eps_prev) and
    (lambda_t, eps_t): for such an eps it is exact. Unequal steps (h_prev 0.58, h 1.02) tell the slope's own
    lambda_t - lambda_prev from the step size h. Checked against scipy's ODE solver."""
    from scipy.integrate import solve_ivp

    g = torch.Generator().manual_seed(8)
    x, eps, eps_prev = (torch.randn(4, dtype=torch.float64, generator=g) for _ in range(3))
    t_prev, t, s = 600, 500, 300
    slope = (eps - eps_prev) / (log_snr(t) - log_snr(t_prev))

    def flow(lam, y):
        eps_lam = (eps + (lam - log_snr(t)) * slope).numpy()
        sigma2 = 1 / (1 + np.exp(2 * lam))
        return sigma2 * y - np.sqrt(sigma2) * eps_lam

    exact = solve_ivp(flow, (log_snr(t), log_snr(s)), x.numpy(), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
    np.testing.assert_allclose(dpm2_step(x, eps, t, s, SCHEDULE, eps_prev, t_prev).numpy(), exact, rtol=1e-8)


def test_dpm_solver_2_follows_the_exact_flow_of_gaussian_data():
    """x0 ~ N(mu, s^2): the probability-flow ODE maps x_t to x_u = alpha_u mu + sqrt(v_u / v_t) (x_t - alpha_t mu),
    v = alpha^2 s^2 + sigma^2, and the last step's x0_hat = E[x0 | x_1] is affine too, so a deterministic sampler
    is an affine map of its start; its gain is the std of its samples over the data's. Twenty DPM-Solver-2 steps
    from T: gain within 6% (0.029 off; with the slope divided by the step h instead: 0.125 off; DDIM, first
    order: 0.207), offset within 1e-4."""
    mu, s = 0.2, 0.3
    f64 = {"dtype": torch.float64}
    gaussian = GaussianMixture(torch.ones(1), torch.full((1, 1, 1, 1), mu, **f64), torch.tensor([s], **f64), SCHEDULE)
    abar, T = SCHEDULE.alpha_bar.double(), SCHEDULE.T
    v1, vT = abar[1] * s**2 + 1 - abar[1], abar[T] * s**2 + 1 - abar[T]
    gain = float(abar[1].sqrt() * s**2 / v1 * (v1 / vT).sqrt())  # x_T -> x_1 (the flow) -> E[x0 | x_1]
    start = torch.tensor([-1.0, 1.0], **f64).reshape(2, 1, 1, 1)
    out = sample(gaussian, SCHEDULE, start.shape, "dpm2", 20, x_start=start, t_start=T, dtype=torch.float64).flatten()
    exact_offset = mu - gain * float(abar[T].sqrt()) * mu
    assert abs((out[1] - out[0]).item() / 2 / gain - 1) < 0.06
    assert abs((out[1] + out[0]).item() / 2 - exact_offset) < 1e-4


def test_denoise_is_the_closed_form_posterior_mean():
    """y = x0 + sigma n with x0 ~ N(mu, s^2 I): E[x0 | y] = mu + s^2 / (s^2 + sigma^2) (y - mu)."""
    mu, s = 0.2, 0.3
    f64 = {"dtype": torch.float64}
    gaussian = GaussianMixture(torch.ones(1), torch.full((1, 1, 4, 4), mu, **f64), torch.tensor([s], **f64), SCHEDULE)
    t = 300
    sigma = float(SCHEDULE.sigma[t] / SCHEDULE.sqrt_alpha_bar[t])
    assert matching_level(SCHEDULE, sigma) == t
    g = torch.Generator().manual_seed(3)
    y = mu + s * torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    y = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = mu + s**2 / (s**2 + sigma**2) * (y - mu)
    torch.testing.assert_close(denoise(gaussian, y, SCHEDULE, sigma), expected, rtol=1e-8, atol=1e-10)


def test_posterior_sampling_from_a_noisy_image_stays_near_it():
    y = torch.full((200, 1, 1, 1), 0.45) + 0.05 * torch.randn(200, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    out = denoise(MIXTURE, y, SCHEDULE, 0.05, method="ddpm", steps=20, generator=torch.Generator().manual_seed(5))
    assert out.shape == y.shape and abs(out.mean().item() - 0.4) < 0.05, "posterior samples come from the near mode"


CONDITIONAL = ConditionalMixture(WEIGHTS, MEANS.reshape(2, 1, 1, 1), STDS, SCHEDULE, null_label=2)


def test_denoise_passes_labels_generator_and_dtype_on():
    """Given labels, the one-step estimate is the posterior mean of that class's component; posterior sampling
    follows the labels and the generator and keeps the input's dtype."""
    t = 300
    sigma = float(SCHEDULE.sigma[t] / SCHEDULE.sqrt_alpha_bar[t])
    y = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64).reshape(6, 1, 1, 1)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    mean, var = MEANS.reshape(2).double()[labels].reshape(6, 1, 1, 1), STDS.double()[labels].reshape(6, 1, 1, 1) ** 2
    expected = mean + var / (var + sigma**2) * (y - mean)
    torch.testing.assert_close(denoise(CONDITIONAL, y, SCHEDULE, sigma, labels=labels), expected, rtol=1e-6, atol=1e-8)

    def draw(label, seed):
        y, g = torch.zeros(200, 1, 1, 1, dtype=torch.float64), torch.Generator().manual_seed(seed)
        return denoise(CONDITIONAL, y, SCHEDULE, 0.05, method="ddpm", steps=20, labels=torch.full((200,), label),
                       generator=g)  # fmt: skip

    first, again, other = draw(0, 1), draw(0, 1), draw(1, 1)
    assert first.dtype == torch.float64 and torch.equal(first, again)
    posterior_means = MEANS * 0.05**2 / (STDS**2 + 0.05**2)  # of each class's component, given y = 0
    assert abs(first.mean() - posterior_means[0]) < 0.02 and abs(other.mean() - posterior_means[1]) < 0.02


def test_denoise_keeps_float32_and_runs_50_steps_by_default():
    calls = []

    def counted(x):
        calls.append(x.dtype)
        return MIXTURE(x)

    y = torch.zeros(3, 1, 1, 1)
    assert denoise(counted, y, SCHEDULE, 0.5).dtype == torch.float32
    assert matching_level(SCHEDULE, 0.5) > 50 and denoise(counted, y, SCHEDULE, 0.5, method="ddim").dtype == y.dtype
    assert len(calls) == 1 + 50 and set(calls) == {torch.float32}


@pytest.mark.slow
def test_guidance_zero_samples_the_conditional_and_guidance_follows_its_formula():
    labels = torch.ones(400, dtype=torch.long)
    x = sample(CONDITIONAL, SCHEDULE, (400, 1, 1, 1), "ddim", 100, labels=labels, guidance=0.0,
               null_label=2, generator=torch.Generator().manual_seed(6))  # fmt: skip
    assert abs(x.mean().item() - MEANS[1].item()) < 0.03 and abs(x.std().item() / STDS[1].item() - 1) < 0.2
    z = torch.randn(6, 1, 1, 1, dtype=torch.float64)
    lab = torch.tensor([0, 1, 0, 1, 0, 1])
    cond = predict_noise(CONDITIONAL, z, 400, SCHEDULE, labels=lab)
    null = predict_noise(CONDITIONAL, z, 400, SCHEDULE, labels=torch.full_like(lab, 2))
    guided = guided_denoiser(CONDITIONAL, SCHEDULE, lab, guidance=2.0, null_label=2)(z, 400)
    torch.testing.assert_close(guided, 3.0 * cond - 2.0 * null)
    assert not torch.allclose(cond, null)


def exactly(message: str) -> str:
    """A `pytest.raises` pattern matching the whole message, no more."""
    return f"^{re.escape(message)}$"


def test_unknown_method_and_bad_sigma():
    with pytest.raises(ValueError, match=exactly("unknown sampler 'euler'; expected one of ('ddpm', 'ddim', 'dpm2')")):
        sample(MIXTURE, SCHEDULE, (1, 1, 1, 1), "euler")
    for sigma in (0.0, -0.1):
        with pytest.raises(ValueError, match=exactly(f"sigma must be positive, got {sigma}")):
            matching_level(SCHEDULE, sigma)
    for steps in (0, 11):
        with pytest.raises(ValueError, match=exactly(f"steps must be in 1..10, got {steps}")):
            strided_levels(10, steps)
    assert strided_levels(10, 1) == [10] and strided_levels(10, 10) == list(range(10, 0, -1))


def test_guided_denoiser_follows_the_guidance_formula():
    """eps_w = (1 + w) eps(x | c) - w eps(x | null) with w = `guidance`; w = 0 (the default) is eps(x | c), no
    labels is the unconditional eps; guidance without the model's null label is refused."""
    z = torch.randn(6, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([0, 1, 0, 1, 0, 1])
    cond = predict_noise(CONDITIONAL, z, 400, SCHEDULE, labels=lab)
    null = predict_noise(CONDITIONAL, z, 400, SCHEDULE, labels=torch.full_like(lab, 2))
    assert not torch.allclose(cond, null)
    guided = guided_denoiser(CONDITIONAL, SCHEDULE, lab, guidance=2.0, null_label=2)(z, 400)
    torch.testing.assert_close(guided, 3.0 * cond - 2.0 * null, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(guided_denoiser(CONDITIONAL, SCHEDULE, lab)(z, 400), cond, rtol=0, atol=0)
    unconditional = guided_denoiser(CONDITIONAL, SCHEDULE, None, guidance=2.0, null_label=2)(z, 400)
    torch.testing.assert_close(unconditional, null, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=exactly("classifier-free guidance needs the model's null label")):
        guided_denoiser(CONDITIONAL, SCHEDULE, lab, guidance=2.0)


def test_sample_command_writes_a_grid_and_the_arrays(checkpoint, tmp_path):
    from test_score import invoke

    out = invoke("sample", "--checkpoint", checkpoint, "--n", 6, "--method", "dpm2", "--steps", 5, "--out",
                 tmp_path / "grid.png", "--npz", tmp_path / "s.npz")  # fmt: skip
    assert out.exit_code == 0, out.output
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (6, 1, 16, 16) and samples.min() >= -1 and samples.max() <= 1 and samples.std() > 0
    assert Image.open(tmp_path / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)
    bad = invoke("sample", "--checkpoint", checkpoint, "--label", 1, "--out", tmp_path / "x.png")
    assert bad.exit_code == 2 and "not conditional" in bad.stderr


def test_denoise_command_writes_outputs_and_leaves_inputs_alone(checkpoint, scans, tmp_path):
    import nibabel as nib
    from test_score import digest, invoke

    before = digest(scans)
    out = invoke("denoise", "--checkpoint", checkpoint, "--sigma", 0.1, scans / "clean.nii.gz", scans / "broken.dcm",
                 "--out-dir", tmp_path / "den")  # fmt: skip
    assert out.exit_code == 1 and "broken.dcm" in out.stderr, "a bad input is reported, the rest is done"
    assert digest(scans) == before
    assert sorted(p.name for p in (tmp_path / "den").iterdir()) == ["clean.nii.gz"]
    source, result = nib.load(scans / "clean.nii.gz"), nib.load(tmp_path / "den" / "clean.nii.gz")
    assert result.shape == source.shape and np.allclose(result.affine, source.affine), "the input's geometry"
    hu = result.get_fdata()
    assert hu.min() >= -1000 and hu.max() <= 1000 and not np.allclose(hu, source.get_fdata()), "denoised, in HU"
    assert np.corrcoef(hu.ravel(), source.get_fdata().ravel())[0, 1] > 0.5, "the same anatomy, voxel for voxel"


def test_denoised_dicom_keeps_its_geometry_under_a_new_series_and_names_never_collide(checkpoint, scans, tmp_path):
    import pydicom
    from test_score import invoke

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.arange(24 * 20, dtype=np.uint8).reshape(24, 20)).save(tmp_path / folder / "x.png")
    out = invoke("denoise", "--checkpoint", checkpoint, "--sigma", 0.1, scans / "study", tmp_path / "a" / "x.png",
                 tmp_path / "b" / "x.png", "--out-dir", tmp_path / "den")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "den").iterdir()) == ["series1", "x-2.png", "x.png"]
    assert Image.open(tmp_path / "den" / "x-2.png").size == (20, 24), "a PNG at its input's size"
    inputs = sorted((scans / "study" / "series1").iterdir())
    outputs = [pydicom.dcmread(tmp_path / "den" / "series1" / p.name) for p in inputs]
    originals = [pydicom.dcmread(p) for p in inputs]
    assert len({d.SeriesInstanceUID for d in outputs}) == 1
    assert outputs[0].SeriesInstanceUID != originals[0].SeriesInstanceUID
    for new, old in zip(outputs, originals, strict=True):
        assert new.SOPInstanceUID != old.SOPInstanceUID and new.StudyInstanceUID == old.StudyInstanceUID
        assert new.ImagePositionPatient == old.ImagePositionPatient and new.PixelSpacing == old.PixelSpacing
        hu = pydicom.pixels.apply_modality_lut(new.pixel_array, new)
        assert hu.shape == old.pixel_array.shape and not np.array_equal(new.pixel_array, old.pixel_array)
        assert np.corrcoef(hu.ravel(), pydicom.pixels.apply_modality_lut(old.pixel_array, old).ravel())[0, 1] > 0.5


@pytest.mark.slow
def test_sample_grid_is_logged_to_a_given_mlflow_run(checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient
    from test_score import invoke

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("samples"))
    out = invoke("sample", "--checkpoint", checkpoint, "--n", 4, "--steps", 2, "--out", tmp_path / "g.png",
                 "--mlflow-run", run.info.run_id, "--tracking-uri", uri)  # fmt: skip
    assert out.exit_code == 0, out.output
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/g.png"]


def test_denoise_command_never_denoises_slices_it_cannot_trust(checkpoint, scans, tmp_path):
    from test_score import invoke

    out = invoke(
        "denoise", "--checkpoint", checkpoint, "--sigma", 0.1, scans / "blank.png", "--out-dir", tmp_path / "d"
    )
    assert out.exit_code == 1 and "not denoised: constant pixels" in out.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_a_colour_dicom_that_cannot_be_written_back_is_reported_and_the_rest_is_done(checkpoint, scans, tmp_path):
    import pydicom.data
    from test_score import invoke

    colour = pydicom.data.get_testdata_file("SC_rgb_small_odd.dcm")
    out = invoke("denoise", "--checkpoint", checkpoint, "--sigma", 0.1, colour, scans / "clean.nii.gz",
                 "--out-dir", tmp_path / "den")  # fmt: skip
    assert out.exit_code == 1 and "SC_rgb_small_odd.dcm" in out.stderr and "grayscale" in out.stderr, out.output
    assert sorted(p.name for p in (tmp_path / "den").iterdir()) == ["clean.nii.gz"]


@pytest.mark.parametrize(("t", "s"), [(800, 700), (500, 499), (300, 10), (50, 1)])
def test_ddim_with_eta_one_is_the_ddpm_ancestral_step(t, s):
    """DDIM at eta = 1 has DDPM's posterior variance beta~ and the same mean (Song et al., sec. 4.1): for the same
    eps_hat and the same draw z both steps give the same x_s; at eta = 0.5 its noise is half as large; without a
    draw (z None) the noise term is left out."""
    gen = torch.Generator().manual_seed(t)
    x, eps, z = (torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ddpm = ddpm_step(x, eps, t, s, SCHEDULE, z)
    torch.testing.assert_close(ddim_step(x, eps, t, s, SCHEDULE, z, eta=1.0), ddpm, rtol=1e-9, atol=1e-9)
    without = ddim_step(x, eps, t, s, SCHEDULE, None, eta=1.0)
    torch.testing.assert_close(without, ddpm_step(x, eps, t, s, SCHEDULE, torch.zeros_like(z)), rtol=1e-9, atol=1e-9)
    half = ddim_step(x, eps, t, s, SCHEDULE, z, eta=0.5) - ddim_step(x, eps, t, s, SCHEDULE, -z, eta=0.5)
    full = ddim_step(x, eps, t, s, SCHEDULE, z, eta=1.0) - ddim_step(x, eps, t, s, SCHEDULE, -z, eta=1.0)
    torch.testing.assert_close(half, full / 2, rtol=1e-9, atol=1e-9)


def test_sample_defaults_to_50_deterministic_ddim_steps_and_ddim_eta_one_is_ddpm():
    """By default `sample` runs 50 DDIM steps with eta = 0 in float32 (the generator draws only the start); DDIM
    with eta = 1 draws the same noise as DDPM and takes the same steps; x_start is cast to `dtype`."""
    calls = []

    def counted(x):
        calls.append(x.dtype)
        return MIXTURE(x)

    default = sample(counted, SCHEDULE, (2, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    explicit = sample(MIXTURE, SCHEDULE, (2, 1, 1, 1), "ddim", 50, generator=torch.Generator().manual_seed(0))
    assert default.dtype == torch.float32 and torch.equal(default, explicit)
    assert calls == [torch.float32] * 50
    start = torch.linspace(-1, 1, 4).reshape(4, 1, 1, 1)  # float32

    def run(method, seed, **kwargs):
        return sample(MIXTURE, SCHEDULE, start.shape, method, 10, generator=torch.Generator().manual_seed(seed),
                      x_start=start, t_start=600, dtype=torch.float64, **kwargs)  # fmt: skip

    ddim = run("ddim", 1)
    assert ddim.dtype == torch.float64 and torch.equal(ddim, run("ddim", 2))
    g = torch.Generator().manual_seed(3)
    sample(MIXTURE, SCHEDULE, start.shape, "ddim", 10, generator=g, x_start=start, t_start=600)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state()), "eta = 0 draws no noise"
    torch.testing.assert_close(run("ddim", 1, eta=1.0), run("ddpm", 1), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(run("ddim", 1, eta=1.0), ddim)
