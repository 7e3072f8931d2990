"""The FastAPI app and `run_server` (what `swakv serve` runs).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /v1/models/{id}, POST /tokenize, POST /detokenize, GET /health, GET /metrics.
/v1/*, /tokenize and /detokenize require the API key when one is set; /health and
/metrics never do (they carry no user data).

Shutdown (SIGTERM or SIGINT): uvicorn stops accepting connections, lets in-flight
requests (streams included) finish for up to `drain_timeout` seconds, then the
lifespan hook stops the engine thread and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from swakv.config import EngineConfig, ServerConfig
from swakv.model.generation_config import GenerationConfig
from swakv.server import routes, tokenize
from swakv.server.async_engine import AsyncEngine
from swakv.server.metrics import ServerMetrics
from swakv.server.protocol import ApiError
from swakv.server.state import ServerState, authorize, model_id_for

log = logging.getLogger("swakv.server")

_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize",
              "/detokenize", "/health", "/metrics"}


class _CountRequests:
    """ASGI middleware: count responses by endpoint and status (no body buffering)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else (
                "/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.http.labels(endpoint, str(status[0] or 500)).inc()


def _error(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(cfg: ServerConfig, engine: AsyncEngine, metrics: ServerMetrics,
               generation: GenerationConfig | None = None) -> FastAPI:
    """The app; `generation` supplies sampling values requests leave unset."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.healthy and not engine.stopped:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="swakv", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    state = ServerState(cfg, engine, metrics, model_id_for(cfg), int(time.time()),
                        generation or GenerationConfig())
    app.state.swakv = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(ApiError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(ApiError(500, "internal server error", type="server_error",
                               code="internal_error"))

    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/tokenize", tokenize.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", tokenize.detokenize, methods=["POST"])

    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created,
                "owned_by": "swakv", "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request, state)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict:
        authorize(request, state)
        state.check_model(model)
        return model_card()

    @app.get("/health")
    async def health() -> Response:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        reason = f"engine failed: {engine.error}" if engine.error else "engine stopped"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return _CountRequests(app, metrics)  # type: ignore[return-value]


def build_server_app(engine_cfg: EngineConfig, server_cfg: ServerConfig):
    """Load the model and size the pools, then wire the engine thread, metrics and app."""
    from swakv.engine.build import build, off_the_main_thread

    built = off_the_main_thread(lambda: build(server_cfg.model, engine_cfg))
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    engine = AsyncEngine(built.engine, metrics)
    holder.append(engine)
    return create_app(server_cfg, engine, metrics, built.generation), engine


def run_server(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> int:
    import uvicorn

    if server_cfg.api_key is None and os.environ.get("SWAKV_API_KEY"):
        from dataclasses import replace

        server_cfg = replace(server_cfg, api_key=os.environ["SWAKV_API_KEY"])
    app, engine = build_server_app(engine_cfg, server_cfg)
    config = uvicorn.Config(
        app, host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level,
        access_log=server_cfg.log_level == "debug", lifespan="on",
        timeout_graceful_shutdown=server_cfg.drain_timeout,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has drained; a handler that only
    # records it makes a drained shutdown exit 0 instead of dying by SIGTERM.
    caught: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: caught.append(s))
    log.info("swakv serving %s on http://%s:%d (OpenAI API under /v1)", model_id_for(server_cfg),
             server_cfg.host, server_cfg.port)
    server.run()
    engine.stop()
    return 0 if server.started else 1
