"""The inference engine: a model loaded once that turns slices, stacks and volumes of any size into lesion masks.

    Network    one trained model: preprocessed batches (B, 3, S, S) -> logits. On the CPU, OpenVINO (f32 or
               bf16, whichever measured faster on this machine: `brainmets.precision`) or ONNX Runtime on the
               `<checkpoint>.onnx` exported from this very checkpoint (`brainmets export`), else PyTorch; on a
               CUDA GPU, PyTorch with bf16 autocast
    Predictor  one network, or `ensemble` averaging both shipped ones; image -> probability, mask, lesions

Each slice goes through exactly the training preprocessing (`preprocess`, at the model's input size), once
whatever the number of networks; the probability map is resized back to the slice's own size, then the
model's post-processing (`brainmets.postprocessing`) makes the mask: the 2-D rule for a lone slice, the 3-D
rule for a stack. `brainmets evaluate` and `ship` measure through this same engine.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import onnx
import torch
from scipy.special import expit

from brainmets.checkpoints import load_hashed_checkpoint, model_from_checkpoint
from brainmets.config import PostprocessConfig, TrainConfig
from brainmets.postprocessing import mask_slice, mask_stack
from brainmets.precision import (batch_speed, choose, choose_batch, recorded_agreement, requested_batch,
                                 requested_precision, speed)
from brainmets.preprocessing import preprocess
from brainmets.registry import model, tuned_post

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda")  # auto: a CUDA GPU where PyTorch sees one, else the CPU
DEVICE_ENV = "BRAINMETS_DEVICE"
# Images per forward pass where the runtime does not measure its own (ONNX Runtime, PyTorch): ~100 MB of
# activations at 256²; OpenVINO measures (`brainmets.precision.BATCH_SIZES`), $BRAINMETS_BATCH forces.
BATCH = 16
ONNX_SHA_KEY = "checkpoint_sha256"  # ONNX metadata: the checkpoint the file was exported from


class InputError(ValueError):
    """The decoded image cannot be segmented (too small, NaN, wrong shape); the message says why."""


def exported_from(onnx_path: Path) -> str | None:
    """The SHA-256 of the checkpoint an ONNX file was exported from (its metadata), None if unmarked."""
    meta = onnx.load_model(str(onnx_path), load_external_data=False).metadata_props
    return next((p.value for p in meta if p.key == ONNX_SHA_KEY), None)


def onnx_session(path: Path, threads: int = 0, spinning: bool = False):
    """An ONNX Runtime CPU session with every graph optimisation (fusions, constant folding, layouts).

    `threads` 0 lets ORT use one per physical core. Without `spinning`, idle worker threads sleep
    instead of busy-waiting for the next op, leaving the cores to the server's event loop and decoding.
    """
    import onnxruntime as ort  # the fallback runtime: not imported when OpenVINO serves

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pick_device(device: str | None = None, runtime: str = "auto") -> str:
    """'cpu' or 'cuda' for `device` (else $BRAINMETS_DEVICE, else auto). auto takes a CUDA GPU where PyTorch sees
    one and the runtime may be PyTorch; an unknown value, or cuda without a GPU, is an error at once."""
    device = device or os.environ.get(DEVICE_ENV) or "auto"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (--device or {DEVICE_ENV}); expected one of {', '.join(DEVICES)}")
    gpu = torch.cuda.is_available()
    if device == "cuda" and not gpu:
        raise ValueError(f"device cuda asked (--device or {DEVICE_ENV}), but PyTorch sees no CUDA GPU here; "
                         f"use cpu or auto")
    if device == "cuda" and runtime not in ("auto", "torch"):
        raise ValueError(f"runtime {runtime} runs on the CPU; on a GPU the engine runs PyTorch (runtime auto or torch)")
    return "cuda" if device == "cuda" or device == "auto" and gpu and runtime in ("auto", "torch") else "cpu"


def openvino_model(path: Path, size: int, sha256: str, threads: int = 0, precision: str = "auto",
                   agreement: float | None = None):
    """The ONNX file compiled by OpenVINO for the CPU: (compiled model, precision it runs, why that one).

    `auto` runs whichever of f32 and bf16 measured faster here (`brainmets.precision`): OpenVINO's own default
    is bf16 wherever the CPU has it, which measured 1.2-1.45x slower than f32 on one avx512_bf16 CPU and 1.66-1.84x
    faster on another. Compiled models are cached under `$BRAINMETS_CACHE/openvino`, so a second start skips
    compilation, and the measurement is cached beside them."""
    import openvino as ov

    from brainmets.cache import cache_root

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(cache_root() / "openvino")})
    compiled: dict[str, object] = {}

    def compile_as(hint: str):
        if hint not in compiled:
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled[hint] = core.compile_model(str(path), "CPU", config)
        return compiled[hint]

    cpu_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    choice = choose(precision, agreement, cpu_bf16, lambda: speed(
        sha256, threads, lambda: {p: openvino_forward(compile_as(p)) for p in ("f32", "bf16")}, size))
    model = compile_as(choice.precision)
    return model, model.get_property("INFERENCE_PRECISION_HINT").get_type_name(), choice.reason


# OpenVINO 2026.4 can deadlock when two threads infer at once, each with its own request: the API's start-up
# warm-up and its first request hung that way for good (a thread dump showed both inside InferRequest.infer,
# copying their input), so the process runs one OpenVINO inference at a time; the served default of one
# inference worker already did, but for that race.
_OPENVINO_INFER = threading.Lock()


def openvino_forward(compiled) -> Callable[[np.ndarray], np.ndarray]:
    request = compiled.create_infer_request()

    def forward(x: np.ndarray) -> np.ndarray:
        with _OPENVINO_INFER:
            return request.infer({0: x})[0]  # a copy (share_outputs is off): safe once the lock is freed

    return forward


def torch_forward(model: torch.nn.Module, device: str, bf16: bool) -> Callable[[np.ndarray], np.ndarray]:
    model = model.to(device).eval()

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return forward


class Network:
    """One trained model, loaded once: float32 (B, 3, S, S) in [0, 1] -> logits (B, 1, S, S)."""

    def __init__(self, cfg: TrainConfig, checkpoint: Path, forward: Callable[[np.ndarray], np.ndarray],
                 runtime: str, precision: str = "f32", precision_reason: str = "the runtime runs f32",
                 sha256: str = "", batch: tuple[int, str] | None = None):
        self.cfg, self.checkpoint, self.forward = cfg, checkpoint, forward
        self.runtime, self.precision, self.precision_reason = runtime, precision, precision_reason
        self.sha256 = sha256  # of the checkpoint bytes loaded: what `brainmets.provenance` names the weights by
        # images per forward pass, and why: measured (OpenVINO), else $BRAINMETS_BATCH, else BATCH
        self.batch, self.batch_reason = batch or choose_batch(requested_batch(), BATCH)

    @property
    def summary(self) -> str:
        """What runs and why, in a few words: 'openvino bf16 (measured: bf16 1.70x faster than f32 on ...)'."""
        return f"{self.runtime} {self.precision} ({self.precision_reason}), batch {self.batch} ({self.batch_reason})"

    @classmethod
    def load(cls, checkpoint: Path, runtime: str = "auto", threads: int = 0, precision: str | None = None,
             device: str | None = None) -> Network:
        """`runtime`: 'openvino' and 'onnxruntime' need `<checkpoint>.onnx` exported from this very checkpoint;
        'auto' is OpenVINO when it is there and PyTorch otherwise. `threads` 0: the runtime's default.
        `precision` (None: $BRAINMETS_PRECISION, else auto) applies to OpenVINO and to a GPU's autocast; ONNX
        Runtime and PyTorch on the CPU run float32. `device` (None: $BRAINMETS_DEVICE, else auto): `pick_device`;
        on a GPU the runtime is reported as 'torch-cuda'."""
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        precision, device = requested_precision(precision), pick_device(device, runtime)
        checkpoint = Path(checkpoint)
        ckpt, sha256 = load_hashed_checkpoint(checkpoint)
        cfg = TrainConfig.from_dict(ckpt["config"])
        onnx_path = checkpoint.with_suffix(".onnx")
        if device == "cuda":
            model, cfg = model_from_checkpoint(ckpt)
            choice = choose(precision, recorded_agreement(checkpoint, sha256), bf16=True)
            return cls(cfg, checkpoint, torch_forward(model, device, choice.precision == "bf16"), "torch-cuda",
                       choice.precision, f"{choice.reason}, on {torch.cuda.get_device_name()}", sha256)
        if runtime != "torch":
            if not onnx_path.exists():
                if runtime != "auto":
                    raise FileNotFoundError(f"no {onnx_path}; run `brainmets export {checkpoint}`")
            elif exported_from(onnx_path) != sha256:
                if runtime != "auto":
                    raise ValueError(f"{onnx_path} was not exported from {checkpoint}; "
                                     f"run `brainmets export {checkpoint}`")
                log.warning("%s is stale (not exported from %s); using PyTorch", onnx_path, checkpoint)
            elif runtime == "onnxruntime":
                session = onnx_session(onnx_path, threads)
                return cls(cfg, checkpoint, lambda x: session.run(None, {"image": x})[0], "onnxruntime",
                           precision_reason="ONNX Runtime runs f32", sha256=sha256)
            else:
                compiled, used, reason = openvino_model(onnx_path, cfg.preprocess.image_size, sha256, threads,
                                                        precision, recorded_agreement(checkpoint, sha256))
                forward = openvino_forward(compiled)
                batch = choose_batch(requested_batch(), BATCH, lambda: batch_speed(
                    sha256, threads, used, forward, cfg.preprocess.image_size))
                return cls(cfg, checkpoint, forward, "openvino", used, reason, sha256, batch)
        model, cfg = model_from_checkpoint(ckpt)
        if threads:
            torch.set_num_threads(threads)
        return cls(cfg, checkpoint, torch_forward(model, "cpu", bf16=False), "torch",
                   precision_reason="PyTorch on the CPU runs f32", sha256=sha256)

    def warm_up(self) -> None:
        """One forward pass, so kernel selection and allocations are not paid by the first request."""
        size = self.cfg.preprocess.image_size
        self.forward(np.zeros((1, 3, size, size), np.float32))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """`forward` on any number of images, `batch` at a time."""
        if len(x) <= self.batch:
            return self.forward(x)
        return np.concatenate([self.forward(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])


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
    # OpenCV's default is already its fastest: zlib level 1 with the RLE strategy. Asking for a level (1 or 3)
    # switches to zlib's default strategy and measured 2-3x slower on a 256² probability map (0.66 ms against
    # 1.3 / 2.1 ms, OpenCV 4.14), for a file 15-20% smaller.
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {array.shape} {array.dtype} array as PNG")
    return buf.tobytes()


@dataclass
class StackPrediction:
    """A patient's slices (or a volume's axial slices) segmented together, in their order."""

    probability: np.ndarray  # float32 (N, H, W) in [0, 1]
    mask: np.ndarray  # bool (N, H, W), after the model's 3-D post-processing
    seconds: float = 0.0


class Predictor:
    """One network, or several whose probabilities are averaged, with the post-processing that goes with them:
    a network's own (its config), or for the ensemble the rule tuned for it (`models/ensemble/`)."""

    def __init__(self, networks: Sequence[Network], name: str, post: PostprocessConfig | None = None):
        if not networks:
            raise ValueError("a Predictor needs at least one network")
        sizes = {n.cfg.preprocess for n in networks}
        if len(sizes) > 1:
            raise ValueError(f"networks preprocess differently ({sizes}); an ensemble needs one preprocessing")
        self.networks, self.name = list(networks), name
        self.preprocess_cfg = networks[0].cfg.preprocess
        self.post = post or (networks[0].cfg.post if len(networks) == 1 else mean_post([n.cfg.post for n in networks]))

    @classmethod
    def load(cls, name_or_path: str | Path, runtime: str = "auto", threads: int = 0,
             precision: str | Sequence[str] | None = None, lesion_mode: str | None = None,
             device: str | None = None) -> Predictor:
        """`ensemble`, a shipped name (`unetpp`, `attention-unet`, `best`), a checkpoint or a run folder,
        all through `brainmets.registry.model`. `precision`: one for every network, or one per network (batch
        workers run what the driver chose). `lesion_mode` ('single' or 'multiple') overrides the model's own, with
        the settings validation chose for that mode where they are known."""
        found = model(name_or_path)
        precisions = [precision] * len(found.checkpoints) if precision is None or isinstance(precision, str) \
            else list(precision)
        predictor = cls([Network.load(path, runtime, threads, p, device)
                         for path, p in zip(found.checkpoints, precisions, strict=True)], found.name, found.post)
        predictor.use_lesion_mode(lesion_mode)
        return predictor

    def use_lesion_mode(self, mode: str | None) -> None:
        """Another lesion mode than the model's own, with the settings validation chose for it where known."""
        if mode and mode != self.post.mode:
            self.post = tuned_post(self.name, mode) or dataclasses.replace(self.post, mode=mode)

    @property
    def input_px(self) -> int:
        return self.preprocess_cfg.image_size ** 2

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 (N, 3, S, S): exactly the training preprocessing, done once for all the networks."""
        try:
            return np.stack([preprocess(im, self.preprocess_cfg) for im in images])
        except ValueError as e:
            raise InputError(str(e)) from e

    @property
    def summary(self) -> str:
        """Which runtime, precision and batch each network runs, and why: said before the work starts."""
        return "; ".join(net.summary for net in self.networks)

    @property
    def chunk(self) -> int:
        """Slices preprocessed and inferred together: the networks' largest batch; each network splits a chunk
        (three times as many images with TTA) into its own batches."""
        return max(net.batch for net in self.networks)

    def model_probabilities(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        """float32 (N, S, S) for preprocessed (N, 3, S, S), averaged over the networks. `tta` averages each
        slice with its horizontal and vertical flips (the flips of the training augmentation), at 3x the cost."""
        out = np.empty((len(x), *x.shape[2:]), np.float32)
        for start in range(0, len(x), self.chunk):
            batch = x[start:start + self.chunk]
            n = len(batch)
            if tta:
                batch = np.concatenate([batch, batch[..., ::-1], batch[..., ::-1, :]])
            batch = np.ascontiguousarray(batch)
            p = sum(expit(net.logits(batch)[:, 0]) for net in self.networks) / len(self.networks)
            if tta:
                p = (p[:n] + p[n:2 * n, :, ::-1] + p[2 * n:, ::-1, :]) / 3
            out[start:start + n] = p
        return out

    def probabilities(self, images: Sequence[np.ndarray], tta: bool = False) -> list[np.ndarray]:
        """float32 (H, W) per image, each at its own size, a chunk at a time: the next chunk is preprocessed in a
        thread while the networks infer on this one (OpenVINO, PyTorch and OpenCV's CLAHE release the GIL), so
        preprocessing no longer precedes inference. An unusable image raises its InputError when its chunk's
        turn comes."""
        if not len(images):
            return []
        chunks = [images[i:i + self.chunk] for i in range(0, len(images), self.chunk)]
        out: list[np.ndarray] = []
        x = self.preprocess(chunks[0])
        with ThreadPoolExecutor(1, thread_name_prefix="preprocess") as ahead:  # its thread starts on first submit
            for k, chunk in enumerate(chunks):
                following = ahead.submit(self.preprocess, chunks[k + 1]) if k + 1 < len(chunks) else None
                out += [resize_probability(p, im.shape[:2]) for p, im in zip(self.model_probabilities(x, tta), chunk)]
                if following is not None:
                    x = following.result()
        return out

    def scale(self, shape: tuple[int, ...]) -> float:
        """Pixels of an input slice per pixel of the network's input: post-processing sizes scale with it."""
        return shape[-1] * shape[-2] / self.input_px

    def predict(self, image: np.ndarray, spacing: tuple[float, float] | None = None,
                tta: bool = False) -> Prediction:
        """One slice (H, W) or (H, W, C) alone (the 2-D rule); `spacing` (mm between rows, between columns)
        adds mm² areas."""
        t0 = time.perf_counter()
        prob = self.probabilities([image], tta)[0]
        mask = mask_slice(prob, self.post, self.scale(prob.shape))
        return Prediction(prob, mask, find_lesions(prob, mask, spacing), spacing, time.perf_counter() - t0)

    def predict_stack(self, slices: Sequence[np.ndarray], tta: bool = False) -> StackPrediction:
        """A patient's slices in anatomical order, all of one size: batched passes, then the 3-D rule."""
        t0 = time.perf_counter()
        if not slices:
            raise InputError("no slices to segment")
        if len({im.shape[:2] for im in slices}) > 1:
            raise InputError(f"the slices of one stack differ in size ({sorted({im.shape[:2] for im in slices})}); "
                             f"a patient's slices must share one size")
        prob = np.stack(self.probabilities(slices, tta))
        return StackPrediction(prob, self.mask_stack(prob), time.perf_counter() - t0)

    def mask_stack(self, probability: np.ndarray) -> np.ndarray:
        return mask_stack(probability, self.post, self.scale(probability.shape))


def mean_post(posts: Sequence[PostprocessConfig]) -> PostprocessConfig:
    """An ensemble never tuned on validation: its networks' own rules, averaged."""
    return PostprocessConfig(threshold=float(np.mean([p.threshold for p in posts])),
                             min_lesion_px=int(np.mean([p.min_lesion_px for p in posts])),
                             mode=posts[0].mode if len({p.mode for p in posts}) == 1 else "multiple",
                             min_lesion_voxels=int(np.mean([p.min_lesion_voxels for p in posts])))


def resize_probability(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Back to the image's (H, W): area-averaged when shrinking, bilinear when growing, as `preprocess`."""
    if prob.shape == tuple(shape):
        return prob
    h, w = shape
    shrinking = max(prob.shape) > max(h, w)
    return cv2.resize(prob, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
