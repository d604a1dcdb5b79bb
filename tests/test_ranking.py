"""Restoration ranking on an exact Gaussian prior: MAP = the exact posterior ordering; noisy-level density."""

import math

import pytest
import torch
from closed_form import GaussianMixture

from cdm_ood import NoiseSchedule
from cdm_ood.diffusion.posterior import posterior_samples
from cdm_ood.diffusion.ranking import (
    OPERATOR_SAMPLES,
    PRIOR_WEIGHT,
    expected_quality,
    log_observation_likelihood,
    rank_restorations,
)

SCHEDULE = NoiseSchedule.linear(500)
F64 = {"dtype": torch.float64}
MU, S = 0.1, 0.3
SHAPE = (1, 4, 4)
D = 16
GAUSSIAN = GaussianMixture(torch.ones(1), torch.full((1, *SHAPE), MU, **F64), torch.tensor([S], **F64), SCHEDULE)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor | float, var: float) -> torch.Tensor:
    return -0.5 * D * math.log(2 * math.pi * var) - 0.5 * (x - mean).flatten(1).square().sum(1) / var


def candidates_and_observation(sigma: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = MU + S * torch.randn(1, *SHAPE, generator=g, **F64)
    y = clean + sigma * torch.randn(1, *SHAPE, generator=g, **F64)
    levels = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4, 0.8], **F64).reshape(-1, 1, 1, 1)
    noisy = clean + levels * torch.randn(6, *SHAPE, generator=g, **F64)
    smooth = MU + torch.tensor([0.2, 0.5, 0.9], **F64).reshape(-1, 1, 1, 1) * (y - MU)  # shrunk towards the mean
    return torch.cat([noisy, smooth, y]), y


@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.5])
def test_map_ranking_is_the_exact_posterior_ordering(sigma):
    """x0 ~ N(mu, s^2 I), y = x0 + sigma n: p(x | y) = N(m, v I), v = s^2 sigma^2 / (s^2 + sigma^2),
    m = (sigma^2 mu + s^2 y) / (s^2 + sigma^2)."""
    candidates, y = candidates_and_observation(sigma)
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "map", sigma, prior_weight=1.0)  # Bayes' rule
    v = S**2 * sigma**2 / (S**2 + sigma**2)
    m = (sigma**2 * MU + S**2 * y) / (S**2 + sigma**2)
    posterior = gaussian_log_density(candidates, m, v)
    assert ranking.order == torch.argsort(posterior, descending=True, stable=True).tolist()
    difference = ranking.scores - posterior  # log p(y), the same for every candidate
    torch.testing.assert_close(difference, difference[:1].expand_as(difference), rtol=0, atol=1e-8)
    torch.testing.assert_close(ranking.log_prior, gaussian_log_density(candidates, MU, S**2))


def test_expected_mse_ranking_is_the_exact_posterior_expected_error_for_noise():
    """E[||c - x||^2 | y] = ||c - m||^2 + d v on the Gaussian prior; with sigma on a level, Tweedie's m is exact."""
    t = 200
    sigma = float(SCHEDULE.sigma[t] / SCHEDULE.sqrt_alpha_bar[t])
    candidates, y = candidates_and_observation(sigma)
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "expected-mse", sigma)
    v = S**2 * sigma**2 / (S**2 + sigma**2)
    m = (sigma**2 * MU + S**2 * y) / (S**2 + sigma**2)
    expected_mse = (candidates - m).flatten(1).square().mean(1) + v
    torch.testing.assert_close(-ranking.scores, expected_mse - v, rtol=0, atol=1e-8)
    assert ranking.order == torch.argsort(expected_mse, stable=True).tolist()
    auto = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "auto", sigma)
    torch.testing.assert_close(auto.scores, ranking.scores, rtol=0, atol=0)


@pytest.mark.slow
def test_expected_mse_ranking_under_blur_follows_the_exact_posterior():
    """Blur + noise: E[x | y] from guided posterior samples; the order of candidates whose expected errors differ
    by more than the samples' Monte Carlo error is the exact one, and the expected MSE is the exact one within it."""
    from test_posterior import blur, exact_posterior, matrix

    sigma = 0.1
    g = torch.Generator().manual_seed(3)
    clean = GAUSSIAN.sample(1, g)
    y = blur(clean) + sigma * torch.randn(clean.shape, generator=g, **F64)
    mean, cov = exact_posterior(y, sigma, matrix(blur))
    steps = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4], **F64).reshape(-1, 1, 1, 1)
    candidates = mean + steps * torch.randn(5, *SHAPE, generator=g, **F64)
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "expected-mse", sigma, blur, samples=400,
                                steps=100, generator=torch.Generator().manual_seed(0))  # fmt: skip
    exact = (candidates - mean).flatten(1).square().mean(1) + cov.diagonal().mean()
    assert ranking.order == torch.argsort(exact, stable=True).tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(ranking.quality["expected_mse"], exact, rtol=0.1, atol=0.003)


@pytest.mark.parametrize("operator", ["identity", "blur"])
def test_candidate_posterior_is_the_exact_expected_error_over_the_candidate_set(operator):
    """Bayes' rule on the candidate set: w_j = p(c_j | y) / sum_k p(c_k | y) from the exact Gaussian posterior
    N(m, C) (identity or blur), and each candidate's expected MSE sum_j w_j ||c_i - c_j||^2 / d, to 1e-8."""
    from test_posterior import blur, exact_posterior, matrix

    sigma, g = 0.1, torch.Generator().manual_seed(4)
    a = None if operator == "identity" else blur
    clean = GAUSSIAN.sample(1, g)
    y = (clean if a is None else a(clean)) + sigma * torch.randn(clean.shape, generator=g, **F64)
    mean, cov = exact_posterior(y, sigma, torch.eye(D, **F64) if a is None else matrix(a))
    candidates = mean + torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05], **F64).reshape(-1, 1, 1, 1) * torch.randn(
        5, *SHAPE, generator=g, **F64
    )
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "candidate-posterior", sigma, a, prior_weight=1.0)
    r = (candidates - mean).flatten(1)
    log_posterior = -0.5 * (r @ torch.linalg.inv(cov) * r).sum(1)
    weights = torch.softmax(log_posterior, 0)
    assert weights.max() < 0.9, "the test needs weights spread over several candidates"
    torch.testing.assert_close(ranking.weights, weights, rtol=0, atol=1e-8)
    pairs = (candidates[:, None] - candidates[None]).flatten(2).square().mean(2)
    torch.testing.assert_close(-ranking.scores, pairs @ weights, rtol=0, atol=1e-8)
    torch.testing.assert_close(ranking.quality["expected_mse"], pairs @ weights, rtol=0, atol=1e-8)
    assert ranking.order == torch.argsort(pairs @ weights, stable=True).tolist()
    if a is not None:
        auto = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "auto", sigma, a)
        tempered = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "candidate-posterior", sigma, a,
                                     prior_weight=PRIOR_WEIGHT)  # fmt: skip
        torch.testing.assert_close(auto.weights, tempered.weights, rtol=0, atol=0)


@pytest.mark.parametrize("operator", ["identity", "blur"])
@pytest.mark.parametrize("beta", [0.0, 0.25, PRIOR_WEIGHT, 1.0])
def test_the_prior_weight_tempers_the_exact_prior_in_map_and_candidate_posterior(beta, operator):
    """beta log N(c; mu, s^2 I) + log N(y; A c, sigma^2 I) on the exact Gaussian, to 1e-8: the `map` scores, and
    the `candidate-posterior` weights normalised over the candidates; beta = 0 ranks by the observation alone."""
    from test_posterior import blur

    a = None if operator == "identity" else blur
    sigma = 0.2
    candidates, y = candidates_and_observation(sigma, seed=3)
    log_obs = log_observation_likelihood(candidates, y, sigma, a)
    tempered = beta * gaussian_log_density(candidates, MU, S**2) + log_obs
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "map", sigma, a, prior_weight=beta)
    torch.testing.assert_close(ranking.scores, tempered, rtol=0, atol=1e-8)
    torch.testing.assert_close(ranking.log_observation, log_obs, rtol=0, atol=0)
    assert ranking.order == torch.argsort(tempered, descending=True, stable=True).tolist()
    spread = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "candidate-posterior", sigma, a, prior_weight=beta)
    torch.testing.assert_close(spread.weights, torch.softmax(tempered, 0), rtol=0, atol=1e-8)
    if beta == 0:
        assert ranking.order == torch.argsort(log_obs, descending=True, stable=True).tolist()


def test_expected_quality_averages_over_the_samples():
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(6, 1, 8, 8, generator=g, **F64).clamp(-1, 1)
    candidates = torch.stack([draws[0], torch.zeros(1, 8, 8, **F64)])
    quality = expected_quality(candidates, draws)
    mse = (candidates[:, None] - draws[None]).square().flatten(2).mean(2)
    torch.testing.assert_close(quality["expected_mse"], mse.mean(1))
    assert quality["expected_psnr"][0].isfinite() and quality["expected_psnr"][0] > 100 / 6, "one exact match"
    torch.testing.assert_close(quality["expected_psnr"][1], (10 * torch.log10(4 / mse[1])).mean())
    assert 1 / 6 - 0.01 < quality["expected_ssim"][0] < 1 and quality["expected_ssim"][1] < 0.1
    weights = torch.tensor([0.5, 0.5, 0, 0, 0, 0], **F64)
    weighted = expected_quality(candidates, draws, weights)
    torch.testing.assert_close(weighted["expected_mse"], mse[:, :2].mean(1))


def test_expected_ssim_is_at_data_range_2_with_the_largest_odd_window_up_to_7():
    """Constant images a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2 with L = 2; otherwise
    MONAI's SSIM with a window of 7, or the largest odd size that fits the smallest side."""
    from monai.metrics import SSIMMetric

    a, b = torch.full((1, 1, 8, 8), 0.1, **F64), torch.full((1, 1, 8, 8), -0.1, **F64)
    c1 = (0.01 * 2) ** 2
    ssim = expected_quality(a, b)["expected_ssim"]
    torch.testing.assert_close(ssim, torch.tensor([(-0.02 + c1) / (0.02 + c1)], **F64), rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    for size, window in [((4, 4), 3), ((4, 8), 3), ((16, 16), 7)]:
        candidates, draws = (torch.rand(n, 1, *size, generator=g, **F64) * 2 - 1 for n in (2, 3))
        reference = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=window)
        expected = torch.stack([reference(c.expand_as(draws).float(), draws.float()).mean() for c in candidates])
        torch.testing.assert_close(expected_quality(candidates, draws)["expected_ssim"], expected.double())


def test_expected_mse_draws_posterior_samples_when_asked_or_under_an_operator():
    """No draws by default for noise (Tweedie's mean is exact), and E[x | y] is (1, C, *spatial) in the candidates'
    dtype; `samples` draws with the given generator and 50 steps by default, in the candidates' dtype; under an
    operator at least OPERATOR_SAMPLES are drawn."""
    from test_posterior import blur

    t = 200
    sigma = float(SCHEDULE.sigma[t] / SCHEDULE.sqrt_alpha_bar[t])
    candidates, y = candidates_and_observation(sigma)
    y32 = y.float()  # an observation in another dtype than the candidates
    plain = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y32[0], "expected-mse", sigma)  # no batch axis
    assert plain.samples is None and plain.quality is None
    assert plain.posterior_mean.dtype == torch.float64 and plain.posterior_mean.shape == (1, *SHAPE)
    drawn = rank_restorations(GAUSSIAN, SCHEDULE, candidates, y32, "expected-mse", sigma, samples=2,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    expected = posterior_samples(GAUSSIAN, SCHEDULE, y32.double(), sigma, 2, None, SHAPE, 50,
                                 torch.Generator().manual_seed(0))  # fmt: skip
    assert drawn.samples.dtype == torch.float64 and torch.equal(drawn.samples, expected)
    assert set(drawn.quality) == {"expected_mse", "expected_psnr", "expected_ssim"}
    blurred = rank_restorations(GAUSSIAN, SCHEDULE, candidates, blur(y), "expected-mse", sigma, blur, steps=2,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert blurred.samples.shape == (OPERATOR_SAMPLES, *SHAPE)
    torch.testing.assert_close(blurred.posterior_mean, blurred.samples.mean(0, keepdim=True), rtol=0, atol=0)


def test_prior_ranking_prefers_over_smoothed_candidates():
    candidates, y = candidates_and_observation(0.2)
    prior = rank_restorations(GAUSSIAN, SCHEDULE, candidates, criterion="prior")
    assert prior.order[0] == 6, "the candidate shrunk hardest towards the mean wins under the prior alone"
    assert rank_restorations(GAUSSIAN, SCHEDULE, candidates, y, "map", 0.2).order[0] != 6


def test_tied_scores_keep_the_input_order():
    """Candidates of equal score stay in their input order (a stable sort), also past 16 candidates."""
    candidates, _ = candidates_and_observation(0.2)
    pair = candidates[[0, 6]]  # the shrunk candidate 6 is the more likely under the prior
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, pair.repeat(10, 1, 1, 1), criterion="prior")
    assert ranking.order == [*range(1, 20, 2), *range(0, 20, 2)]


def test_noisy_level_is_the_exact_density_of_noisy_candidates():
    t = 200
    sigma = float(SCHEDULE.sigma[t] / SCHEDULE.sqrt_alpha_bar[t])
    candidates, _ = candidates_and_observation(sigma)
    ranking = rank_restorations(GAUSSIAN, SCHEDULE, candidates, criterion="noisy-level", sigma=sigma)
    torch.testing.assert_close(ranking.scores, gaussian_log_density(candidates, MU, S**2 + sigma**2))
    one = rank_restorations(GAUSSIAN, SCHEDULE, candidates[:1], criterion="noisy-level", sigma=sigma)
    torch.testing.assert_close(one.scores, ranking.scores[:1])


def test_observation_likelihood_with_a_linear_operator():
    x = torch.randn(3, 1, 4, 4, **F64)
    y = torch.randn(1, 1, 2, 2, **F64)
    pool = torch.nn.AvgPool2d(2)
    expected = -((y - pool(x)) ** 2).flatten(1).sum(1) / (2 * 0.1**2) - 2 * math.log(2 * math.pi * 0.1**2)
    torch.testing.assert_close(log_observation_likelihood(x, y, 0.1, pool), expected)


def test_bad_arguments_are_named():
    x = torch.zeros(2, *SHAPE, **F64)
    with pytest.raises(ValueError, match="unknown criterion 'psnr'"):
        rank_restorations(GAUSSIAN, SCHEDULE, x, criterion="psnr")
    for criterion in ("map", "expected-mse", "candidate-posterior"):
        with pytest.raises(ValueError, match="needs the observed"):
            rank_restorations(GAUSSIAN, SCHEDULE, x, criterion=criterion, sigma=0.1)
    for sigma in (None, 0.0):
        with pytest.raises(ValueError, match="criterion 'map' needs a positive noise std sigma"):
            rank_restorations(GAUSSIAN, SCHEDULE, x, x[0], criterion="map", sigma=sigma)
    with pytest.raises(ValueError, match="criterion 'noisy-level' needs a positive noise std sigma"):
        rank_restorations(GAUSSIAN, SCHEDULE, x, criterion="noisy-level", sigma=0.0)
    for beta in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="prior weight must be a finite number >= 0"):
            rank_restorations(GAUSSIAN, SCHEDULE, x, x[0], criterion="map", sigma=0.1, prior_weight=beta)


def write_slice(image, folder):
    from cdm_ood.data.volume_files import write_dicom_series

    write_dicom_series(image[None].round(), folder, modality="ct", volume_index=0)
    return folder / "slice_000.dcm"


def test_cli_ranks_dicom_and_png_files_and_names_mismatches(checkpoint, tmp_path):
    import csv

    import numpy as np
    from PIL import Image
    from test_score import invoke

    from cdm_ood.data.phantoms import phantom_volume

    rng = np.random.default_rng(0)
    clean = phantom_volume(rng, size=16, slices=1)[0]
    observed = write_slice(clean + rng.normal(0, 100, clean.shape), tmp_path / "obs")
    good = write_slice(clean, tmp_path / "clean")
    noisy = write_slice(clean + rng.normal(0, 300, clean.shape), tmp_path / "noisy")
    out = invoke("rank-restorations", good, noisy, "--observed", observed, "--checkpoint", checkpoint,
                 "--sigma", 0.1, "--generate", 2, "--steps", 3, "--out", tmp_path / "ranking.csv")  # fmt: skip
    assert out.exit_code == 0, out.output
    with open(tmp_path / "ranking.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4] and {r["criterion"] for r in rows} == {"expected-mse"}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r["candidate"] for r in rows} >= {str(good), str(noisy)}
    assert (tmp_path / "ranking_generated" / "case_generated_1.png").exists()
    by_name = {r["candidate"]: float(r["score"]) for r in rows}
    assert by_name[str(good)] > by_name[str(noisy)], "the clean slice beats one with 3x the observation's noise"
    on_set = invoke("rank-restorations", good, noisy, observed, "--observed", observed, "--checkpoint", checkpoint,
                    "--sigma", 0.1, "--criterion", "candidate-posterior", "--out", tmp_path / "set.csv")  # fmt: skip
    assert on_set.exit_code == 0, on_set.output
    with open(tmp_path / "set.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert abs(sum(float(r["posterior_weight"]) for r in rows) - 1) < 1e-9
    assert all(abs(float(r["score"]) + float(r["expected_mse"])) < 1e-9 for r in rows)
    assert [r["candidate"] for r in rows].index(str(good)) < [r["candidate"] for r in rows].index(str(noisy))

    for name, value in (("a.png", 10), ("b.png", 200)):
        Image.fromarray(np.full((16, 16), value, np.uint8) + rng.integers(0, 20, (16, 16)).astype(np.uint8)).save(
            tmp_path / name
        )
    png = invoke("rank-restorations", tmp_path / "a.png", tmp_path / "b.png", "--checkpoint", checkpoint,
                 "--criterion", "prior", "--out", tmp_path / "png.csv")  # fmt: skip
    assert png.exit_code == 0, png.output
    mixed = invoke("rank-restorations", good, tmp_path / "a.png", "--checkpoint", checkpoint, "--criterion", "prior")
    assert mixed.exit_code == 2 and "format" in mixed.stderr and "a.png" in mixed.stderr
    Image.fromarray(rng.integers(0, 50, (8, 16)).astype(np.uint8)).save(tmp_path / "small.png")
    shape = invoke("rank-restorations", tmp_path / "a.png", tmp_path / "small.png", "--checkpoint", checkpoint,
                   "--criterion", "prior")  # fmt: skip
    assert shape.exit_code == 2 and "shape mismatch" in shape.stderr and "small.png" in shape.stderr


def test_cli_manifest_mode_ranks_many_cases_and_reports_a_bad_one(checkpoint, tmp_path):
    import numpy as np
    from test_score import invoke

    from cdm_ood.data.phantoms import phantom_volume

    rng = np.random.default_rng(1)
    lines = ["case,observed,candidates,sigma"]
    for case in range(3):
        clean = phantom_volume(rng, size=16, slices=1)[0]
        obs = write_slice(clean + rng.normal(0, 100, clean.shape), tmp_path / f"c{case}" / "obs")
        a = write_slice(clean, tmp_path / f"c{case}" / "a")
        b = write_slice(clean + rng.normal(0, 200, clean.shape), tmp_path / f"c{case}" / "b")
        lines.append(f"case{case},{obs.relative_to(tmp_path)},{a.relative_to(tmp_path)};{b.relative_to(tmp_path)},0.1")
    lines.append("broken,c0/obs/slice_000.dcm,missing.dcm,0.1")
    (tmp_path / "cases.csv").write_text("\n".join(lines) + "\n")
    out = invoke("rank-restorations", "--manifest", tmp_path / "cases.csv", "--checkpoint", checkpoint, "--out",
                 tmp_path / "all.csv")  # fmt: skip
    assert out.exit_code == 1, out.output
    text = (tmp_path / "all.csv").read_text()
    assert text.count("case0,") == 2 and text.count("case2,") == 2 and "missing.dcm" in text


def test_cli_ranks_under_downsampling_and_masking_with_the_posterior_mean_as_reference(checkpoint, tmp_path):
    """`--degradation down:<k>` takes a k times smaller observation, `mask:<file>` the observed pixels of a mask
    file; `--posterior-mean` writes E[x | y] and lists it as rank 0 with the expected PSNR / SSIM of every row."""
    import csv
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from test_score import invoke

    rng = np.random.default_rng(2)
    clean = np.clip(rng.normal(120, 30, (16, 16)), 0, 255)
    small = clean.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    paths = {}
    for name, image in (("clean", clean), ("noisy", clean + rng.normal(0, 60, clean.shape)), ("small", small),
                        ("flat", np.full((16, 16), clean.mean()) + rng.normal(0, 1, (16, 16)))):  # fmt: skip
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(paths[name])
    keep = (rng.random((16, 16)) > 0.3).astype(np.uint8) * 255
    Image.fromarray(keep).save(tmp_path / "mask.png")
    common = ["--checkpoint", checkpoint, "--sigma", 0.1, "--samples", 2, "--steps", 3]
    down = invoke("rank-restorations", paths["clean"], paths["noisy"], paths["flat"], "--observed", paths["small"],
                  "--degradation", "down:4", "--posterior-mean", "--criterion", "expected-mse", "--out",
                  tmp_path / "down.csv", *common)  # fmt: skip
    assert down.exit_code == 0, down.output
    with open(tmp_path / "down.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [0, 1, 2, 3] and {r["prior_weight"] for r in rows} == {""}
    assert rows[0]["candidate"].endswith("case_posterior_mean.npy") and Path(rows[0]["candidate"]).exists()
    assert all(float(r["expected_psnr"]) > 0 and -1 <= float(r["expected_ssim"]) <= 1 for r in rows)
    assert float(rows[0]["expected_mse"]) <= min(float(r["expected_mse"]) for r in rows[1:])
    mask = f"mask:{tmp_path / 'mask.png'}"
    masked = invoke("rank-restorations", paths["clean"], paths["noisy"], "--observed", paths["noisy"],
                    "--degradation", mask, "--out", tmp_path / "mask.csv", *common)  # fmt: skip
    assert masked.exit_code == 0, masked.output
    with open(tmp_path / "mask.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["criterion"] for r in rows} == {"candidate-posterior"}, "auto under an operator"
    assert abs(sum(float(r["posterior_weight"]) for r in rows) - 1) < 1e-9
    assert {float(r["prior_weight"]) for r in rows} == {PRIOR_WEIGHT}, "the CSV records the default weight"
    tempered = torch.tensor([PRIOR_WEIGHT * float(r["log_prior"]) + float(r["log_observation"]) for r in rows], **F64)
    weights = torch.tensor([float(r["posterior_weight"]) for r in rows], **F64)
    torch.testing.assert_close(weights, torch.softmax(tempered, 0), rtol=0, atol=1e-9)
    observation_only = invoke("rank-restorations", paths["clean"], paths["noisy"], "--observed", paths["noisy"],
                              "--degradation", mask, "--prior-weight", 0, "--out", tmp_path / "beta0.csv",
                              *common)  # fmt: skip
    assert observation_only.exit_code == 0, observation_only.output
    with open(tmp_path / "beta0.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {float(r["prior_weight"]) for r in rows} == {0.0}
    log_obs = torch.tensor([float(r["log_observation"]) for r in rows], dtype=torch.float64)
    weights = torch.tensor([float(r["posterior_weight"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(weights, torch.softmax(log_obs, 0), msg="--prior-weight 0: p(y | c) alone")
    negative = invoke("rank-restorations", paths["clean"], "--observed", paths["noisy"], "--degradation", mask,
                      "--prior-weight", -1, *common)  # fmt: skip
    assert negative.exit_code == 2 and "--prior-weight" in negative.stderr
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case,observed,candidates\nc,{paths['noisy']},{paths['clean']}\n")
    for beta in ("nan", "inf"):  # a usage error (exit 2) on the manifest path too, not one error row per case
        bad = invoke("rank-restorations", "--manifest", manifest, "--degradation", mask, "--prior-weight", beta,
                     "--out", tmp_path / "bad.csv", *common)  # fmt: skip
        assert bad.exit_code == 2 and "--prior-weight" in bad.stderr, bad.output
        assert not (tmp_path / "bad.csv").exists()
    auto_mean = invoke("rank-restorations", paths["clean"], "--observed", paths["small"], "--degradation", "down:4",
                       "--posterior-mean", *common)  # fmt: skip
    assert auto_mean.exit_code == 2 and "'auto' is expected-mse only" in auto_mean.stderr
    wrong = invoke("rank-restorations", paths["clean"], "--observed", paths["clean"], "--degradation", "down:4",
                   *common)  # fmt: skip
    assert wrong.exit_code == 2 and "downsampled" in wrong.stderr and "clean.png" in wrong.stderr
    bad = invoke("rank-restorations", paths["clean"], "--observed", paths["noisy"], "--degradation", "down:x",
                 *common)  # fmt: skip
    assert bad.exit_code == 2 and "down:<factor>" in bad.stderr
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((16, 16, 1), np.nan, np.float32), np.eye(4)), tmp_path / "nan_mask.nii.gz")
    nan = invoke("rank-restorations", paths["clean"], "--observed", paths["noisy"], "--degradation",
                 f"mask:{tmp_path / 'nan_mask.nii.gz'}", *common)  # fmt: skip
    assert nan.exit_code == 2 and "nan_mask.nii.gz" in nan.stderr and "nan-or-inf" in nan.stderr
