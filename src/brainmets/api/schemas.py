"""Request options and response bodies of the API, with the examples shown in the OpenAPI docs."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from brainmets.config import LESION_MODES
from brainmets.dicomweb import StudyRow
from brainmets.registry import CHOICES, SHIPPED
from brainmets.inputs.align import REGISTER
from brainmets.inputs.study import ChannelSource, SeriesInfo
from brainmets.study_results import Lesion3D

# The only model names a request may give (`brainmets.registry.CHOICES`); only the registry turns them into files.
ModelChoice = Enum("ModelChoice", [(name, name) for name in CHOICES], type=str)


class OutputFormat(str, Enum):
    json = "json"
    png = "png"


LesionMode = Enum("LesionMode", [(mode, mode) for mode in LESION_MODES], type=str)
RegisterChoice = Enum("RegisterChoice", [(setting, setting) for setting in REGISTER], type=str)


class StudyFormat(str, Enum):
    json = "json"
    nifti = "nifti"
    dicom_seg = "dicom-seg"
    zip = "zip"


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    models: list[str] = Field(description="Installed shipped models.", examples=[list(SHIPPED)])


class ModelInfo(BaseModel):
    name: str = Field(examples=["attention-unet"])
    best: bool = Field(description="The model `best` resolves to (higher validation per-patient Dice).")
    runtime: str | None = Field(description="openvino, onnxruntime or torch (CPU), torch-cuda (GPU) once loaded, "
                                            "null before.", examples=["openvino"])
    precision: str | None = Field(None, description="bf16 or f32 once loaded, null before.", examples=["bf16"])
    precision_reason: str | None = Field(
        None, description="Why this precision runs here (BRAINMETS_PRECISION), once loaded.",
        examples=["measured: bf16 1.70x faster than f32 on AMD EPYC 9R14, 2 cores (cached)"])
    image_size: int | None = Field(description="Side of the square every slice is resized to.", examples=[256])
    threshold: float | None = Field(description="Probability threshold of the mask.", examples=[0.6])
    min_lesion_px: int | None = Field(description="Lesions smaller than this (pixels at `image_size`, scaled to "
                                                  "the input's size) are dropped from a lone slice's mask.",
                                      examples=[100])
    lesion_mode: str | None = Field(None, description="For a stack (volume, study): `single` keeps the strongest 3-D "
                                                      "lesion, `multiple` every one.", examples=["single"])
    min_lesion_voxels: int | None = Field(None, description="For a stack: smaller 3-D lesions are dropped.",
                                          examples=[0])
    validation_dice: float | None = Field(None, description="Mean per-patient Dice on the validation patients, "
                                                            "what `best` is chosen by.", examples=[0.79])
    metrics: dict[str, float | int] | None = Field(
        description="The model's test evaluation (models/<name>/metrics.json): per-patient Dice and friends.",
        examples=[{"dice_per_patient_mean": 0.83, "dice_pooled": 0.86, "patients": 9}])


class ModelList(BaseModel):
    models: list[ModelInfo]


class LesionOut(BaseModel):
    area_px: int = Field(examples=[412])
    area_mm2: float | None = Field(description="Null when the file carries no pixel spacing.", examples=[158.2])
    centroid: tuple[float, float] = Field(description="(x, y) in pixels of the input image.",
                                          examples=[[101.4, 87.9]])
    bbox: tuple[int, int, int, int] = Field(description="(x, y, width, height) in pixels.",
                                            examples=[[88, 70, 27, 33]])
    mean_probability: float = Field(examples=[0.91])


PNG_BASE64_EXAMPLE = "iVBORw0KGgoAAAANSUhEUgAAAQAAAAEACAAAAAB5Gfe6AAAA..."


class SegmentResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="The model that answered (`best` is reported as the model it resolved to).",
                       examples=["attention-unet"])
    model_version: str = Field(description="The model as it ran: its name and the digest of its fingerprint "
                                           "(brainmets.provenance), as the study route gives it.",
                               examples=["attention-unet-3f2a9c01b7d4"])
    width: int = Field(examples=[256])
    height: int = Field(examples=[256])
    lesions: list[LesionOut]
    lesion_area_px: int = Field(examples=[412])
    lesion_area_mm2: float | None = Field(description="Null when the pixel spacing is unknown.", examples=[None])
    mask_png: str = Field(description="Base64 PNG, 0/255, the input's size.", examples=[PNG_BASE64_EXAMPLE])
    probability_png: str = Field(description="Base64 PNG, probability x 255, the input's size.",
                                 examples=[PNG_BASE64_EXAMPLE])
    inference_ms: float = Field(description="Preprocessing, network and lesion analysis.", examples=[14.2])


class StudyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="The model that answered (`best` is reported as the model it resolved to).",
                       examples=["unetpp"])
    model_version: str = Field(description="The model as it ran: its name and the digest of its fingerprint "
                                           "(brainmets.provenance). The DICOM SEG carries it, and its UIDs derive "
                                           "from it and the study.", examples=["unetpp-3f2a9c01b7d4"])
    model_provenance: dict[str, Any] = Field(
        description="What the fingerprint is made of: each network's checkpoint SHA-256, runtime and precision, the "
                    "post-processing (threshold, lesion mode, smallest lesions), TTA, the registration setting and "
                    "the brainmets version; with `version` and the full `digest`.")
    kind: str = Field(description="What the upload held: `dicom` series, `slices` (numbered images of one "
                                  "patient), a `nifti` volume or a `nifti case` (one case's NIfTI files, BraTS or "
                                  "nnU-Net names).", examples=["dicom"])
    slices: int = Field(examples=[40])
    rows: int = Field(examples=[256])
    columns: int = Field(examples=[256])
    spacing_mm: tuple[float, float, float] | None = Field(
        description="(between slices, rows, columns); null when the input carries no geometry.",
        examples=[[5.0, 0.94, 0.94]])
    channels: list[ChannelSource] = Field(description="What fills each model channel (pre-contrast T1, FLAIR, "
                                                      "post-contrast T1), how it was chosen (`how`) and how it "
                                                      "reached FLAIR's grid (`alignment`: same grid, resampled, "
                                                      "registered with the rotation and shift found, or filled with "
                                                      "FLAIR), the share of FLAIR's head it covers and its seconds.")
    series: list[SeriesInfo] = Field(description="Every image series of a DICOM study, used or not.")
    lesions: list[Lesion3D] = Field(description="3-D lesions (26-connected), largest first; slices 0-based in the "
                                                "study's order, centroid (slice, row, column).")
    lesion_voxels: int = Field(examples=[7956])
    lesion_volume_mm3: float | None = Field(description="Null when the voxel size is unknown.", examples=[34962.9])
    slice_lesion_px: list[int] = Field(description="Lesion pixels in each slice, in the study's order.")
    warnings: list[str] = Field(examples=[["series 2 'AX T2 FLAIR' (1.2.3): 1 gap(s) in slice positions, e.g. 10.00 "
                                           "mm after slice 7 where the spacing is 5.00 mm (missing slices?)"]])
    ignored: list[str] = Field(description="Files passed over, each with the reason.",
                               examples=[["notes.txt: neither DICOM nor an image"]])
    steps_ms: dict[str, float] = Field(description="Reading and decoding the series, resampling onto FLAIR's grid, "
                                                   "registration, and the engine.",
                                       examples=[{"read": 310.2, "resample": 41.5, "register": 0.0, "inference": 2210.7}])
    inference_ms: float = Field(description="The engine: preprocessing, network, post-processing, lesions.")
    total_ms: float = Field(description="Reading the study, the engine and the answer.")


class PacsStudies(BaseModel):
    url: str = Field(description="The PACS's DICOMweb base URL.", examples=["http://localhost:8042/dicom-web"])
    studies: list[StudyRow] = Field(description="Oldest first; `brainmets_segs` lists the model versions that "
                                                "stored a SEG in the study.")


class PacsSegmentResponse(StudyResponse):
    study_uid: str
    seg_series_uid: str = Field(description="Derived from the study and the model version: the same on every run.")
    stored_at: str = Field(description="The SEG series' WADO-RS address.")
    fetch_ms: float = Field(description="Retrieving the study's MR series (WADO-RS).")
    store_ms: float = Field(description="Storing the SEG (STOW-RS).")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What is wrong and what is accepted.",
                        examples=["unsupported file type: expected PNG, JPEG, TIFF, WebP, DICOM (.dcm) or NIfTI "
                                  "(.nii, .nii.gz)"])
