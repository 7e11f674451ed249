"""The inference engine: a model loaded once that turns slices and volumes of any size into lesion masks.

    Network    one trained model: preprocessed batches (B, 3, S, S) -> logits, with ONNX Runtime when an
               up-to-date `<checkpoint>.onnx` lies beside the checkpoint (`brainmets export`), else PyTorch
    Predictor  one network, or `ensemble` averaging both shipped ones; image -> probability, mask, lesions

Each slice goes through exactly the training preprocessing (`preprocess`, at the model's input size);
the probability map is resized back to the slice's own size before thresholding at the model's
threshold, so the mask matches the image pixel for pixel.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import onnxruntime as ort
import torch
from scipy.special import expit

from brainmets.config import TrainConfig
from brainmets.postprocessing import binarize
from brainmets.preprocessing import preprocess
from brainmets.readers import Volume, axial_slices, stack_axial
from brainmets.registry import SHIPPED, resolve
from brainmets.training import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "torch")
ENSEMBLE = "ensemble"
BATCH = 8  # slices per forward pass (x3 with TTA): fewer calls for volumes, ~50 MB of activations at 256²
ONNX_SHA_KEY = "checkpoint_sha256"  # ONNX metadata: the checkpoint the file was exported from


class InputError(ValueError):
    """The decoded image cannot be segmented (too small, NaN, wrong shape); the message says why."""


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def onnx_session(path: Path, threads: int = 0, spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with every graph optimisation (fusions, constant folding, layouts).

    `threads` 0 lets ORT use one per physical core. Without `spinning`, idle worker threads sleep
    instead of busy-waiting for the next op, leaving the cores to the server's event loop and decoding.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Network:
    """One trained model, loaded once: float32 (B, 3, S, S) in [0, 1] -> logits (B, 1, S, S)."""

    def __init__(self, cfg: TrainConfig, checkpoint: Path, forward: Callable[[np.ndarray], np.ndarray],
                 runtime: str):
        self.cfg, self.checkpoint, self.forward, self.runtime = cfg, checkpoint, forward, runtime

    @classmethod
    def load(cls, checkpoint: Path, runtime: str = "auto", threads: int = 0) -> Network:
        """`runtime`: 'onnxruntime' needs `<checkpoint>.onnx` exported from this very checkpoint; 'auto'
        uses it when it is there and falls back to PyTorch otherwise. `threads` 0: the runtime's default."""
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        checkpoint = Path(checkpoint)
        ckpt = load_checkpoint(checkpoint)
        onnx_path = checkpoint.with_suffix(".onnx")
        if runtime != "torch" and onnx_path.exists():
            session = onnx_session(onnx_path, threads)
            exported_from = session.get_modelmeta().custom_metadata_map.get(ONNX_SHA_KEY)
            if exported_from == file_sha256(checkpoint):
                cfg = TrainConfig.from_dict(ckpt["config"])
                return cls(cfg, checkpoint, lambda x: session.run(None, {"image": x})[0], "onnxruntime")
            if runtime == "onnxruntime":
                raise ValueError(f"{onnx_path} was not exported from {checkpoint}; run `brainmets export {checkpoint}`")
            log.warning("%s is stale (not exported from %s); using PyTorch", onnx_path, checkpoint)
        elif runtime == "onnxruntime":
            raise FileNotFoundError(f"no {onnx_path}; run `brainmets export {checkpoint}`")
        model, cfg = model_from_checkpoint(ckpt)
        if threads:
            torch.set_num_threads(threads)

        @torch.inference_mode()
        def forward(x: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(x)).numpy()

        return cls(cfg, checkpoint, forward, "torch")

    def warm_up(self) -> None:
        """One forward pass, so kernel selection and allocations are not paid by the first request."""
        size = self.cfg.preprocess.image_size
        self.forward(np.zeros((1, 3, size, size), np.float32))

    def probabilities(self, images: Sequence[np.ndarray], tta: bool = False) -> np.ndarray:
        """float32 (N, S, S) at the model's input size. `tta` averages the slice with its horizontal and
        vertical flips (the flips of the training augmentation), at 3x the cost."""
        out = []
        for start in range(0, len(images), BATCH):
            x = np.stack([self._preprocess(im) for im in images[start:start + BATCH]])
            if not tta:
                out.append(expit(self.forward(x)[:, 0]))
                continue
            n = len(x)
            p = expit(self.forward(np.concatenate([x, x[..., ::-1], x[..., ::-1, :]]))[:, 0])
            out.append((p[:n] + p[n:2 * n, :, ::-1] + p[2 * n:, ::-1, :]) / 3)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _preprocess(self, image: np.ndarray) -> np.ndarray:
        try:
            return preprocess(image, self.cfg.preprocess)
        except ValueError as e:
            raise InputError(str(e)) from e


@dataclass(frozen=True)
class Lesion:
    area_px: int
    area_mm2: float | None  # None when the pixel spacing is unknown
    centroid: tuple[float, float]  # (x, y) in pixels of the input image
    bbox: tuple[int, int, int, int]  # (x, y, width, height) in pixels
    mean_probability: float


def find_lesions(probability: np.ndarray, mask: np.ndarray,
                 spacing: tuple[float, float] | None = None) -> list[Lesion]:
    """Connected components of the mask (8-connected, as the evaluation counts lesions), largest first."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    sums = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=n)
    pixel_mm2 = spacing[0] * spacing[1] if spacing else None
    lesions = [
        Lesion(area_px=int(area), area_mm2=float(area * pixel_mm2) if pixel_mm2 else None,
               centroid=(float(centroids[i, 0]), float(centroids[i, 1])), bbox=(int(x), int(y), int(w), int(h)),
               mean_probability=float(sums[i] / area))
        for i, (x, y, w, h, area) in enumerate(stats) if i  # label 0 is the background
    ]
    return sorted(lesions, key=lambda les: -les.area_px)


@dataclass
class Prediction:
    probability: np.ndarray  # float32 (H, W) in [0, 1], the input's size
    mask: np.ndarray  # bool (H, W)
    lesions: list[Lesion]
    spacing: tuple[float, float] | None = None
    seconds: float = 0.0  # preprocessing, network and postprocessing

    @property
    def lesion_area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def lesion_area_mm2(self) -> float | None:
        return self.lesion_area_px * self.spacing[0] * self.spacing[1] if self.spacing else None

    def mask_png(self) -> bytes:
        """0/255 grayscale PNG of the input's size."""
        return encode_png(self.mask.astype(np.uint8) * 255)

    def probability_png(self) -> bytes:
        """The probability map scaled to 0..255, grayscale PNG of the input's size."""
        return encode_png(np.round(self.probability * 255).astype(np.uint8))


@dataclass
class VolumePrediction:
    mask: np.ndarray  # uint8 0/1, the volume's (X, Y, Z) in its own voxel order
    voxel_mm3: float
    affine: np.ndarray
    header: nib.Nifti1Header = field(repr=False)
    seconds: float = 0.0

    @property
    def lesion_voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def lesion_volume_mm3(self) -> float:
        return self.lesion_voxels * self.voxel_mm3

    def nifti_gz(self) -> bytes:
        """The mask as .nii.gz on the input's grid: same affine, qform and sform, spatial units."""
        image = nib.Nifti1Image(self.mask, self.affine)
        image.set_qform(self.header.get_qform(), int(self.header["qform_code"]))
        image.set_sform(self.header.get_sform(), int(self.header["sform_code"]))
        image.header.set_xyzt_units(*self.header.get_xyzt_units())
        return gzip.compress(image.to_bytes(), compresslevel=6)


def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {array.shape} {array.dtype} array as PNG")
    return buf.tobytes()


class Predictor:
    """One network, or several whose probabilities are averaged (thresholded at their mean threshold)."""

    def __init__(self, networks: Sequence[Network], name: str):
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        self.networks, self.name = list(networks), name
        self.threshold = float(np.mean([n.cfg.threshold for n in self.networks]))
        # The smallest lesion kept, in pixels of the networks' input (image_size²).
        self.min_area = float(np.mean([n.cfg.min_lesion_px for n in self.networks]))
        self.input_px = float(np.mean([n.cfg.preprocess.image_size ** 2 for n in self.networks]))

    @classmethod
    def load(cls, name_or_path: str | Path, runtime: str = "auto", threads: int = 0) -> Predictor:
        """`ensemble`, a shipped name (`unetpp`, `attention-unet`, `best`), a checkpoint or a run folder,
        all through `brainmets.registry.resolve`."""
        names = SHIPPED if str(name_or_path) == ENSEMBLE else (name_or_path,)
        return cls([Network.load(resolve(n), runtime, threads) for n in names], str(name_or_path))

    def probabilities(self, images: Sequence[np.ndarray], tta: bool = False) -> list[np.ndarray]:
        """float32 (H, W) per image, each at its own size, averaged over the networks."""
        total = [np.zeros(im.shape[:2], np.float32) for im in images]
        for net in self.networks:
            for acc, prob in zip(total, net.probabilities(images, tta)):
                acc += resize_probability(prob, acc.shape)
        return [acc / len(self.networks) for acc in total]

    def predict(self, image: np.ndarray, spacing: tuple[float, float] | None = None,
                tta: bool = False) -> Prediction:
        """One slice (H, W) or (H, W, C); `spacing` (mm between rows, between columns) adds mm² areas."""
        t0 = time.perf_counter()
        prob = self.probabilities([image], tta)[0]
        mask = self.binarize(prob)
        return Prediction(prob, mask, find_lesions(prob, mask, spacing), spacing, time.perf_counter() - t0)

    def binarize(self, prob: np.ndarray) -> np.ndarray:
        """The model's mask rule, with the smallest-lesion area scaled to this slice's size."""
        return binarize(prob, self.threshold, self.min_area * prob.size / self.input_px)

    def predict_volume(self, volume: Volume, tta: bool = False) -> VolumePrediction:
        """Slice by slice along the axis nearest the patient's inferior-superior axis, each slice shown to
        the network as the training slices were: radiological view, anterior up, patient's right on the left."""
        t0 = time.perf_counter()
        slices, _ = axial_slices(volume)
        masks = [self.binarize(p).astype(np.uint8) for p in self.probabilities(slices, tta)]
        mask = stack_axial(masks, volume)
        return VolumePrediction(mask, volume.voxel_mm3, volume.affine, volume.header, time.perf_counter() - t0)

    def predict_stack(self, slices: Sequence[np.ndarray], spacing: tuple[float, float, float] | None = None,
                      tta: bool = False) -> StackPrediction:
        """One study's slices in order, each (H, W) or (H, W, C), all the same size."""
        t0 = time.perf_counter()
        prob = np.stack(self.probabilities(slices, tta))
        mask = np.stack([self.binarize(p) for p in prob])
        return StackPrediction(prob, mask, time.perf_counter() - t0)


@dataclass
class StackPrediction:
    probability: np.ndarray  # float32 (N, H, W)
    mask: np.ndarray  # bool (N, H, W)
    seconds: float = 0.0


def resize_probability(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Back to the image's (H, W): area-averaged when shrinking, bilinear when growing, as `preprocess`."""
    if prob.shape == tuple(shape):
        return prob
    h, w = shape
    shrinking = max(prob.shape) > max(h, w)
    return cv2.resize(prob, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
