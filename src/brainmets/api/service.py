"""What the routes call: the installed models (each loaded once), the bounded inference pool, and the
work of one request (decode, predict, encode), which runs inside the pool, off the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from brainmets import study_results
from brainmets.provenance import fingerprint
from brainmets.api.schemas import LesionOut, ModelInfo, SegmentResponse, StudyResponse
from brainmets.config import TrainConfig
from brainmets.inference import Network, Prediction, Predictor, mean_post
from brainmets.inputs.readers import read_slice, read_volume
from brainmets.registry import (BEST, CANDIDATES, CHOICES, ENSEMBLE, SHIPPED, best_name, ensemble_post, model,
                                models_dir, resolve, shipped_metrics, validation_dice)
from brainmets.inputs.study import Limits, StudyError, study_from_upload, study_from_volume


class ModelNotInstalled(LookupError):
    """A valid model name with no model installed behind it."""


class Overloaded(Exception):
    """Every worker is busy and the queue is full, or a request ran past the time limit."""


class Models:
    """The shipped networks, each loaded on first use (or at start-up) and shared by every model using it
    (`best`, `ensemble`); which files a name stands for is `brainmets.registry.model`'s answer."""

    def __init__(self, runtime: str = "auto", threads: int = 0, precision: str = "auto"):
        self.runtime, self.threads, self.precision = runtime, threads, precision
        self._networks: dict[Path, Network] = {}  # checkpoint -> its network
        self._lock = threading.Lock()

    def installed(self) -> list[str]:
        return [name for name in SHIPPED if (models_dir() / name / "model.pt").is_file()]

    def preload(self) -> None:
        for name in self.installed():
            self.network(resolve(name)).warm_up()

    def network(self, checkpoint: Path) -> Network:
        with self._lock:
            if checkpoint not in self._networks:
                self._networks[checkpoint] = Network.load(checkpoint, self.runtime, self.threads, self.precision)
            return self._networks[checkpoint]

    def loaded(self, name: str) -> Network | None:
        """A shipped network's, if it has been loaded."""
        return self._networks.get(models_dir() / name / "model.pt")

    def predictor(self, choice: str, lesion_mode: str | None = None) -> Predictor:
        """`best`, `ensemble` (both shipped networks) or a shipped name; `lesion_mode` overrides the model's
        own for stacks, with the settings validation chose for that mode."""
        if choice not in CHOICES:  # requests reach here through ModelChoice; this keeps any other caller honest
            raise ModelNotInstalled(f"unknown model {choice!r}; expected one of {', '.join(CANDIDATES)} or {BEST}")
        try:
            found = model(choice)
        except FileNotFoundError as e:
            installed = ", ".join(self.installed()) or "none"
            if choice == BEST:
                raise ModelNotInstalled(f"no installed model has validation metrics to pick `best` by; installed: "
                                        f"{installed}") from e
            missing = next((n for n in (SHIPPED if choice == ENSEMBLE else (choice,)) if n not in self.installed()),
                           choice)
            raise ModelNotInstalled(f"model {missing!r} is not installed on this server; installed: {installed}") from e
        predictor = Predictor([self.network(path) for path in found.checkpoints], found.name, found.post)
        predictor.use_lesion_mode(lesion_mode)
        return predictor

    def info(self) -> list[ModelInfo]:
        """The installed networks, and the ensemble where both are installed."""
        try:
            best = best_name()
        except FileNotFoundError:
            best = None
        installed = self.installed()
        out = []
        for name in installed + ([ENSEMBLE] if len(installed) == len(SHIPPED) else []):
            if name == ENSEMBLE:
                cfg = TrainConfig.load(models_dir() / SHIPPED[0] / "config.json")
                post = ensemble_post() or mean_post([TrainConfig.load(models_dir() / n / "config.json").post
                                                     for n in SHIPPED])
                loaded = self.loaded(SHIPPED[0])
            else:
                config_path = models_dir() / name / "config.json"
                cfg = TrainConfig.load(config_path) if config_path.is_file() else None
                post, loaded = cfg.post if cfg else None, self.loaded(name)
            out.append(ModelInfo(name=name, best=name == best, runtime=loaded.runtime if loaded else None,
                                 precision=loaded.precision if loaded else None,
                                 precision_reason=loaded.precision_reason if loaded else None,
                                 image_size=cfg.preprocess.image_size if cfg else None,
                                 threshold=post.threshold if post else None,
                                 min_lesion_px=post.min_lesion_px if post else None,
                                 lesion_mode=post.mode if post else None,
                                 min_lesion_voxels=post.min_lesion_voxels if post else None,
                                 validation_dice=validation_dice(name), metrics=_numbers(shipped_metrics(name))))
        return out


def _numbers(metrics: dict[str, Any] | None) -> dict[str, float | int] | None:
    """The report's figures only: its paths (checkpoint, data) say nothing to a client about the model."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class InferencePool:
    """`workers` threads run requests; up to `queue` more wait; beyond that a request is refused at once
    (Overloaded -> 503 + Retry-After) instead of piling up. A slot is freed only when its work has really
    finished, so a request that timed out cannot let more work onto the cores than they hold."""

    def __init__(self, workers: int, queue: int):
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="inference")
        self._slots = threading.BoundedSemaphore(workers + queue)

    async def run(self, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        if not self._slots.acquire(blocking=False):
            raise Overloaded("the server is busy: every inference worker is taken and the queue is full; retry shortly")
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            raise Overloaded(f"the request took longer than the limit of {timeout_s:g} s; retry later") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def predict_slice(models: Models, data: bytes, choice: str, tta: bool, max_pixels: int) -> tuple[str, str, Prediction]:
    """(model name, model version, prediction) of one slice."""
    image = read_slice(data, max_pixels)
    predictor = models.predictor(choice)
    return predictor.name, fingerprint(predictor, tta).version, predictor.predict(image.pixels, image.spacing, tta)


def segment_json(models: Models, data: bytes, choice: str, tta: bool, max_pixels: int) -> SegmentResponse:
    name, version, p = predict_slice(models, data, choice, tta, max_pixels)
    height, width = p.mask.shape
    return SegmentResponse(
        model=name, model_version=version, width=width, height=height,
        lesions=[LesionOut(area_px=les.area_px, area_mm2=les.area_mm2, centroid=les.centroid, bbox=les.bbox,
                           mean_probability=les.mean_probability) for les in p.lesions],
        lesion_area_px=p.lesion_area_px, lesion_area_mm2=p.lesion_area_mm2,
        mask_png=base64.b64encode(p.mask_png()).decode(), probability_png=base64.b64encode(p.probability_png()).decode(),
        inference_ms=p.seconds * 1000)


def segment_png(models: Models, data: bytes, choice: str, tta: bool, max_pixels: int) -> tuple[bytes, dict[str, str]]:
    name, version, p = predict_slice(models, data, choice, tta, max_pixels)
    headers = {"X-Model": name, "X-Model-Version": version, "X-Lesion-Area-Px": str(p.lesion_area_px),
               "X-Lesion-Count": str(len(p.lesions)), "X-Inference-Ms": f"{p.seconds * 1000:.1f}"}
    if p.lesion_area_mm2 is not None:
        headers["X-Lesion-Area-Mm2"] = f"{p.lesion_area_mm2:.2f}"
    return p.mask_png(), headers


def segment_volume(models: Models, data: bytes, choice: str, tta: bool, max_voxels: int,
                   lesion_mode: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The study path, for a NIfTI volume only (this route has always refused anything else)."""
    result = study_results.segment_study(models.predictor(choice, lesion_mode),
                                         study_from_volume(read_volume(data, max_voxels), "volume"), tta)
    volume = result.on_grid()
    headers = {"X-Model": result.model, "X-Model-Version": result.version,
               "X-Lesion-Volume-Mm3": f"{volume.lesion_volume_mm3:.2f}", "X-Lesion-Voxels": str(volume.lesion_voxels),
               "X-Inference-Ms": f"{result.seconds * 1000:.1f}"}
    return volume.nifti_gz(), headers


def segment_study(models: Models, data: bytes, choice: str, tta: bool, limits: Limits,
                  channels: dict[str, str], output: str, lesion_mode: str | None = None, register: str = "auto",
                  channel_names: list[str] | None = None) -> StudyResponse | tuple[bytes, str, dict[str, str]]:
    """A zip of DICOM series, numbered slices or one case's NIfTI files, or a NIfTI volume: the JSON answer, or
    for `output` nifti, dicom-seg or zip (all of them at once) the file with its media type and headers."""
    t0 = time.perf_counter()
    study = study_from_upload(data, channels, limits, register=register, channel_names=channel_names)
    if output == "dicom-seg" and not study.reference:  # refused before the engine runs, not after
        raise StudyError(f"a DICOM SEG needs DICOM input; this study was read from {study.kind} (ask for the NIfTI "
                         f"mask instead)")
    result = study_results.segment_study(models.predictor(choice, lesion_mode), study, tta)
    answer = study_response(result, time.perf_counter() - t0)
    if output == "json":
        return answer
    if output == "zip":
        body, media_type, name = _bundle(result, answer), "application/zip", "study.zip"
    elif output == "nifti":
        body, media_type, name = result.nifti_gz(), "application/gzip", "study_mask.nii.gz"
    else:
        body, media_type, name = result.dicom_seg(), "application/dicom", "study.seg.dcm"
    return body, media_type, {"X-Model": result.model, "X-Model-Version": result.version,
                              "X-Lesion-Count": str(len(result.lesions)),
                              "X-Lesion-Voxels": str(result.lesion_voxels),
                              "X-Inference-Ms": f"{result.seconds * 1000:.1f}",
                              "Content-Disposition": f'attachment; filename="{name}"'}


def study_response(result: study_results.StudyResult, total_s: float) -> StudyResponse:
    study = result.study
    rows, columns = result.mask.shape[1:]
    return StudyResponse(
        model=result.model, model_version=result.version, model_provenance=result.fingerprint.record(),
        kind=study.kind, slices=len(study.slices), rows=rows, columns=columns,
        spacing_mm=study.spacing, channels=study.channels, series=study.series, lesions=result.lesions,
        lesion_voxels=result.lesion_voxels, lesion_volume_mm3=result.lesion_volume_mm3,
        slice_lesion_px=result.slice_lesion_px, warnings=study.warnings, ignored=study.ignored,
        steps_ms={**{step: s * 1000 for step, s in study.seconds.items()}, "inference": result.seconds * 1000},
        inference_ms=result.seconds * 1000, total_ms=total_s * 1000)


def _bundle(result: study_results.StudyResult, answer: StudyResponse) -> bytes:
    """study.json (the JSON answer), mask.nii.gz, lesions.csv and, for DICOM input, study.seg.dcm: one
    engine run for a client that wants everything (the page)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("study.json", answer.model_dump_json())
        bundle.writestr("mask.nii.gz", result.nifti_gz())
        bundle.writestr("lesions.csv", result.lesions_csv())
        if result.study.kind == "dicom":
            bundle.writestr("study.seg.dcm", result.dicom_seg())
    return out.getvalue()
