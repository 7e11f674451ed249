from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response

from brainmets.api import service
from brainmets.api.deps import ModelsDep, PoolDep, SettingsDep
from brainmets.api.schemas import (ErrorResponse, LesionMode, ModelChoice, OutputFormat, RegisterChoice, SegmentResponse,
                                   StudyFormat, StudyResponse)
from brainmets.inputs.readers import ACCEPTED
from brainmets.registry import BEST

router = APIRouter(prefix="/segment", tags=["segment"])

ERRORS = {
    404: {"model": ErrorResponse, "description": "The model is not installed on this server."},
    413: {"model": ErrorResponse, "description": "Upload over the size limit, or an image declaring too many pixels."},
    415: {"model": ErrorResponse, "description": f"Not a supported file type ({ACCEPTED})."},
    422: {"model": ErrorResponse, "description": "Unreadable, truncated, too small or non-finite image; missing "
                                                 "`file` field; unknown model name."},
    503: {"model": ErrorResponse, "description": "Busy or too slow; retry after `Retry-After` seconds."},
}
ModelQuery = Annotated[ModelChoice, Query(description="`best` is the candidate with the higher validation Dice; "
                                                      "`ensemble` averages the shipped networks.")]
ModeQuery = Annotated[LesionMode | None, Query(description="For the stack: `single` keeps its strongest 3-D lesion "
                                                          "(one per patient, as gliomas), `multiple` every one (as "
                                                          "metastases). Unset: the model's own, chosen on validation.")]
TtaQuery = Annotated[bool, Query(description="Average over horizontal and vertical flips (3x the time).")]
RegisterQuery = Annotated[RegisterChoice, Query(
    description="Rigid registration of each sequence onto FLAIR (unrecorded patient motion): `auto` registers every "
                "series not on FLAIR's grid and keeps it only where it improves the similarity, `on` every series, "
                "`off` uses the headers' geometry alone.")]


@router.post("", response_model=SegmentResponse, summary="Segment one slice",
             responses={200: {"content": {"image/png": {}},
                              "description": "JSON, or with `format=png` the mask PNG (0/255, the input's size)."},
                        **ERRORS})
async def segment(
    file: Annotated[UploadFile, File(description="One slice: PNG, JPEG, TIFF, WebP or DICOM.")],
    models: ModelsDep, pool: PoolDep, settings: SettingsDep,
    model: ModelQuery = ModelChoice(BEST), tta: TtaQuery = False,
    format: Annotated[OutputFormat, Query(description="`json` or `png` (the mask itself).")] = OutputFormat.json,
):
    """Lesion mask, probability map and lesions (area, centroid, box, mean probability) of one MRI slice
    of any size. Areas in mm² when the file carries a pixel spacing (DICOM)."""
    data = await file.read()
    if format is OutputFormat.png:
        mask, headers = await pool.run(settings.request_timeout_s, service.segment_png, models, data, model.value, tta,
                                       settings.max_pixels)
        return Response(mask, media_type="image/png", headers=headers)
    return await pool.run(settings.request_timeout_s, service.segment_json, models, data, model.value, tta,
                          settings.max_pixels)


@router.post("/volume", response_class=Response, summary="Segment a NIfTI volume",
             responses={200: {"content": {"application/gzip": {}},
                              "description": "The mask as .nii.gz on the input's grid (same affine); lesion "
                                             "volume in the X-Lesion-Volume-Mm3 header."},
                        **ERRORS})
async def segment_volume(
    file: Annotated[UploadFile, File(description="A NIfTI volume (.nii or .nii.gz): 3-D, or 4-D with 1 or 3 channels.")],
    models: ModelsDep, pool: PoolDep, settings: SettingsDep,
    model: ModelQuery = ModelChoice(BEST), tta: TtaQuery = False, lesion_mode: ModeQuery = None,
) -> Response:
    """Slice by slice along the axial axis, then the 3-D post-processing; returns a NIfTI mask with the input's
    affine."""
    data = await file.read()
    body, headers = await pool.run(settings.volume_timeout_s, service.segment_volume, models, data, model.value, tta,
                                   settings.max_voxels, lesion_mode and lesion_mode.value)
    return Response(body, media_type="application/gzip",
                    headers={**headers, "Content-Disposition": 'attachment; filename="mask.nii.gz"'})


def _channel_query(channel: str) -> object:
    return Query(description=f"The series that fills the {channel} channel: its SeriesNumber, SeriesDescription or "
                             f"SeriesInstanceUID; `none` fills it with FLAIR. Unset: chosen from the series' tags.")


@router.post("/study", response_model=StudyResponse, summary="Segment a whole study",
             responses={200: {"content": {"application/gzip": {}, "application/dicom": {}, "application/zip": {}},
                              "description": "JSON; with `format=nifti` the mask as .nii.gz on the input's grid; "
                                             "with `format=dicom-seg` a DICOM SEG referencing the FLAIR series; "
                                             "with `format=zip` study.json, mask.nii.gz, lesions.csv and "
                                             "study.seg.dcm (DICOM input)."},
                        **ERRORS})
async def segment_study(
    file: Annotated[UploadFile, File(description="A zip of one study's DICOM files (any folders, any names), of "
                                                 "one patient's numbered slices (<name>_<n>.tif) or of one case's "
                                                 "NIfTI files (BraTS or nnU-Net names), or a NIfTI volume.")],
    models: ModelsDep, pool: PoolDep, settings: SettingsDep,
    model: ModelQuery = ModelChoice.best, tta: TtaQuery = False,
    format: Annotated[StudyFormat, Query(description="`json`, `nifti` (the mask), `dicom-seg` (DICOM input only) "
                                                     "or `zip` (all of them and lesions.csv).")] = StudyFormat.json,
    t1_pre: Annotated[str | None, _channel_query("pre-contrast T1")] = None,
    flair: Annotated[str | None, _channel_query("FLAIR")] = None,
    t1_post: Annotated[str | None, _channel_query("post-contrast T1")] = None,
    lesion_mode: ModeQuery = None, register: RegisterQuery = RegisterChoice.auto,
    channel_names: Annotated[str | None, Query(description="An nnU-Net case without its dataset.json: the channel "
                                                           "order of its files _0000, _0001, ... comma-separated, "
                                                           "e.g. `FLAIR,T1,T1Gd,T2`.")] = None,
):
    """Every sequence brought onto the FLAIR series' grid (resampled through the DICOM or NIfTI geometry, and
    registered where the patient moved), one engine call over the study's slices, then its 3-D lesions: id,
    voxels, volume in mm³, first and last slice, largest axial diameter, centroid, mean probability; how each
    channel was chosen and aligned, the time of each step, per-slice lesion areas, warnings (gaps in positions,
    low coverage, channels filled with FLAIR) and what was passed over in the upload."""
    data = await file.read()
    channels = {name: value for name, value in (("t1_pre", t1_pre), ("flair", flair), ("t1_post", t1_post))
                if value is not None}
    answer = await pool.run(settings.volume_timeout_s, service.segment_study, models, data, model.value, tta,
                            settings.study_limits, channels, format.value, lesion_mode and lesion_mode.value,
                            register.value, channel_names and [n.strip() for n in channel_names.split(",")])
    if isinstance(answer, StudyResponse):
        return answer
    body, media_type, headers = answer
    return Response(body, media_type=media_type, headers=headers)
