from fastapi import APIRouter

from brainmets.api.deps import ModelsDep
from brainmets.api.schemas import ModelList

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList, summary="Installed models with their test metrics")
def list_models(models: ModelsDep) -> ModelList:
    return ModelList(models=models.info())
