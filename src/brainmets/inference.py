"""The inference engine: a loaded model that turns one slice of any accepted size into a lesion mask.

Exactly the training preprocessing (`preprocess`) at the model's input size; the probability map is
resized back to the input's size before thresholding, so the mask matches the image pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from brainmets.config import TrainConfig
from brainmets.preprocessing import preprocess
from brainmets.registry import resolve
from brainmets.training import load_checkpoint, model_from_checkpoint


@dataclass
class Prediction:
    probability: np.ndarray  # float32 (H, W) in [0, 1], the input's size
    mask: np.ndarray  # bool (H, W)


class Predictor:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, path: Path):
        self.model, self.cfg, self.path = model.eval(), cfg, path

    @classmethod
    def load(cls, name_or_path: str | Path) -> Predictor:
        path = resolve(name_or_path)
        model, cfg = model_from_checkpoint(load_checkpoint(path))
        return cls(model, cfg, path)

    @torch.no_grad()
    def probability(self, image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(preprocess(image, self.cfg.preprocess))[None]
        prob = torch.sigmoid(self.model(x))[0, 0].numpy()
        h, w = image.shape[:2]
        return prob if prob.shape == (h, w) else cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)

    def predict(self, image: np.ndarray) -> Prediction:
        prob = self.probability(image)
        return Prediction(prob, prob >= self.cfg.threshold)
