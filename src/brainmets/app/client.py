"""The page's only link to the backend: a small HTTP client for the brainmets API.

Every failure becomes an `ApiError` whose message can be shown as is: a backend that does not answer
names the address that was tried; a 4xx/5xx carries the API's own `detail`.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import requests

DEFAULT_API = "http://127.0.0.1:8000"  # `brainmets serve`'s default address
# Inference on 2 CPU cores takes well under a second a slice; a whole volume takes longer.
TIMEOUT_S = 60.0
VOLUME_TIMEOUT_S = 600.0


class ApiError(Exception):
    """A readable message for the page: what went wrong and, where it helps, what to do."""


@dataclass
class VolumeResult:
    model: str  # the model that answered (`best` resolved)
    nifti: bytes  # the mask volume, .nii.gz on the input's grid (same affine)
    lesion_volume_mm3: float
    lesion_voxels: int


@dataclass
class StudyAnswer:
    answer: dict[str, Any]  # the API's JSON: lesions, channels, series, per-slice areas, warnings, timing
    nifti: bytes  # the mask, .nii.gz on the input's grid
    csv: bytes  # the lesion table
    seg: bytes | None  # the DICOM SEG, for DICOM input


class Client:
    def __init__(self, base_url: str, timeout_s: float = TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, timeout_s: float | None = None, **kwargs) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            response = requests.request(method, url, timeout=timeout_s or self.timeout_s, **kwargs)
        except requests.ConnectionError:
            raise ApiError(f"The brainmets API is not reachable at {self.base_url} (tried {method} {url}). "
                           f"Start it with `brainmets serve`, or point the page at it with "
                           f"`brainmets app --api URL`.") from None
        except requests.Timeout:
            raise ApiError(f"The brainmets API at {self.base_url} did not answer {method} {path} within "
                           f"{timeout_s or self.timeout_s:.0f} s.") from None
        except requests.RequestException as e:
            raise ApiError(f"Request to {url} failed: {e}") from None
        if response.status_code >= 400:
            raise ApiError(_error_message(response))
        return response

    def health(self) -> dict[str, Any]:
        """{"status": "ok", "models": [...]}"""
        return self._request("GET", "/health", timeout_s=5).json()

    def models(self) -> list[dict[str, Any]]:
        """Each shipped model with the metrics of its model card."""
        return self._request("GET", "/v1/models").json()["models"]

    def segment(self, data: bytes, filename: str, model: str = "best", tta: bool = False) -> dict[str, Any]:
        """The API's JSON answer for one slice: model, width, height, lesions, lesion_area_px,
        lesion_area_mm2, mask_png and probability_png (base64 PNG), inference_ms."""
        response = self._request("POST", "/v1/segment", params={"model": model, "tta": str(tta).lower()},
                                 files={"file": (filename, data)})
        return response.json()

    def segment_volume(self, data: bytes, filename: str, model: str = "best", tta: bool = False) -> VolumeResult:
        """The NIfTI mask of a whole volume and its lesion volume."""
        response = self._request("POST", "/v1/segment/volume", timeout_s=VOLUME_TIMEOUT_S,
                                 params={"model": model, "tta": str(tta).lower()},
                                 files={"file": (filename, data)})
        headers = response.headers
        return VolumeResult(headers["X-Model"], response.content, float(headers["X-Lesion-Volume-Mm3"]),
                            int(headers["X-Lesion-Voxels"]))

    def segment_study(self, data: bytes, filename: str, model: str = "best", tta: bool = False,
                      register: str = "auto") -> StudyAnswer:
        """A whole study (a zip, or a NIfTI volume) in one engine run: every output at once."""
        response = self._request("POST", "/v1/segment/study", timeout_s=VOLUME_TIMEOUT_S,
                                 params={"model": model, "tta": str(tta).lower(), "format": "zip",
                                         "register": register},
                                 files={"file": (filename, data)})
        with zipfile.ZipFile(io.BytesIO(response.content)) as bundle:
            names = set(bundle.namelist())
            return StudyAnswer(json.loads(bundle.read("study.json")), bundle.read("mask.nii.gz"),
                               bundle.read("lesions.csv"),
                               bundle.read("study.seg.dcm") if "study.seg.dcm" in names else None)

    def pacs_studies(self) -> dict[str, Any]:
        """{"url": the API's PACS, "studies": [{uid, patient_id, date, description, series, instances,
        brainmets_segs}]}"""
        return self._request("GET", "/v1/pacs/studies").json()

    def pacs_segment(self, study_uid: str, model: str = "best", tta: bool = False) -> dict[str, Any]:
        """The study route's JSON answer for a PACS study, plus seg_series_uid, stored_at and timings."""
        return self._request("POST", f"/v1/pacs/studies/{study_uid}/segment", timeout_s=VOLUME_TIMEOUT_S,
                             params={"model": model, "tta": str(tta).lower()}).json()


def _error_message(response: requests.Response) -> str:
    """The API's `detail` (a sentence saying what is wrong and what is accepted), else the body or reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if not detail:
        detail = response.text.strip()[:300] or response.reason
    return f"{detail} (the API answered {response.status_code})"
