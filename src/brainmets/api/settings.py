"""The one settings object of the API, read from environment variables prefixed BRAINMETS_.

    BRAINMETS_MODELS             folder of shipped models, models/<name>/model.pt (+ model.onnx)
    BRAINMETS_MAX_UPLOAD_MB      request body limit, enforced while the body streams in (50)
    BRAINMETS_MAX_PIXELS         largest slice a header may declare, decompression-bomb guard (25 M)
    BRAINMETS_MAX_VOXELS         largest NIfTI volume a header may declare (64 Mi)
    BRAINMETS_MAX_SLICES         most slices in one series of a study (1000)
    BRAINMETS_MAX_UNZIPPED_MB    most bytes a study's zip may inflate to (1024)
    BRAINMETS_THREADS            threads of one inference (0: one per physical core)
    BRAINMETS_WORKERS            requests worked on at once; workers x threads should not exceed the cores (1);
                                 OpenVINO's networks still run one at a time (inference.openvino_forward)
    BRAINMETS_QUEUE              requests that may wait for a worker; beyond them: 503 + Retry-After (32)
    BRAINMETS_REQUEST_TIMEOUT_S  longest wait plus run of one slice request before it is answered 503 (60)
    BRAINMETS_VOLUME_TIMEOUT_S   the same for a volume, segmented slice by slice (600)
    BRAINMETS_CORS_ORIGINS       JSON list of browser origins allowed to call the API ([]: none)
    BRAINMETS_RUNTIME            auto | openvino | onnxruntime | torch (auto: OpenVINO where exported)
    BRAINMETS_PRECISION          auto | bf16 | f32 (auto: whichever measured faster on this CPU, f32 where bf16's
                                 masks disagree with f32's; brainmets.precision); /v1/models says which and why
    BRAINMETS_DEVICE             auto | cpu | cuda (auto: a CUDA GPU where PyTorch sees one, PyTorch with bf16
                                 autocast; else the CPU runtimes); read by the engine, checked here at start
    BRAINMETS_BATCH              slices per forward pass (unset: measured per network and precision, cached with
                                 the precision choice); read by the engine, checked here at start
    BRAINMETS_PRELOAD            load every installed model at start-up rather than on first use (true)
    BRAINMETS_DICOMWEB_URL       the PACS of /v1/pacs (DICOMweb base URL; unset: no PACS); credentials in
                                 BRAINMETS_DICOMWEB_USER and _PASSWORD, or _TOKEN, read by brainmets.dicomweb
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from brainmets.inference import DEVICES, RUNTIMES, pick_device
from brainmets.inputs.readers import MAX_PIXELS, MAX_VOXELS
from brainmets.precision import PRECISIONS, requested_batch
from brainmets.registry import models_dir
from brainmets.inputs.study import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRAINMETS_", frozen=True)

    max_upload_mb: float = Field(50.0, gt=0)
    max_pixels: int = Field(MAX_PIXELS, gt=0)
    max_voxels: int = Field(MAX_VOXELS, gt=0)
    max_slices: int = Field(Limits.max_slices, gt=0)
    max_unzipped_mb: float = Field(Limits.max_bytes / 2**20, gt=0)
    threads: int = Field(0, ge=0)
    workers: int = Field(1, ge=1)
    queue: int = Field(32, ge=0)
    request_timeout_s: float = Field(60.0, gt=0)
    volume_timeout_s: float = Field(600.0, gt=0)
    cors_origins: list[str] = []
    runtime: Literal[RUNTIMES] = "auto"
    precision: Literal[PRECISIONS] = "auto"
    device: Literal[DEVICES] = "auto"
    preload: bool = True
    dicomweb_url: str | None = None

    @model_validator(mode="after")
    def _engine_settings_hold(self) -> Settings:
        """cuda without a GPU, or with a CPU-only runtime, and a batch that is no positive number stop the server
        at start rather than at first use."""
        pick_device(self.device, self.runtime)
        requested_batch()
        return self

    @property
    def models(self) -> Path:
        """BRAINMETS_MODELS, read by `brainmets.registry`: the only place where model names become paths."""
        return models_dir()

    @property
    def study_limits(self) -> Limits:
        return Limits(max_slices=self.max_slices, max_bytes=int(self.max_unzipped_mb * 2**20),
                      max_pixels=self.max_pixels, max_voxels=self.max_voxels)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@lru_cache
def get_settings() -> Settings:
    return Settings()
