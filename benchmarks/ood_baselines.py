"""OOD detection: the CDM's one-pass likelihood detectors against the usual baselines, at the same budget.

    python benchmarks/ood_baselines.py [--dataset mnist,phantoms] [--steps 1000] [--images 200]
    python benchmarks/ood_baselines.py --steps 100000 --images 1000 --elbo-steps 1000 --recon-steps 100  # GPU
    python benchmarks/ood_baselines.py --dataset phantoms --development

In-distribution: the bundled MNIST digits, and 32x32 slices of generated CT phantoms (HU window [-1000, 1000]).
OOD sets are built from held-out in-distribution images: flips, inversion, lower contrast, Gaussian noise and
blur (MONAI transforms), scikit-learn's 8x8 digits upscaled, Fashion-MNIST-like textured silhouettes; for the
phantoms, the six MONAI-based scanner artifacts of `cdm_ood.data.phantoms` at their mild strength. Every OOD
image is re-quantised to the in-distribution grid (8 bits, or integer HU).

Models, all MONAI UNets with the same channels, Adam, warm-up, EMA, batch and number of steps:
- CDM, uniform schedule: every detector of `cdm_ood.ood.detectors` (likelihood profile, denoising errors, anomaly
  map, flip ratios, their combination), fitted on in-distribution validation images. On MNIST the CDM is
  class-conditional (label dropout 0.1 to its null label), which adds the generative classifier p(y | x).
- DDPM epsilon-network (`DiffusionModelUNet`, MONAI `DDPMScheduler`, linear betas, T = 1000):
  the variational bound of MONAI `DiffusionInferer.get_likelihood` over `--elbo-steps` evenly strided
  timesteps (all 1000 is the full bound); and reconstruction in the style of ddpm-ood (Graham et al. 2023):
  noise to several t, DDIM back to 0, per-t MSE and SSIM (MONAI) z-scored on validation images, averaged.
- Max-softmax of a MONAI `Classifier` trained on the digit labels (MNIST only).

Prints AUROC and FPR95 tables (markdown, the block `ood-baselines-<dataset>` of `tables.emit`) with each detector's
cost (network passes per image, a backward pass counted as two, and wall time); saves an AUROC heat map and the
OOD-set examples as PNGs, and logs everything to MLflow (experiment `cdm-ood-baselines`).

`--development` (phantoms) trains the CDM, draws every mild artifact on 4 phantom volumes of another seed (a
development set, never reported) and prints the AUROC of `drift` and `combined-drift` on each against those
volumes' clean slices for each candidate smoothing width of `drift`: the set on which `DriftDetector.smoothing` was
chosen (the best worst-case AUROC of `combined-drift`). Nothing else runs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.metrics import SSIMMetric
from monai.networks.nets import Classifier, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from monai.transforms import GaussianSmooth, RandGaussianNoise, Resize, SpatialPad
from monai.utils import convert_to_tensor
from quick_train import train_ema
from tables import emit

from cdm_ood import CDMClassifier, NoiseSchedule, cdm_loss
from cdm_ood.data.artifacts import ARTIFACTS, corrupt_volume
from cdm_ood.data.natural import bundled_mnist, sklearn_digits
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.presets import IntensityPreset, ct_preset, uint8_preset
from cdm_ood.diffusion.sampling import ddim_step, strided_levels
from cdm_ood.integrations.tracking import log_job_run
from cdm_ood.jobs.config import ScheduleConfig
from cdm_ood.ood.detectors import DETECTORS, Detector, DriftDetector, applicable, required_features
from cdm_ood.ood.features import batched_features, class_posterior
from cdm_ood.ood.metrics import ood_metrics
from cdm_ood.utils.figures import image_grid, plot_auroc_matrix, save_png
from cdm_ood.utils.io import atomic_write

# A scorer gives one score per image, or, when one computation gives several detectors' scores (the reconstruction
# errors), a dict of them by detector name; each such detector's cost is that one computation's.
Scorer = Callable[[torch.Tensor], np.ndarray | dict[str, np.ndarray]]
LABEL_DROPOUT = 0.1  # of the class-conditional CDM's labels to its null label, as `cdm-ood train` does
RECON_STARTS = (100, 200, 300, 400, 500)  # ddpm-ood's noise levels t (of T = 1000) to reconstruct from


@dataclass
class Benchmark:
    """In-distribution train / validation / test images in [-1, 1], OOD sets, and what the data allow."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    ood: dict[str, torch.Tensor]
    bit_depth: int
    seed: int  # of the data draws and of every model's training
    labels: tuple[torch.Tensor, torch.Tensor] | None = None  # of train and test
    test_volumes: tuple[np.ndarray, ...] = ()  # the test images as volumes in their own units, where there are any


def model_space(images: np.ndarray, preset: IntensityPreset) -> torch.Tensor:
    """Images in their own units mapped onto [-1, 1] by the intensity preset, as `cdm-ood train` maps them."""
    return convert_to_tensor(preset.transform()(images.astype(np.float32)), track_meta=False)


def quantise(x: torch.Tensor, bit_depth: int) -> torch.Tensor:
    """Values in [-1, 1] snapped to the 2^bit_depth - 1 steps of the in-distribution grid."""
    levels = 2**bit_depth - 1
    return torch.round((x.clamp(-1, 1) + 1) / 2 * levels) / levels * 2 - 1


def textures(n: int, size: int, seed: int) -> torch.Tensor:
    """Fashion-MNIST-like images: a filled silhouette (ellipse or box) on black, with a grating or checker texture."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        a, b = rng.uniform(0.4, 0.9, 2)
        mask = (u / a) ** 2 + (v / b) ** 2 <= 1 if rng.random() < 0.5 else (abs(u) <= a) & (abs(v) <= b)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 12)
        wave = np.sin(freq * (u * np.cos(angle) + v * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        texture = np.sign(wave * np.sin(freq * (v * np.cos(angle) - u * np.sin(angle)))) if rng.random() < 0.3 else wave
        out[i, 0] = np.where(mask, rng.uniform(0.1, 0.5) + rng.uniform(0.2, 0.5) * texture, -1.0)
    return torch.from_numpy(out)


def mnist_benchmark(n: int, n_val: int, seed: int) -> Benchmark:
    def images(split: str, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        samples = bundled_mnist(split)
        samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))[:k]]  # all classes
        x = model_space(np.stack([s["image"] for s in samples]), uint8_preset())
        return x, torch.tensor([int(s["label"]) for s in samples])

    (train, train_labels), (val, _), (test, test_labels) = images("train"), images("val", n_val), images("test", n)
    digits = model_space(np.stack([s["image"] for s in sklearn_digits("test")[:n]]), uint8_preset())
    upscale, pad = Resize((20, 20), mode="bilinear"), SpatialPad((28, 28), value=-1.0)
    noise = RandGaussianNoise(prob=1.0, std=0.2).set_random_state(seed)
    ood = {
        "hflip": test.flip(-1),
        "vflip": test.flip(-2),
        "invert": -test,
        "contrast x0.5": test * 0.5,
        "noise sd 0.2": torch.stack([torch.as_tensor(noise(x)) for x in test]),
        "blur sd 1": torch.stack([torch.as_tensor(GaussianSmooth(1.0)(x)) for x in test]),
        "sklearn digits": torch.stack([torch.as_tensor(pad(upscale(d))) for d in digits]),
        "textures": textures(n, 28, seed),
    }
    ood = {k: quantise(v.float(), 8) for k, v in ood.items()}
    return Benchmark("mnist", train, val, test, ood, bit_depth=8, seed=seed, labels=(train_labels, test_labels))


def phantom_slices(volumes: list[np.ndarray]) -> torch.Tensor:
    """The slices of CT phantom volumes in HU as one model-space batch (B, 1, H, W)."""
    return model_space(np.concatenate(volumes)[:, None], ct_preset())


def mild_artifacts(volumes: list[np.ndarray], seed: int) -> dict[str, torch.Tensor]:
    """Per artifact of `ARTIFACTS`, the slices of `volumes` with that artifact at its mild strength (volume i drawn
    with seed `seed + i`)."""
    return {artifact: phantom_slices([corrupt_volume(v, artifact, "mild", seed + i, "ct")[0]
                                      for i, v in enumerate(volumes)]) for artifact in ARTIFACTS}  # fmt: skip


def phantom_benchmark(volumes: tuple[int, int, int], seed: int, size: int = 32, slices: int = 16) -> Benchmark:
    """Clean volumes split into train / validation / test; OOD sets are the test volumes with one mild artifact."""
    rng = np.random.default_rng(seed)
    stacks = [[phantom_volume(rng, size, slices, "ct") for _ in range(k)] for k in volumes]
    train, val, test = (phantom_slices(s) for s in stacks)
    ood = {f"{artifact} (mild)": x for artifact, x in mild_artifacts(stacks[2], 1000 * seed).items()}
    return Benchmark("phantoms", train, val, test, ood, bit_depth=11, seed=seed, test_volumes=tuple(stacks[2]))


def unet_kwargs() -> dict:
    """The network of the default `mnist-cpu` and `phantoms-ct` configs."""
    return dict(spatial_dims=2, in_channels=1, channels=(16, 32, 32), attention_levels=(False, False, True),
                num_res_blocks=1, norm_num_groups=8, num_head_channels=16)  # fmt: skip


def train_benchmark_cdm(
    data: Benchmark, steps: int, batch: int, arch: str = "unet"
) -> tuple[torch.nn.Module, NoiseSchedule, int | None, float]:
    """The benchmark's CDM (uniform schedule, T = 1000, classifier architecture `arch`), class-conditional when the
    data have labels; returns the EMA model, its schedule, its number of classes (None: unconditional) and the
    training time in seconds."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(kind="uniform", T=1000))
    num_classes = None if data.labels is None else 10
    torch.manual_seed(data.seed)
    net = CDMClassifier(T=1000, num_classes=num_classes, arch=arch, **unet_kwargs())

    def loss(m: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        i = torch.randint(len(data.train), (batch,), generator=g)
        labels = None
        if num_classes is not None:
            labels = torch.where(torch.rand(batch, generator=g) < LABEL_DROPOUT, num_classes, data.labels[0][i])
        return cdm_loss(m, data.train[i], schedule, labels=labels, generator=g).loss

    model, seconds = train_ema(net, loss, steps, seed=data.seed)
    return model, schedule, num_classes, seconds


def cdm_scorers(
    data: Benchmark,
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    num_classes: int | None,
    names: tuple[str, ...] | None = None,
) -> tuple[dict[str, Scorer], dict[str, float]]:
    """The detectors `names` (default: every one that applies) of a CDM from `train_benchmark_cdm`, fitted on the
    validation images; with labels the CDM is class-conditional (label dropout 0.1 to its null label), so the same
    model also gives the label-free detectors (null label) and the generative classifier. Returns the scorers and
    each detector's cost in forward-pass equivalents per image."""
    num_dims = data.train[0].numel()

    def features(x: torch.Tensor, needs: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return batched_features(model, x.split(100), schedule, needs, num_classes)

    names = names or applicable(num_classes)
    fit = features(data.val, required_features(names, num_classes))
    scorers, costs = {}, {}
    for name in names:
        detector = DETECTORS[name](num_dims, data.bit_depth, num_classes).fit(fit)
        scorers[f"CDM {name}"] = functools.partial(_score, detector, features)
        costs[f"CDM {name}"] = detector.cost(2)
    return scorers, costs


def generative_accuracy(data: Benchmark, model: torch.nn.Module, schedule: NoiseSchedule, num_classes: int) -> float:
    """Test accuracy of the class-conditional CDM as a generative classifier: argmax_y p(y | x), Bayes' rule on
    log p_0(x | y) with a uniform prior (what the `classifier` detector's max-softmax statistic is taken from)."""
    class_ll = batched_features(model, data.test.split(100), schedule, ("class_ll",), num_classes)["class_ll"]
    return (class_posterior(class_ll).argmax(1) == data.labels[1]).double().mean().item()


def _score(detector: Detector, features: Callable, x: torch.Tensor) -> np.ndarray:
    return detector.score(features(x, detector.required())).numpy()


def choose_drift_smoothing(
    data: Benchmark, model: torch.nn.Module, schedule: NoiseSchedule, widths=(0.0, 1.0, 1.5, 2.0, 3.0)
) -> None:
    """Print the AUROC of `drift` and of `combined-drift` (fitted on the validation slices) on every mild artifact of 4
    development phantom volumes of another seed, against their clean slices, for each smoothing width of `drift`,
    and the width with the best worst-case AUROC of `combined-drift` (ties: the best mean)."""
    rng = np.random.default_rng(data.seed + 10_000)
    volumes = [phantom_volume(rng, 32, 16, "ct") for _ in range(4)]
    names = ("drift", "combined-drift")
    needs = required_features(names, None)

    def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return batched_features(model, x.split(100), schedule, needs)

    fit, clean = features(data.val), features(phantom_slices(volumes))
    found = {a: features(x) for a, x in mild_artifacts(volumes, 10_000 + 1000 * data.seed).items()}
    worst_combined = {}
    for width in widths:
        with mock.patch.object(DriftDetector, "smoothing", width):
            for name in names:
                detector = DETECTORS[name](data.train[0].numel(), data.bit_depth).fit(fit)
                aurocs = [ood_metrics(detector.score(clean).numpy(), detector.score(f).numpy())["auroc"]
                          for f in found.values()]  # fmt: skip
                shown = ", ".join(f"{a} {v:.3f}" for a, v in zip(found, aurocs, strict=True))
                print(f"{name}, smoothing {width} px: {shown}")
                if name == "combined-drift":
                    worst_combined[width] = (min(aurocs), float(np.mean(aurocs)))
    print(f"best worst-case combined-drift: {max(worst_combined, key=worst_combined.get)} px", flush=True)


def draw(data: torch.Tensor) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Batches of `n` random rows of `data`."""
    return lambda n, g: data[torch.randint(len(data), (n,), generator=g)]


def train_ddpm(data: Benchmark, steps: int, batch: int) -> tuple[torch.nn.Module, float]:
    """MONAI's DDPM UNet trained like the CDM (same architecture and budget) on `data.train`, and its seconds."""
    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=1000))
    sample = draw(data.train)

    def loss(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        x0 = sample(batch, g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return F.mse_loss(inferer(inputs=x0, diffusion_model=net, noise=noise, timesteps=t), noise)

    torch.manual_seed(data.seed)
    return train_ema(DiffusionModelUNet(out_channels=1, **unet_kwargs()), loss, steps, seed=data.seed)


def ddpm_scorers(
    data: Benchmark, steps: int, batch: int, elbo_steps: int, recon_steps: int
) -> tuple[dict[str, Scorer], float, dict[str, float]]:
    """MONAI DDPM trained like the CDM; its strided variational bound and ddpm-ood reconstruction errors, with their
    costs in UNet calls per image."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    unet, seconds = train_ddpm(data, steps, batch)
    levels = 2**data.bit_depth - 1
    scheduler.set_timesteps(elbo_steps)

    def elbo(x: torch.Tensor) -> np.ndarray:
        torch.manual_seed(0)
        with torch.no_grad():
            return torch.cat([
                inferer.get_likelihood(c, unet, scheduler, original_input_range=(0, levels),
                                       scaled_input_range=(-1, 1), verbose=False)
                for c in x.split(100)
            ]).numpy()  # fmt: skip

    recon = Reconstruction(unet, recon_steps)
    errors_val = recon.errors(data.val)
    names = ("DDPM reconstruction MSE", "DDPM reconstruction SSIM")

    def reconstruction(x: torch.Tensor) -> dict[str, np.ndarray]:
        errors = recon.errors(x)  # both errors of the same reconstructions
        return {name: recon.zscore(errors, errors_val, which) for which, name in enumerate(names)}

    costs = dict.fromkeys(names, float(recon.calls())) | {"DDPM bound (MONAI)": float(elbo_steps)}
    return {"DDPM bound (MONAI)": elbo, "DDPM reconstruction": reconstruction}, seconds, costs


class Reconstruction:
    """ddpm-ood: x_t from each start t, deterministic DDIM back to 0 over `steps` strided levels of 1000 (MONAI's
    t = cdm_ood's t - 1 on the same linear schedule); per-t errors (B, 2, len(RECON_STARTS)): MSE and 1 - SSIM."""

    def __init__(self, unet: torch.nn.Module, steps: int) -> None:
        self.unet, self.schedule = unet, NoiseSchedule.linear(1000)
        self.grid = strided_levels(1000, steps)
        self.ssim = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=7, reduction="none")

    def levels(self, start: int) -> list[int]:
        return [start, *(t for t in self.grid if t < start), 0]

    def calls(self) -> int:
        """UNet calls per image: one per DDIM step, summed over the start levels (both errors share them)."""
        return sum(len(self.levels(start)) - 1 for start in RECON_STARTS)

    def _reconstruct(self, x0: torch.Tensor, start: int, g: torch.Generator) -> torch.Tensor:
        levels = self.levels(start)
        alpha, sigma = self.schedule.sqrt_alpha_bar[start].item(), self.schedule.sigma[start].item()
        x = alpha * x0 + sigma * torch.randn(x0.shape, generator=g)
        for t, s in itertools.pairwise(levels):
            x = ddim_step(x, self.unet(x, torch.full((len(x),), t - 1)), t, s, self.schedule, None)
        return x.clamp(-1, 1)

    def errors(self, x: torch.Tensor) -> np.ndarray:
        g = torch.Generator().manual_seed(0)
        out = []
        with torch.no_grad():
            for chunk in x.split(100):
                per_t = []
                for start in RECON_STARTS:
                    r = self._reconstruct(chunk, start, g)
                    mse = (r - chunk).square().flatten(1).mean(1)
                    per_t.append(torch.stack([mse, 1 - self.ssim(r, chunk).flatten(1).mean(1)], 1))
                out.append(torch.stack(per_t, 2))
        return torch.cat(out).numpy()

    def error_maps(self, x: torch.Tensor) -> np.ndarray:
        """Per-pixel squared reconstruction error (B, H, W), averaged over the start levels and channels: where the
        reconstructions (the same noise draws as `errors`) differ from the image."""
        g = torch.Generator().manual_seed(0)
        out = []
        with torch.no_grad():
            for chunk in x.split(100):
                squares = [(self._reconstruct(chunk, start, g) - chunk).square() for start in RECON_STARTS]
                out.append(torch.stack(squares).mean(0).mean(1))
        return torch.cat(out).numpy()

    @staticmethod
    def zscore(errors: np.ndarray, reference: np.ndarray, which: int) -> np.ndarray:
        """Mean over t of the errors standardised by the in-distribution validation errors at that t."""
        ref = reference[:, which]
        return ((errors[:, which] - ref.mean(0)) / ref.std(0).clip(1e-12)).mean(1)


def softmax_scorer(data: Benchmark, steps: int, batch: int) -> tuple[dict[str, Scorer], float, float]:
    """Negative max-softmax of a MONAI classifier trained on the labels (Hendrycks & Gimpel); also returns the
    training time and the classifier's accuracy on the in-distribution test images."""
    labels, test_labels = data.labels
    torch.manual_seed(data.seed)
    net = Classifier(in_shape=data.train.shape[1:], classes=10, channels=(16, 32, 32), strides=(2, 2, 2))

    def loss(m: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        i = torch.randint(len(data.train), (batch,), generator=g)
        return F.cross_entropy(m(data.train[i]), labels[i])

    model, seconds = train_ema(net, loss, steps, seed=data.seed)

    def score(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return -torch.cat([model(c).softmax(1).amax(1) for c in x.split(100)]).numpy()

    with torch.no_grad():
        accuracy = (model(data.test).argmax(1) == test_labels).double().mean().item()
    return {"max-softmax classifier": score}, seconds, accuracy


def by_detector(name: str, scores: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A scorer's result as {detector: scores}: one detector called `name`, or the several it named."""
    return scores if isinstance(scores, dict) else {name: scores}


def evaluate(data: Benchmark, scorers: dict[str, Scorer], costs: dict[str, float]) -> list[dict]:
    rows = []
    for name, score in scorers.items():
        start = time.perf_counter()
        id_scores = by_detector(name, score(data.test))
        ood_scores = {k: by_detector(name, score(v)) for k, v in data.ood.items()}
        n = len(data.test) + sum(len(v) for v in data.ood.values())
        ms = (time.perf_counter() - start) / n * 1e3
        for detector, found in id_scores.items():
            metrics = {k: ood_metrics(found, v[detector]) for k, v in ood_scores.items()}
            rows.append({"detector": detector, "ms_per_image": ms, "passes": costs[detector], "metrics": metrics})
            mean = np.mean([m["auroc"] for m in metrics.values()])
            print(f"  {detector:<28} mean AUROC {mean:.3f}  ({ms:.1f} ms / image)", flush=True)
    return rows


def table(rows: list[dict], metric: str) -> str:
    sets = list(rows[0]["metrics"])
    lines = [f"| detector | {' | '.join(sets)} | mean | passes / image | ms / image |", "|---" * (len(sets) + 4) + "|"]
    for r in rows:
        values = [r["metrics"][s][metric] for s in sets]
        cells = " | ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {r['detector']} | {cells} | {np.mean(values):.3f} | {r['passes']:g} | "
                     f"{r['ms_per_image']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def run(data: Benchmark, args: argparse.Namespace) -> tuple[list[dict], dict[str, float], list[Path]]:
    """Train every model, score every set; returns the metrics rows, facts (training seconds per model, the
    test accuracies of the classifier and of the CDM as a generative classifier) and the figures."""
    facts = {}
    print(f"{data.name}: training the CDM, {args.steps} steps", flush=True)
    model, schedule, num_classes, facts["train_seconds.cdm"] = train_benchmark_cdm(data, args.steps, args.batch)
    scorers, costs = cdm_scorers(data, model, schedule, num_classes)
    if num_classes is not None:
        facts["generative_accuracy"] = generative_accuracy(data, model, schedule, num_classes)
    print(f"{data.name}: training DDPM, {args.steps} steps", flush=True)
    found, facts["train_seconds.ddpm"], found_costs = ddpm_scorers(data, args.steps, args.batch, args.elbo_steps,
                                                                   args.recon_steps)  # fmt: skip
    scorers, costs = scorers | found, costs | found_costs
    if data.labels is not None:
        print(f"{data.name}: training the classifier, {args.steps} steps", flush=True)
        found, facts["train_seconds.classifier"], facts["classifier_accuracy"] = softmax_scorer(data, args.steps,
                                                                                                args.batch)  # fmt: skip
        scorers, costs = scorers | found, costs | dict.fromkeys(found, 1.0)
    print(f"{data.name}: scoring {len(data.test)} in-distribution images and {len(data.ood)} OOD sets", flush=True)
    rows = evaluate(data, scorers, costs)
    examples = torch.cat([data.test[:8], *(v[:8] for v in data.ood.values())])
    aurocs = {r["detector"]: {k: m["auroc"] for k, m in r["metrics"].items()} for r in rows}
    figures = [
        plot_auroc_matrix(aurocs, args.figures / f"ood-baselines-{data.name}.png", f"AUROC, {data.name}"),
        save_png(image_grid(examples, columns=8), args.figures / f"ood-sets-{data.name}.png"),
    ]
    return rows, facts, figures


def record(data: Benchmark, args: argparse.Namespace, rows: list[dict], facts: dict, figures: list[Path]) -> None:
    """The tables as markdown and JSON in --out, and (unless --no-tracking) one MLflow run with everything."""
    seconds = ", ".join(f"{k.split('.')[1]} {v:.0f} s" for k, v in facts.items() if k.startswith("train_seconds"))
    accuracy = "".join(
        f"; {what} test accuracy {facts[key]:.3f}"
        for key, what in (("classifier_accuracy", "classifier"), ("generative_accuracy", "CDM generative classifier"))
        if key in facts
    )
    header = (
        f"{data.name}: {len(data.train)} training images, {args.steps} steps of batch {args.batch} per model "
        f"(training: {seconds}){accuracy}; {len(data.test)} ID test images, OOD sets of "
        f"{', '.join(f'{k} {len(v)}' for k, v in data.ood.items())}; DDPM bound over {args.elbo_steps} timesteps, "
        f"reconstructions over {args.recon_steps} DDIM levels; seed {data.seed}; 2 CPU threads"
    )
    text = f"{header}\n\nAUROC:\n\n{table(rows, 'auroc')}\n\nFPR95:\n\n{table(rows, 'fpr95')}\n"
    emit(f"ood-baselines-{data.name}", text)
    args.out.mkdir(parents=True, exist_ok=True)
    files = [atomic_text(args.out / f"{data.name}.md", text),
             atomic_text(args.out / f"{data.name}.json", json.dumps(rows, indent=1)), *figures]  # fmt: skip
    if args.no_tracking:
        return
    metrics = dict(facts)
    for r in rows:
        for ood_set, m in r["metrics"].items():
            key = slug(f"{r['detector']}.{ood_set}")
            metrics |= {f"auroc.{key}": m["auroc"], f"fpr95.{key}": m["fpr95"]}
    params = {"dataset": data.name, "seed": data.seed, "steps": args.steps, "batch": args.batch,
              "test_images": len(data.test), "elbo_steps": args.elbo_steps,
              "recon_steps": args.recon_steps}  # fmt: skip
    log_job_run("baselines", params, metrics, files)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in text)


def atomic_text(path: Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return path


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the data, the training budget and the seed (shared with benchmarks/architectures.py)."""
    parser.add_argument("--dataset", default="mnist,phantoms", help="Comma-separated: mnist, phantoms.")
    parser.add_argument("--steps", type=int, default=1000, help="Training steps of every model.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=200, help="MNIST images per test set (ID and each OOD set).")
    parser.add_argument("--val-images", type=int, default=100, help="MNIST validation images (detector fitting).")
    parser.add_argument("--volumes", default="24,4,4", help="Phantom volumes (16 slices) for train,val,test.")
    parser.add_argument("--figures", type=Path, default=Path("docs/img"))
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data draws and of every model's training.")
    parser.add_argument("--no-tracking", action="store_true", help="Do not log the runs to MLflow.")


def benchmarks(args: argparse.Namespace) -> Iterator[Benchmark]:
    """The benchmarks that --dataset names, built one at a time (2 CPU threads from here on)."""
    torch.set_num_threads(2)
    builders = {
        "mnist": lambda: mnist_benchmark(args.images, args.val_images, args.seed),
        "phantoms": lambda: phantom_benchmark(tuple(int(v) for v in args.volumes.split(",")), args.seed),
    }
    for name in args.dataset.split(","):
        yield builders[name]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_benchmark_arguments(parser)
    parser.add_argument("--elbo-steps", type=int, default=50, help="Strided timesteps of the DDPM bound (full: 1000).")
    parser.add_argument("--recon-steps", type=int, default=50, help="DDIM levels of 1000 for reconstructions.")
    parser.add_argument("--out", type=Path, default=Path("runs/ood-baselines"), help="Tables (markdown, JSON).")
    parser.add_argument("--development", action="store_true",
                        help="Phantoms: choose drift's smoothing on a development set, then stop.")  # fmt: skip
    args = parser.parse_args()
    for data in benchmarks(args):
        if args.development:
            if data.name == "phantoms":
                print(f"{data.name}: training the CDM, {args.steps} steps", flush=True)
                choose_drift_smoothing(data, *train_benchmark_cdm(data, args.steps, args.batch)[:2])
            continue
        record(data, args, *run(data, args))


if __name__ == "__main__":
    main()
