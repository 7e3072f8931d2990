"""`swakv serve --role prefill|decode`: the OpenAI server around a PD worker engine.

The app is `create_app`'s (same endpoints, errors and metrics) plus:
- `GET /pd/info`: role, worker id and, for a prefill worker, its control-plane
  address (what the router hands decode workers);
- the `X-Swakv-Prefill` request header (set by `swakv router`): on a decode worker,
  the control address of the prefill worker that computes this request's prompt;
- 503 `engine_unavailable` for requests whose prefill peer died or timed out;
- the PD metrics (`swakv.disagg.metrics`) in /metrics.
Ports: HTTP on --host/--port; a prefill worker's control plane on --host/--pd-port;
the Mooncake transfer engine listens on two random ports on all interfaces (firewall
them between hosts).
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace

from fastapi.responses import JSONResponse

from swakv.config import EngineConfig, ServerConfig
from swakv.disagg.config import PREFILL_HEADER, PDConfig
from swakv.disagg.control import ControlPlane
from swakv.disagg.decode_worker import DecodeEngine, RoutedPrompt
from swakv.disagg.metrics import PDMetrics
from swakv.disagg.prefill_worker import PrefillEngine
from swakv.disagg.transfer import MooncakeBackend
from swakv.disagg.worker import PDEngineBase, UnavailableOutput, make_staging, new_worker_id
from swakv.engine.build import off_the_main_thread
from swakv.server.app import create_app
from swakv.server.async_engine import AsyncEngine, EngineUnavailable
from swakv.server.metrics import ServerMetrics
from swakv.server.state import model_id_for

log = logging.getLogger("swakv.server")

_prefill_hint: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "swakv_prefill_hint", default=None)


class PrefillHintMiddleware:
    """ASGI: expose the X-Swakv-Prefill header to `PDAsyncEngine.submit` (same task)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hint = None
        for name, value in scope.get("headers", ()):
            if name.decode("latin-1").lower() == PREFILL_HEADER:
                hint = value.decode("latin-1").strip() or None
        token = _prefill_hint.set(hint)
        try:
            await self.app(scope, receive, send)
        finally:
            _prefill_hint.reset(token)


class PDAsyncEngine(AsyncEngine):
    """AsyncEngine over a PD worker engine: routes prompts to the named prefill worker
    and answers peer failures with 503."""

    def submit(self, request_id, work):
        hint = _prefill_hint.get()
        if hint is not None and isinstance(self.engine, DecodeEngine):
            work = [(RoutedPrompt(ids, hint), params) for ids, params in work]
        return super().submit(request_id, work)

    def _wake_engine(self) -> None:
        self.engine.wake()  # its idle step waits on the PD event queue, not on commands

    def _failure(self, out) -> Exception:
        """A PD peer gone or timed out is a 503 (`engine_unavailable`), not a 500."""
        if isinstance(out, UnavailableOutput):
            return EngineUnavailable(out.error)
        return super()._failure(out)


def advertised_host(host: str) -> str:
    """An address peers can reach for a bind address (a wildcard becomes this host's)."""
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(socket.gethostname())
    return host


def build_pd_worker(engine_cfg: EngineConfig, server_cfg: ServerConfig, pd_cfg: PDConfig,
                    registry=None) -> PDEngineBase:
    """Load the model, size the pools, start the control plane and the transfer engine."""
    from swakv.engine.build import build_engine

    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    core = build_engine(server_cfg.model, engine_cfg)
    host = advertised_host(server_cfg.host)
    worker_id = new_worker_id(pd_cfg.role)
    prefill = pd_cfg.role == "prefill"
    control = ControlPlane(worker_id,
                           listen=f"tcp://{server_cfg.host}:{pd_cfg.pd_port}" if prefill else None,
                           heartbeat_interval=pd_cfg.pd_heartbeat_interval,
                           peer_timeout=pd_cfg.pd_peer_timeout)
    if control.address is not None:
        control.address = f"tcp://{host}:{control.address.rpartition(':')[2]}"
    backend = MooncakeBackend(hostname=host)
    holder: list[PDEngineBase] = []
    metrics = PDMetrics(lambda: holder[0].stats, registry)
    cls = PrefillEngine if prefill else DecodeEngine
    try:
        worker = cls(core, control, backend, pd_cfg, worker_id, make_staging(pd_cfg, core),
                     metrics)
    except BaseException:
        control.close()
        backend.close()
        raise
    holder.append(worker)
    return worker


def build_pd_server_app(engine_cfg: EngineConfig, server_cfg: ServerConfig, pd_cfg: PDConfig):
    """(ASGI app, AsyncEngine, worker engine) of one PD worker."""
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    worker = off_the_main_thread(
        lambda: build_pd_worker(engine_cfg, server_cfg, pd_cfg, metrics.registry))
    engine = PDAsyncEngine(worker, metrics)
    holder.append(engine)
    app = create_app(server_cfg, engine, metrics)
    info = {"role": pd_cfg.role, "worker_id": worker.worker_id,
            "control_address": worker.control.address, "model": model_id_for(server_cfg),
            "max_context": worker.max_context}

    async def pd_info() -> JSONResponse:
        return JSONResponse(info)

    app.app.add_api_route("/pd/info", pd_info, methods=["GET"])  # the FastAPI app inside
    return PrefillHintMiddleware(app), engine, worker


def register_with_router(router_url: str, role: str, url: str, api_key: str | None,
                         timeout: float = 60.0) -> threading.Thread:
    """POST /pd/register to the router until it answers 200 (in a daemon thread)."""
    import httpx

    def run() -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.post(router_url.rstrip("/") + "/pd/register", headers=headers,
                               json={"role": role, "url": url}, timeout=5.0)
                if r.status_code == 200:
                    log.info("registered with router %s as %s %s", router_url, role, url)
                    return
                log.warning("router %s refused registration: %s", router_url, r.text)
            except httpx.HTTPError as e:
                log.info("router %s not reachable yet: %s", router_url, e)
            time.sleep(1.0)
        log.error("could not register with router %s", router_url)

    thread = threading.Thread(target=run, name="swakv-pd-register", daemon=True)
    thread.start()
    return thread


def run_pd_server(engine_cfg: EngineConfig, server_cfg: ServerConfig, pd_cfg: PDConfig) -> int:
    import uvicorn

    if server_cfg.api_key is None and os.environ.get("SWAKV_API_KEY"):
        server_cfg = replace(server_cfg, api_key=os.environ["SWAKV_API_KEY"])
    app, engine, worker = build_pd_server_app(engine_cfg, server_cfg, pd_cfg)
    config = uvicorn.Config(
        app, host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level,
        access_log=server_cfg.log_level == "debug", lifespan="on",
        timeout_graceful_shutdown=server_cfg.drain_timeout)
    server = uvicorn.Server(config)
    caught: list[int] = []  # see run_server: a drained shutdown exits 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: caught.append(s))
    url = pd_cfg.pd_advertise_url or (
        f"http://{advertised_host(server_cfg.host)}:{server_cfg.port}")
    if pd_cfg.pd_register:
        register_with_router(pd_cfg.pd_register, pd_cfg.role, url, server_cfg.api_key)
    log.info("swakv %s worker %s on %s (control %s)", pd_cfg.role, worker.worker_id, url,
             worker.control.address or "-")
    try:
        server.run()
    finally:
        engine.stop()
        worker.close()
    return 0 if server.started else 1
