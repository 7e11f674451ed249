"""Dependencies of the routes, as aliases: `models: ModelsDep` in a route's signature."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from brainmets.api.service import InferencePool, Models
from brainmets.api.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_models(request: Request) -> Models:
    return request.app.state.models


def get_pool(request: Request) -> InferencePool:
    return request.app.state.pool


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[Models, Depends(get_models)]
PoolDep = Annotated[InferencePool, Depends(get_pool)]
