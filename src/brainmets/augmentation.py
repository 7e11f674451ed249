"""Training-time augmentation with albumentations: one call moves image and mask together.

Rotation and zoom (one affine, nearest-neighbour for the mask so it stays binary), horizontal and
vertical flips, then the training crop. Validation, test and serving never augment.
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


def train_transform(cfg: TrainConfig) -> A.Compose:
    steps = [
        A.Affine(rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=cfg.scale, interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, p=0.8),
        A.HorizontalFlip(p=cfg.flip_p),
        A.VerticalFlip(p=cfg.flip_p),
    ]
    if cfg.crop_size is not None:
        size = cfg.crop_size
        # On a lesion slice, most crops contain lesion pixels; the rest are anywhere, so the net also
        # learns what healthy tissue next to nothing looks like. On an empty slice both are random.
        steps.append(A.OneOf([A.CropNonEmptyMaskIfExists(size, size, p=cfg.lesion_crop_prob),
                              A.RandomCrop(size, size, p=1 - cfg.lesion_crop_prob)], p=1.0))
    return SeededCompose(steps, seed=cfg.seed)
