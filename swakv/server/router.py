"""`swakv router`: one OpenAI endpoint in front of PD prefill and decode workers.

Per request the router picks a decode and a prefill worker (round robin over the
healthy ones), forwards the body to the decode worker with the prefill worker's
control address in `X-Swakv-Prefill`, and streams the decode worker's answer (JSON
or SSE, status and all) back unchanged. The decode worker validates the request,
asks the prefill worker for the KV and decodes, so errors are the workers' own
OpenAI errors. The router itself answers: 401 (its --api-key), 413, 503
`no_workers` (no healthy worker of a role).

Health: every --health-interval s each worker's /health is polled (and a prefill
worker's /pd/info for its control address); a worker that fails a poll or refuses a connection is
marked dead and skipped until a poll succeeds again; a 503 from a decode worker (its
prefill peer died, or it stopped) triggers an immediate poll of every worker.
Workers are given by flags or register at start-up (`POST /pd/register`, what
`swakv serve --role ... --pd-register URL` does). `GET /pd/workers` lists them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from swakv.disagg.config import PREFILL_HEADER, RouterConfig
from swakv.server.protocol import ApiError

log = logging.getLogger("swakv.router")

ROLES = ("prefill", "decode")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


@dataclass
class Worker:
    role: str
    url: str
    alive: bool = False
    control_address: str | None = None  # prefill workers
    last_error: str = "not checked yet"
    checked_at: float = 0.0


class WorkerPool:
    """The known workers of both roles, their health, and round-robin picking."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.workers: list[Worker] = [Worker("prefill", u.rstrip("/")) for u in cfg.prefill]
        self.workers += [Worker("decode", u.rstrip("/")) for u in cfg.decode]
        self._next = dict.fromkeys(ROLES, 0)

    def add(self, role: str, url: str) -> Worker:
        url = url.rstrip("/")
        for w in self.workers:
            if w.url == url and w.role == role:
                return w
        w = Worker(role, url)
        self.workers.append(w)
        return w

    def alive(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role and w.alive
                and (role == "decode" or w.control_address)]

    def pick(self, role: str) -> Worker | None:
        live = self.alive(role)
        if not live:
            return None
        self._next[role] += 1
        return live[self._next[role] % len(live)]

    def mark_dead(self, w: Worker, reason: str) -> None:
        if w.alive:
            log.warning("%s worker %s marked dead: %s", w.role, w.url, reason)
        w.alive, w.last_error = False, reason

    async def check(self, client: httpx.AsyncClient, w: Worker) -> None:
        try:
            r = await client.get(w.url + "/health", timeout=2.0)
            if r.status_code != 200:
                raise RuntimeError(f"/health answered {r.status_code}")
            if w.role == "prefill":
                info = (await client.get(w.url + "/pd/info", timeout=2.0)).json()
                if info.get("role") != "prefill" or not info.get("control_address"):
                    raise RuntimeError(f"/pd/info is not a prefill worker's: {info}")
                w.control_address = info["control_address"]
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            self.mark_dead(w, str(e) or type(e).__name__)
        else:
            if not w.alive:
                log.info("%s worker %s is up", w.role, w.url)
            w.alive, w.last_error = True, ""
        w.checked_at = time.time()

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, w) for w in list(self.workers)))


def _error(status: int, message: str, code: str, type_: str = "server_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, type=type_, code=code).body(),
                        status_code=status)


async def _wait_disconnect(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


async def send_unless_gone(request: Request, client: httpx.AsyncClient,
                           upstream: httpx.Request) -> httpx.Response | None:
    """Send `upstream` and return its response once its headers arrive, or None if the
    client disconnects first: the upstream request is then cancelled, which closes its
    connection, so the decode worker aborts the request (a non-streamed answer sends
    no headers before it is complete). Connection errors propagate."""
    sending = asyncio.ensure_future(client.send(upstream, stream=True))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not sending.done():
            sending.cancel()
    if not sending.done() or sending.cancelled():
        await asyncio.gather(sending, return_exceptions=True)  # the connection is closed
        return None
    return sending.result()


def create_router_app(cfg: RouterConfig) -> FastAPI:
    pool = WorkerPool(cfg)
    registry = CollectorRegistry(auto_describe=False)
    forwarded = Counter("swakv_router_requests", "Requests forwarded, by decode worker and "
                        "status", ["worker", "status"], registry=registry)
    alive_gauge = Gauge("swakv_router_workers_alive", "Healthy workers by role", ["role"],
                        registry=registry)
    state: dict = {}

    async def health_loop(client: httpx.AsyncClient) -> None:
        while True:
            await pool.check_all(client)
            await asyncio.sleep(cfg.health_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=limits)
        state["client"] = client
        await pool.check_all(client)
        task = asyncio.create_task(health_loop(client))
        yield
        task.cancel()
        await client.aclose()

    app = FastAPI(title="swakv router", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.pool = pool

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_request_bytes:
                raise ApiError(413, f"request body is larger than {cfg.max_request_bytes} "
                               "bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def forward(request: Request, method: str, path: str, body: bytes | None,
                      with_prefill: bool) -> Response:
        client: httpx.AsyncClient = state["client"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        tried = 0
        while True:
            decode = pool.pick("decode")
            prefill = pool.pick("prefill") if with_prefill else None
            if decode is None or (with_prefill and prefill is None):
                missing = "decode" if decode is None else "prefill"
                return _error(503, f"no healthy {missing} worker", "no_workers")
            if prefill is not None:
                headers[PREFILL_HEADER] = prefill.control_address
            upstream = client.build_request(method, decode.url + path, content=body,
                                            headers=headers)
            try:
                resp = await send_unless_gone(request, client, upstream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing was sent
                pool.mark_dead(decode, f"connect failed: {e}")
                tried += 1
                if tried < len(pool.workers):
                    continue
                return _error(503, "no decode worker reachable", "no_workers")
            break
        if resp is None:  # the client left before the answer began; nobody reads this
            return Response(status_code=499)
        forwarded.labels(decode.url, str(resp.status_code)).inc()
        if resp.status_code == 503:  # a worker (or its prefill peer) is gone: re-check now
            recheck = state.get("recheck")
            if recheck is None or recheck.done():  # one at a time, however many 503s
                state["recheck"] = asyncio.ensure_future(pool.check_all(client))

        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:  # the decode worker died mid-answer
                pool.mark_dead(decode, f"answer cut off: {e}")
                if resp.headers.get("content-type", "").startswith("text/event-stream"):
                    err = ApiError(503, f"decode worker failed: {e}", type="server_error",
                                   code="engine_unavailable").body()
                    yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
            finally:
                await resp.aclose()

        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
        return StreamingResponse(relay(), status_code=resp.status_code, headers=out_headers)

    async def completion(request: Request, path: str) -> Response:
        authorize(request)
        body = await read_body(request)
        return await forward(request, "POST", path, body, with_prefill=True)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await completion(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return await forward(request, "GET", "/v1/models", None, with_prefill=False)

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        authorize(request)
        return await forward(request, "GET", f"/v1/models/{model}", None, with_prefill=False)

    @app.get("/health")
    async def health() -> JSONResponse:
        counts = {role: len(pool.alive(role)) for role in ROLES}
        ok = all(counts.values())
        return JSONResponse({"status": "ok" if ok else "unhealthy", **counts},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        for role in ROLES:
            alive_gauge.labels(role).set(len(pool.alive(role)))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/pd/workers")
    async def workers() -> JSONResponse:
        return JSONResponse([{"role": w.role, "url": w.url, "alive": w.alive,
                              "control_address": w.control_address, "error": w.last_error}
                             for w in pool.workers])

    @app.post("/pd/register")
    async def register(request: Request) -> JSONResponse:
        authorize(request)
        try:
            body = await request.json()
            role, url = body["role"], body["url"]
            if role not in ROLES or not isinstance(url, str) or not url.startswith(
                    ("http://", "https://")):
                raise ValueError(body)
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "expected {\"role\": \"prefill\"|\"decode\", \"url\": "
                           "\"http://...\"}", code="invalid_value") from None
        w = pool.add(role, url)
        await pool.check(state["client"], w)
        return JSONResponse({"role": w.role, "url": w.url, "alive": w.alive})

    return app


def run_router(cfg: RouterConfig) -> int:
    import uvicorn

    app = create_router_app(cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            access_log=cfg.log_level == "debug", lifespan="on",
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    caught: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: caught.append(s))
    log.info("swakv router on http://%s:%d: %d prefill, %d decode workers", cfg.host, cfg.port,
             len(cfg.prefill), len(cfg.decode))
    server.run()
    return 0 if server.started else 1
