"""A compact CNN for single-cell crops, trained with augmentation suited to stained smears.

Four stages of conv-BN-ReLU layers (``stage_depths`` convolutions each; all but the last stage
followed by 2x2 max pooling) turn an RGB crop into feature maps. The maps of the last
``feature_stages`` stages, each average-pooled to a ``feature_grid x feature_grid`` grid, scaled
to equal energy and stacked along channels, are what the HOSVD classifier sees.
A global-average-pool + linear "softmax head" is trained with the features and serves as the
CNN's own baseline; when classes hold labelled sub-classes it has one output per sub-class and
a class's probability is the sum of its sub-classes'. Training runs in channels-last layout
and, where the processor has native bfloat16 matrix units (or on a GPU), under bfloat16
autocast; feature extraction is float32, with each batch norm folded into its convolution.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from leuk_fhir.model.checkpoint import TrainingCheckpoint
from leuk_fhir.model.machine import native_bfloat16_cpu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CNNConfig:
    """Architecture of :class:`CellCNN`."""

    n_classes: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    #: convolutions per stage; model files written before this field existed hold one each.
    stage_depths: tuple[int, ...] = (1, 2, 2, 2)
    feature_grid: int = 4
    dropout: float = 0.2
    #: how many of the last stages feed the feature maps (their maps pooled to the grid and
    #: stacked along channels); model files written before this field existed use the last one.
    feature_stages: int = 1
    #: class of each softmax-head output when the head is trained on labelled sub-classes;
    #: empty: one output per class (and model files written before sub-classes existed)
    subclass_parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.subclass_parents and sorted(set(self.subclass_parents)) != list(
            range(self.n_classes)
        ):
            raise ValueError(
                f"subclass_parents {list(self.subclass_parents)} must name each of the "
                f"{self.n_classes} classes at least once"
            )
        if len(self.stage_depths) != len(self.widths) or min(self.stage_depths) < 1:
            raise ValueError(
                f"stage_depths {self.stage_depths} must give at least one convolution for each "
                f"of the {len(self.widths)} stages"
            )
        if not 1 <= self.feature_stages <= len(self.widths):
            raise ValueError(
                f"feature_stages must be between 1 and the {len(self.widths)} stages, "
                f"not {self.feature_stages}"
            )

    @property
    def n_outputs(self) -> int:
        """Outputs of the softmax head: one per sub-class, or one per class."""
        return len(self.subclass_parents) or self.n_classes

    @property
    def feature_channels(self) -> int:
        """Channels of the stacked feature maps."""
        return sum(self.widths[-self.feature_stages :])


class CellCNN(nn.Module):
    """Compact CNN whose last feature maps feed the HOSVD classifier."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        previous = 3
        #: index in ``body`` just past each stage's last ReLU (where its maps are complete)
        self._stage_ends: list[int] = []
        for i, (width, depth) in enumerate(zip(config.widths, config.stage_depths, strict=True)):
            for _ in range(depth):
                layers += [
                    nn.Conv2d(previous, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                previous = width
            self._stage_ends.append(len(layers))
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(previous, config.n_outputs)
        self._groups = [
            [i for i, parent in enumerate(config.subclass_parents) if parent == c]
            for c in range(config.n_classes)
        ]
        if config.feature_stages > 1:
            # Scale of each stage's pooled maps, set from the training set after training
            # (:func:`calibrate_stage_scales`) so that no stage outweighs the others.
            self.register_buffer("stage_scales", torch.ones(config.feature_stages))

    def _stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Maps of the feature stages (unscaled, full size) and the last stage's maps."""
        first = len(self._stage_ends) - self.config.feature_stages
        kept: list[torch.Tensor] = []
        start = 0
        for stage, end in enumerate(self._stage_ends):
            x = self.body[start:end](x)
            if stage >= first:
                kept.append(x)
            start = end
        return kept, x

    def _pooled(self, kept: list[torch.Tensor]) -> torch.Tensor:
        grid = self.config.feature_grid
        pooled = [F.adaptive_avg_pool2d(maps, grid) for maps in kept]
        if len(pooled) == 1:
            return pooled[0]
        scales = self.get_buffer("stage_scales")
        return torch.cat([p * scales[i] for i, p in enumerate(pooled)], dim=1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, g, g) feature maps: the feature stages' maps pooled to the grid, stacked."""
        return self._pooled(self._stages(x)[0])

    def class_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Per-class logits from the head's outputs: with sub-classes, the log-sum-exp of each
        class's sub-class logits (so its softmax probability is the sum of theirs)."""
        if not self.config.subclass_parents:
            return outputs
        return torch.stack([torch.logsumexp(outputs[:, g], dim=1) for g in self._groups], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head outputs (per sub-class where there are sub-classes), as trained."""
        return self.head(self.dropout(self.body(x).mean(dim=(2, 3))))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps and per-class logits."""
        kept, last = self._stages(x)
        return self._pooled(kept), self.class_logits(self.head(last.mean(dim=(2, 3))))


def calibrate_stage_scales(model: CellCNN, maps: np.ndarray) -> np.ndarray:
    """Give each feature stage of ``model`` the same root-mean-square energy as the last one,
    measured on ``maps`` (training-set features extracted with unit scales); returns ``maps``
    rescaled accordingly. Without this a wide early stage would dominate the residuals."""
    if model.config.feature_stages == 1:
        return maps
    widths = model.config.widths[-model.config.feature_stages :]
    bounds = np.cumsum((0, *widths))
    energy = [
        float(np.sqrt(np.mean(np.sum(maps[:, a:b].astype(np.float64) ** 2, axis=(1, 2, 3)))))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    scales = np.array([energy[-1] / max(e, 1e-12) for e in energy], dtype=np.float32)
    buffer = model.get_buffer("stage_scales")
    buffer.copy_(torch.as_tensor(scales, device=buffer.device) * buffer)
    out = maps.copy()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out[:, a:b] *= scales[i]
    return out


def fuse_batch_norm(model: CellCNN) -> CellCNN:
    """An inference copy of ``model`` with every batch norm folded into the convolution before
    it (the same outputs to float rounding, about 30% faster on a CPU); ``model`` is untouched.
    The copy is for inference only: its batch-norm layers are gone."""
    fused = copy.deepcopy(model).eval()
    body = fused.body
    for i in range(len(body) - 1):
        conv, norm = body[i], body[i + 1]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            body[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
            body[i + 1] = nn.Identity()  # keeps the stage indices of ``_stage_ends``
    return fused


def has_batch_norm(model: CellCNN) -> bool:
    """True for a trainable CNN, False for a :func:`fuse_batch_norm` copy."""
    return any(isinstance(layer, nn.BatchNorm2d) for layer in model.body)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Training precision: ``auto`` is bfloat16 on a GPU that supports it or on a CPU with
    native bfloat16 units (AMX or AVX512-BF16: about 2x faster there), float32 elsewhere."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and native_bfloat16_cpu() else torch.float32


def to_tensor(
    batch: np.ndarray, mean: np.ndarray, std: np.ndarray, device: torch.device
) -> torch.Tensor:
    """(n, H, W, 3) uint8 to normalised (n, 3, H, W) float32 on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 255.0
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Augmentation:
    """How training crops are varied (``AUGMENTATIONS`` names the recipes).

    Always: flips, 90-degree rotations, shifts up to ``max_shift`` of the side (reflect-padded),
    brightness/contrast and per-channel stain jitter. What another microscope changes, where
    set: magnification (a zoom up to ``exp(+-scale)``), focus (a Gaussian blur up to ``blur``
    crop pixels on half of the crops) and stain strength and hue (optical density scaled by up
    to ``1 +- stain_od`` per colour channel).
    """

    max_shift: float = 0.08
    scale: float = 0.0
    blur: float = 0.0
    stain_od: float = 0.0


#: ``standard``: the default, chosen on PBC. ``scanner``: also another microscope's
#: magnification (+-18%), focus and stain (docs/model-measurements.md, "Robustness to another
#: microscope").
AUGMENTATIONS = {
    "standard": Augmentation(),
    "scanner": Augmentation(scale=0.18, blur=1.0, stain_od=0.15),
}


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each crop of (n, 3, H, W) ``x`` with its own ``sigma`` (n,) in pixels
    (0 leaves a crop as it is), separable, reflect-padded."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    safe = sigma.clamp(min=1e-3).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # one row per (crop, channel)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def augment(
    x: torch.Tensor, generator: torch.Generator, recipe: Augmentation = Augmentation()
) -> torch.Tensor:
    """Smear-suited augmentation of a (n, 3, H, W) batch in [0, 1] (see :class:`Augmentation`).
    The standard recipe draws the same random numbers whatever the optional parts are."""
    n, _, h, w = x.shape

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device)

    k = int(torch.randint(0, 4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    flip = rand(n) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    pad = int(round(recipe.max_shift * h))
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        x = padded[:, :, dy : dy + h, dx : dx + w]
    if recipe.scale:
        zoom = torch.exp((rand(n) * 2 - 1) * recipe.scale)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if recipe.blur:
        sigma = rand(n) * recipe.blur * (rand(n) < 0.5)
        x = _blur(x, sigma)
    if recipe.stain_od:
        gain = 1.0 + (rand(n, 3, 1, 1) * 2 - 1) * recipe.stain_od
        x = x.clamp(min=1.0 / 255.0) ** gain  # optical density -log(x) scaled by the gain
    brightness = 1.0 + (rand(n, 1, 1, 1) - 0.5) * 0.2
    contrast = 1.0 + (rand(n, 1, 1, 1) - 0.5) * 0.3
    stain = 1.0 + (rand(n, 3, 1, 1) - 0.5) * 0.12
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    return (x * brightness * stain).clamp(0.0, 1.0)


def loss_weights(y: np.ndarray, config: CNNConfig) -> np.ndarray:
    """Cross-entropy weight of each head output for training labels ``y`` (output indices).

    Classes are balanced, so a minority class (blasts) is not drowned out. With sub-classes
    every output weighs as its class: the kinds inside a class keep their own proportions
    (balancing kinds instead gave a kind of 7 images 40x the weight of a common one, and a
    class of four kinds four times the prior: measured on PBC, docs/model-measurements.md).
    """
    parents = np.asarray(config.subclass_parents or range(config.n_classes), dtype=np.int64)
    counts = np.bincount(parents[y], minlength=config.n_classes).astype(np.float64)
    class_weights = counts.sum() / (config.n_classes * np.maximum(counts, 1))
    return class_weights[parents]


@dataclass(frozen=True)
class TrainingHistory:
    epochs: int
    train_loss: tuple[float, ...]
    train_accuracy: tuple[float, ...]
    seconds: float
    #: arithmetic the CNN was trained in ("float32" or "bfloat16")
    precision: str = "float32"


def train_cnn(
    images: np.ndarray,
    y: np.ndarray,
    config: CNNConfig,
    mean: np.ndarray,
    std: np.ndarray,
    epochs: int,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
    learning_rate: float = 4e-3,
    weight_decay: float = 5e-4,
    progress: Callable[[int, float, float], None] | None = None,
    precision: str = "auto",
    augmentation: Augmentation = Augmentation(),
    checkpoint: TrainingCheckpoint | None = None,
) -> tuple[CellCNN, TrainingHistory]:
    """Train :class:`CellCNN` on (n, H, W, 3) uint8 images; deterministic for a seed on a given
    CPU (``precision`` as in :func:`resolve_precision`). ``y`` indexes the head's outputs:
    sub-classes where ``config.subclass_parents`` is set, else classes. With ``checkpoint`` the
    state is written there as epochs end and a usable one left by an earlier run of the same
    job is continued (:mod:`leuk_fhir.model.checkpoint`): the same CNN as without a stop;
    ``progress(epoch, loss, accuracy)`` is then called for the epochs trained now only."""
    import time

    start = time.perf_counter()
    dtype = resolve_precision(precision, device)
    steps_per_epoch = max(1, math.ceil(len(images) / batch_size))

    def fresh() -> tuple[CellCNN, torch.optim.Optimizer, Any, torch.Generator]:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = CellCNN(config).to(device).to(memory_format=torch.channels_last)
        optimiser = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser,
            max_lr=learning_rate,
            total_steps=max(1, epochs * steps_per_epoch),
            pct_start=0.25,
        )
        return model, optimiser, schedule, generator

    model, optimiser, schedule, generator = fresh()
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    weights = torch.as_tensor(loss_weights(y, config), dtype=torch.float32, device=device)
    targets_all = torch.as_tensor(y, dtype=torch.long)
    losses: list[float] = []
    accuracies: list[float] = []
    earlier_seconds = 0.0
    kept = checkpoint.load(epochs)[0] if checkpoint is not None else None
    if kept is not None:
        try:
            model.load_state_dict(kept["model"])
            optimiser.load_state_dict(kept["optimiser"])
            schedule.load_state_dict(kept["schedule"])
            generator.set_state(kept["generator"])
            torch.set_rng_state(kept["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in kept:
                torch.cuda.set_rng_state(kept["cuda_rng"], device)
            losses, accuracies = list(kept["losses"]), list(kept["accuracies"])
            earlier_seconds = float(kept["seconds"])
        except (RuntimeError, ValueError, KeyError, TypeError):  # shapes or kinds that don't fit
            model, optimiser, schedule, generator = fresh()
            losses, accuracies, earlier_seconds = [], [], 0.0
    last_write = -math.inf  # the first epoch is written, then every ``every_s`` and the last
    for epoch in range(len(losses), epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator).numpy()
        total, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if len(idx) < 2:
                continue
            x = torch.from_numpy(images[idx]).to(device).permute(0, 3, 1, 2).float() / 255.0
            x = augment(x, generator, augmentation)
            x = ((x - m) / s).contiguous(memory_format=torch.channels_last)
            target = targets_all[idx].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(x).float()
            loss = F.cross_entropy(logits, target, weight=weights, label_smoothing=0.05)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(idx)
        losses.append(total / max(seen, 1))
        accuracies.append(correct / max(seen, 1))
        if checkpoint is not None and (
            epoch + 1 == epochs or time.monotonic() - last_write >= checkpoint.every_s
        ):
            state = {
                "epoch": epoch + 1,
                "epochs": epochs,
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "losses": losses,
                "accuracies": accuracies,
                "seconds": earlier_seconds + time.perf_counter() - start,
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            try:
                checkpoint.save(state)
            except OSError as error:  # a full or read-only disk costs the resume, not the run
                log.warning(
                    "cannot write %s (%s); training goes on without it", checkpoint.path, error
                )
                checkpoint = None
            last_write = time.monotonic()
        if progress is not None:
            progress(epoch + 1, losses[-1], accuracies[-1])
    model.eval()
    return model, TrainingHistory(
        epochs,
        tuple(losses),
        tuple(accuracies),
        earlier_seconds + time.perf_counter() - start,
        str(dtype).removeprefix("torch."),
    )


@torch.no_grad()
def extract(
    model: CellCNN,
    images: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    device: torch.device,
    batch_size: int = 256,
    dihedral: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature maps (n, C, g, g) float32 and softmax-head probabilities (n, classes).

    With ``dihedral`` both are averaged over the 8 flips and 90-degree rotations of each crop
    (a cell has no preferred orientation); each transform's maps are turned back to the
    crop's own frame first, so the grid positions stay aligned. Runs a
    :func:`fuse_batch_norm` copy of ``model`` unless it is one already.
    """
    model = fuse_batch_norm(model) if has_batch_norm(model) else model.eval()
    feats: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    transforms = [(k, f) for k in range(4) for f in (False, True)] if dihedral else [(0, False)]
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], mean, std, device)
        maps_sum: torch.Tensor | None = None
        prob_sum: torch.Tensor | None = None
        with torch.inference_mode():
            for k, flip in transforms:
                xt = torch.rot90(x, k, dims=(2, 3))
                xt = xt.flip(3) if flip else xt
                maps, logits = model.features_and_logits(xt)
                maps = maps.flip(3) if flip else maps
                maps = torch.rot90(maps, -k, dims=(2, 3))
                prob = torch.softmax(logits, dim=1)
                maps_sum = maps if maps_sum is None else maps_sum + maps
                prob_sum = prob if prob_sum is None else prob_sum + prob
        assert maps_sum is not None and prob_sum is not None
        feats.append((maps_sum / len(transforms)).float().cpu().numpy())
        probs.append((prob_sum / len(transforms)).float().cpu().numpy())
    if not feats:
        n_cls = model.config.n_classes
        g = model.config.feature_grid
        return np.zeros((0, model.config.feature_channels, g, g), np.float32), np.zeros(
            (0, n_cls), np.float32
        )
    return np.concatenate(feats), np.concatenate(probs)
