"""Assembles the app: settings, shared state, error handlers, middleware, routers. No logic lives here.

    brainmets serve [--host 127.0.0.1] [--port 8000]      or      uvicorn brainmets.api.main:app
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from brainmets.api import errors
from brainmets.api.limits import UploadLimit
from brainmets.api.routes import api_router, health
from brainmets.api.service import InferencePool, Models
from brainmets.api.settings import Settings, get_settings

DOCS_ASSETS = "/docs-assets"
DESCRIPTION = """Brain lesion segmentation of MRI slices (PNG, JPEG, TIFF, WebP, DICOM) and NIfTI volumes with
U-Net++ and Attention U-Net. Errors are 4xx with a JSON `detail` saying what is wrong and what is accepted;
503 with `Retry-After` when busy."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.preload:
            # In the background: /health answers at once while the models compile (seconds; a second start reads
            # OpenVINO's cache); a request that comes first waits for its model behind the loading lock.
            loading = asyncio.get_running_loop().run_in_executor(None, app.state.models.preload)
        yield
        if settings.preload:
            await loading
        app.state.pool.shutdown()

    # /docs and /redoc load their scripts from this server (DOCS_ASSETS), not from a CDN: hospital networks are
    # often offline.
    app = FastAPIOffline(title="brainmets", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                         static_url=DOCS_ASSETS)
    app.state.settings = settings
    app.state.models = Models(settings.runtime, settings.threads, settings.precision)
    app.state.pool = InferencePool(settings.workers, settings.queue)
    errors.install(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           expose_headers=["X-Model", "X-Model-Version", "X-Lesion-Area-Px", "X-Lesion-Area-Mm2", "X-Lesion-Count",
                                           "X-Lesion-Volume-Mm3", "X-Lesion-Voxels", "X-Inference-Ms"])
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.include_router(health.router)
    app.include_router(api_router, prefix="/v1")
    return app


app = create_app()
