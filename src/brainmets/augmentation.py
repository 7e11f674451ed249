"""Training-time augmentation with albumentations: one call moves image and mask together.

Rotation and zoom (one affine, nearest-neighbour for the mask so it stays binary), horizontal and
vertical flips, optionally a missing sequence (FLAIR standing in for a T1 channel), then the training crop.
Validation, test and serving never augment.
"""

from __future__ import annotations

import albumentations as A
import cv2

from brainmets.config import TrainConfig


class SeededCompose(A.Compose):
    """All steps draw from the pipeline's one seeded stream.

    albumentations 2.0 seeds each step with the same seed, so steps with equal `p` fire together (both
    flips or neither: a flip along one axis alone never happens) and their parameters are correlated.
    """

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        self.set_random_state(self.random_generator, self.py_random)


class MissingSequence(A.ImageOnlyTransform):
    """A study without its pre-contrast T1, its post-contrast T1 or both: FLAIR (channel 1) stands in their
    channels, as the dataset itself does for a sequence that was not acquired. Works on the CLAHE-enhanced
    slice, which is the same as enhancing the filled slice, since CLAHE works channel by channel."""

    FILLS = ((0,), (2,), (0, 2))

    def get_params(self) -> dict:
        return {"channels": self.FILLS[self.py_random.randrange(len(self.FILLS))]}

    def apply(self, img, channels=(), **params):
        img = img.copy()
        for c in channels:
            img[..., c] = img[..., 1]
        return img


def train_transform(cfg: TrainConfig) -> A.Compose:
    steps = [
        A.Affine(rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=cfg.scale, interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, p=0.8),
        A.HorizontalFlip(p=cfg.flip_p),
        A.VerticalFlip(p=cfg.flip_p),
    ]
    if cfg.missing_sequence_p:
        steps.append(MissingSequence(p=cfg.missing_sequence_p))
    if cfg.crop_size is not None:
        size = cfg.crop_size
        # On a lesion slice, most crops contain lesion pixels; the rest are anywhere, so the net also
        # learns what healthy tissue next to nothing looks like. On an empty slice both are random.
        steps.append(A.OneOf([A.CropNonEmptyMaskIfExists(size, size, p=cfg.lesion_crop_prob),
                              A.RandomCrop(size, size, p=1 - cfg.lesion_crop_prob)], p=1.0))
    return SeededCompose(steps, seed=cfg.seed)
