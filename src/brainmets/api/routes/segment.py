from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response

from brainmets.api import service
from brainmets.api.deps import ModelsDep, PoolDep, SettingsDep
from brainmets.api.schemas import ErrorResponse, ModelChoice, OutputFormat, SegmentResponse
from brainmets.readers import ACCEPTED
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
ModelQuery = Annotated[ModelChoice, Query(description="`best` is the shipped model with the higher test Dice; "
                                                      "`ensemble` averages the shipped networks.")]
TtaQuery = Annotated[bool, Query(description="Average over horizontal and vertical flips (3x the time).")]


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
    model: ModelQuery = ModelChoice(BEST), tta: TtaQuery = False,
) -> Response:
    """Slice by slice along the axial axis; returns a NIfTI mask with the input's affine."""
    data = await file.read()
    body, headers = await pool.run(settings.volume_timeout_s, service.segment_volume, models, data, model.value, tta,
                                   settings.max_voxels)
    return Response(body, media_type="application/gzip",
                    headers={**headers, "Content-Disposition": 'attachment; filename="mask.nii.gz"'})
