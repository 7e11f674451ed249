from fastapi import APIRouter

from brainmets.api.deps import ModelsDep
from brainmets.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness and the installed models")
async def health(models: ModelsDep) -> Health:
    """Answers on the event loop, never behind inference work."""
    return Health(status="ok", models=models.installed())
