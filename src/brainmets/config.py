"""Every setting of the pipeline, in one place.

`TrainConfig` is frozen, filled by the CLI, saved inside every checkpoint and beside every exported
model, so a model can always be rebuilt and fed exactly as it was trained.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NetworkSpec:
    """A network brainmets trains and ships. Its name is what the command line, the API, the page and
    `models/<name>/` use; every list of models derives from NETWORKS, so adding a network is one entry here
    and its builder in `brainmets.models.BUILDERS`."""

    name: str
    title: str  # on the page and in model cards
    monai_class: str  # the MONAI network it wraps, for model cards
    widths: tuple[int, ...]  # default widths per level
    fast: dict[str, Any] = field(default_factory=dict)  # the fast recipe's settings for this network


# The order is the ensemble's and the lists'. channels_last speeds AttentionUnet's steps up ~8% but slows
# U-Net++'s (instance norm) ~13% (benchmarks/training_speed.py).
NETWORKS = {n.name: n for n in (
    NetworkSpec("unetpp", "U-Net++", "BasicUNetPlusPlus", (16, 16, 32, 64, 128, 16), {"channels_last": False}),
    NetworkSpec("attention-unet", "Attention U-Net", "AttentionUnet", (16, 32, 64, 128, 256)),
)}
MODEL_NAMES = tuple(NETWORKS)
LESION_MODES = ("single", "multiple")


@dataclass(frozen=True)
class PostprocessConfig:
    """Probabilities -> mask, the one rule of evaluation and serving; every value is chosen on the validation
    patients at `brainmets ship` and saved in the model's config.

    A stack (a patient's slices, a volume, a study) is thresholded, then cut into 3-D connected components
    (26-connectivity); components under `min_lesion_voxels` go, and in `single` mode only the one with the
    largest summed probability stays (one lesion per patient, as in the reference data), while `multiple`
    keeps every survivor (metastases come several at a time). A lone slice has no 3-D context: components
    under `min_lesion_px` go. Sizes count pixels at the model's input size and scale with the input's area.
    """

    threshold: float = 0.5
    min_lesion_px: int = 0
    mode: str = "multiple"
    min_lesion_voxels: int = 0

    def __post_init__(self) -> None:
        if self.mode not in LESION_MODES:
            raise ValueError(f"unknown lesion mode {self.mode!r}; expected one of {', '.join(LESION_MODES)}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold {self.threshold}: expected a probability strictly between 0 and 1")


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 256  # every slice is resized to this square before CLAHE; the dataset is 256²
    clahe_clip: float = 2.0  # OpenCV's default of 40 barely limits contrast; 2.0 is the usual MRI choice
    clahe_tile: int = 8  # tiles per side: 32-px tiles on a 256² slice, about one lesion across


@dataclass(frozen=True)
class ModelConfig:
    name: str = "attention-unet"
    in_channels: int = 3  # pre-contrast, FLAIR, post-contrast
    out_channels: int = 1  # lesion logit
    # Widths per level. U-Net++ at MONAI's default (32..256) costs 10 s a training step on 2 cores;
    # half width keeps 0.6 M parameters and 3x the speed.
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    deep_supervision: bool = False  # U-Net++ only: loss on every nested decoder output

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; expected one of {', '.join(MODEL_NAMES)}")
        if self.deep_supervision and self.name != "unetpp":
            raise ValueError(f"deep supervision needs nested decoder outputs: unetpp only, not {self.name}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    recipe: str = "fast"
    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "constant" (seed) | "cosine" (to zero over the run)
    weight_decay: float = 0.0
    loss: str = "dice_bce"  # "bce" (seed) | "dice_bce"
    # Training on crops: both nets are fully convolutional, so they still infer on whole slices.
    crop_size: int | None = 128  # None trains on whole slices (seed)
    lesion_crop_prob: float = 0.6  # share of crops of a lesion slice centred on lesion pixels
    empty_fraction: float = 0.3  # share of lesion-free slices drawn each epoch (1.0 = all, seed)
    # Share of the run, at its end, trained as served: whole slices, every empty slice (0: crops throughout).
    whole_slice_phase: float = 0.0
    # Augmentation, image and mask together (training only).
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    flip_p: float = 0.5
    # Share of training slices whose T1 channels (one or both) are replaced by FLAIR, so a FLAIR-only study
    # still segments well: an Attention U-Net trained without it kept 0.42 of its 0.74 validation Dice on
    # FLAIR alone, the one trained with 0.3 kept 0.81 of 0.88 (docs/experiments.md).
    missing_sequence_p: float = 0.3
    bf16: bool = True  # autocast on CPU: avx512_bf16 makes a step ~1.8x faster
    channels_last: bool = True
    threads: int = 0  # torch threads; 0 leaves torch's default (all cores)
    num_workers: int = 0  # data loading workers; augmentation is ~1 ms a slice, the net is the cost
    seed: int = 0
    # A checkpoint whose weights start the run instead of random ones (fine-tuning: a shipped model on new
    # data, or on a new augmentation); the model card names it, since the run's minutes are on top of its.
    init_from: str | None = None
    init_sha256: str | None = None  # set by training: init_from's file as the run found it
    time_budget_min: float | None = None  # stop cleanly after this many minutes
    # The label values of a case layout's label files that form the lesion (`--labels`); None: every non-zero
    # label, the whole lesion with its oedema (the reference data's masks are binary). `evaluate` uses them.
    labels: tuple[int, ...] | None = None
    # Validate every n-th epoch (and the last): U-Net++'s validation of 9 patients' whole slices took about
    # half of each epoch of 1,208 crops in its shipped run, so validating every epoch halves the crops a time
    # budget buys (README, Training).
    val_every: int = 1
    # Post-processing (see PostprocessConfig; tuned on validation at ship time, defaults for training's own
    # validation).
    threshold: float = 0.5
    min_lesion_px: int = 0
    lesion_mode: str = "multiple"
    min_lesion_voxels: int = 0

    def __post_init__(self) -> None:
        # Both networks halve the side 4 times; another size fails deep inside the network instead.
        size = self.preprocess.image_size
        if size % 16:
            raise ValueError(f"image size {size} px: expected a multiple of 16")
        if not 0 <= self.empty_fraction <= 1:
            raise ValueError(f"empty-slice fraction {self.empty_fraction}: expected 0 to 1")
        if not 0 <= self.whole_slice_phase < 1:
            raise ValueError(f"whole-slice phase {self.whole_slice_phase}: expected a share of the run from 0 "
                             f"to below 1")
        if self.val_every < 1:
            raise ValueError(f"validate every {self.val_every} epochs: expected 1 or more")
        if self.crop_size is not None and not (0 < self.crop_size <= size and self.crop_size % 16 == 0):
            raise ValueError(f"crop {self.crop_size} px: expected a multiple of 16 no larger than the image "
                             f"size {size}, or whole slices (crop 0 on the command line)")

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def post(self) -> PostprocessConfig:
        return PostprocessConfig(self.threshold, self.min_lesion_px, self.lesion_mode, self.min_lesion_voxels)

    def with_post(self, post: PostprocessConfig) -> TrainConfig:
        return dataclasses.replace(self, threshold=post.threshold, min_lesion_px=post.min_lesion_px,
                                   lesion_mode=post.mode, min_lesion_voxels=post.min_lesion_voxels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        m = d.pop("model")
        model = ModelConfig(**{**m, "widths": tuple(m["widths"])})
        pre = PreprocessConfig(**d.pop("preprocess"))
        if d.get("scale") is not None:
            d["scale"] = tuple(d["scale"])
        if d.get("labels") is not None:
            d["labels"] = tuple(d["labels"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(model=model, preprocess=pre, **{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# The recipe of the project's seed, exactly: Adam, binary cross-entropy, 50 epochs, batch 8, lr 0.001,
# whole slices, every slice every epoch, constant learning rate, fp32.
SEED_RECIPE: dict[str, Any] = dict(
    epochs=50, batch_size=8, lr=1e-3, lr_schedule="constant", loss="bce",
    crop_size=None, empty_fraction=1.0, bf16=False, channels_last=False, missing_sequence_p=0.0,
)
# What measured better on 2 CPU cores (docs/results.md): crops with lesion oversampling, 30% of
# the empty slices, Dice+BCE, cosine schedule, bf16, FLAIR standing in for T1 channels in 30% of slices.
FAST_RECIPE: dict[str, Any] = {}
RECIPES = {"seed": SEED_RECIPE, "fast": FAST_RECIPE}


def make_config(model: str, recipe: str = "fast", widths: tuple[int, ...] | None = None,
                deep_supervision: bool = False, **overrides: Any) -> TrainConfig:
    """The recipe's settings, then every override that is not None."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_NAMES)}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    model_cfg = ModelConfig(name=model, widths=tuple(widths or NETWORKS[model].widths),
                            deep_supervision=deep_supervision)
    per_model = NETWORKS[model].fast if recipe == "fast" else {}
    settings = {**RECIPES[recipe], **per_model, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(model=model_cfg, recipe=recipe, **settings)
