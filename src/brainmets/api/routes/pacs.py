"""The server's PACS ($BRAINMETS_DICOMWEB_URL): its studies, and one study segmented with its DICOM SEG stored
back beside it. The API keeps nothing: the PACS holds the results, and segmenting a study again with the same
model stores the same SEG instance, which the PACS keeps once."""

import time
from typing import Annotated

from fastapi import APIRouter, Path

from brainmets.api import service
from brainmets.api.deps import ModelsDep, PoolDep, SettingsDep
from brainmets.api.routes.segment import ModelQuery, RegisterQuery, TtaQuery
from brainmets.api.schemas import ErrorResponse, ModelChoice, PacsSegmentResponse, PacsStudies, RegisterChoice
from brainmets.api.settings import Settings
from brainmets.dicomweb import UID_PATTERN, Pacs
from brainmets.pacs import segment_in_pacs

router = APIRouter(prefix="/pacs", tags=["pacs"])

ERRORS = {
    404: {"model": ErrorResponse, "description": "No PACS configured on this server, or no such study in it."},
    422: {"model": ErrorResponse, "description": "The study has no MR series, or series the study reader refuses."},
    502: {"model": ErrorResponse, "description": "The PACS is unreachable, refuses the server's credentials, or "
                                                 "refused the SEG."},
}
UID = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="StudyInstanceUID")]


@router.get("/studies", response_model=PacsStudies, summary="The PACS's studies", responses=ERRORS)
def studies(settings: SettingsDep) -> PacsStudies:
    """Patient, date, description, image series, and the brainmets SEGs already there. A plain `def`: FastAPI
    runs it in a thread, so a slow PACS never holds up the event loop (nor `/health`)."""
    pacs = Pacs(settings.dicomweb_url)
    return PacsStudies(url=pacs.url, studies=pacs.studies())


@router.post("/studies/{study_uid}/segment", response_model=PacsSegmentResponse, summary="Segment a PACS study",
             responses={**ERRORS, 503: {"model": ErrorResponse, "description": "Busy; retry after `Retry-After`."}})
async def segment(study_uid: UID, models: ModelsDep, pool: PoolDep, settings: SettingsDep,
                  model: ModelQuery = ModelChoice.best, tta: TtaQuery = False,
                  register: RegisterQuery = RegisterChoice.auto) -> PacsSegmentResponse:
    """Fetch the study's MR series (WADO-RS), segment them as one study, store the DICOM SEG (STOW-RS); the
    answer is the study route's, with where the SEG was stored. Runs in the inference pool."""
    return await pool.run(settings.volume_timeout_s, _segment, models, settings, study_uid, model.value, tta,
                          register.value)


def _segment(models: service.Models, settings: Settings, study_uid: str, choice: str, tta: bool,
             register: str) -> PacsSegmentResponse:
    t0 = time.perf_counter()
    pacs = Pacs(settings.dicomweb_url)
    done = segment_in_pacs(pacs, models.predictor(choice), study_uid, tta=tta, register=register)
    answer = service.study_response(done.result, time.perf_counter() - t0)
    return PacsSegmentResponse(
        **answer.model_dump(), study_uid=study_uid, seg_series_uid=done.seg_series_uid,
        stored_at=f"{pacs.url}/studies/{study_uid}/series/{done.seg_series_uid}",
        fetch_ms=done.seconds["fetch"] * 1000, store_ms=done.seconds["store"] * 1000)
