"""One router per resource; `api_router` gathers those served under /v1."""

from fastapi import APIRouter

from brainmets.api.routes import models, pacs, segment

api_router = APIRouter()
api_router.include_router(models.router)
api_router.include_router(segment.router)
api_router.include_router(pacs.router)
