"""PD settings: the `--role` of `swakv serve` and its control / transfer flags, and the
router's settings. Frozen dataclasses with help text, like `swakv.config` (the CLI
builds flags from them)."""

from __future__ import annotations

from dataclasses import dataclass

from swakv.config import config_field as _help

ROLES = ("colocated", "prefill", "decode")
PREFILL_HEADER = "x-swakv-prefill"  # router -> decode worker: the prefill control address


class PDConfigError(ValueError):
    """PD settings (or an engine configuration) that disaggregated serving cannot use."""


@dataclass(frozen=True)
class PDConfig:
    """Settings of a PD worker (`swakv serve --role prefill|decode`)."""

    role: str = _help(
        "colocated (one engine serves whole requests), prefill or decode (a PD worker "
        "behind `swakv router`)", default="colocated")
    pd_port: int = _help(
        "prefill role: TCP port of the control plane (pyzmq) on --host; 0 picks a free one",
        default=0)
    pd_register: str | None = _help(
        "router URL to register this worker with once it serves (POST /pd/register)",
        default=None)
    pd_advertise_url: str | None = _help(
        "URL the router reaches this worker's HTTP API at; default: http://HOST:PORT",
        default=None)
    pd_heartbeat_interval: float = _help("seconds between control-plane heartbeats",
                                         default=1.0)
    pd_peer_timeout: float = _help(
        "a peer silent this many seconds is dead: its requests fail (503) and their KV "
        "pages are freed", default=10.0)
    pd_kv_timeout: float = _help(
        "decode role: seconds a request waits for its KV from the prefill worker before "
        "failing (503)", default=300.0)
    pd_staging_memory: float = _help(
        "bytes of a registered staging buffer for fragmented transfers (0: write page "
        "runs directly)", default=0.0)
    pd_swa_tail_prealloc: bool = _help(
        "decode role: preallocate SWA pages only for the window tail (switch off only to "
        "measure the naive layout)", default=True)

    def __post_init__(self) -> None:
        checks = [
            (self.role in ROLES, f"role must be one of {', '.join(ROLES)}"),
            (0 <= self.pd_port <= 65535, "pd_port must be in [0, 65535]"),
            (self.pd_heartbeat_interval > 0, "pd_heartbeat_interval must be > 0"),
            (self.pd_peer_timeout > self.pd_heartbeat_interval,
             "pd_peer_timeout must exceed pd_heartbeat_interval"),
            (self.pd_kv_timeout > 0, "pd_kv_timeout must be > 0"),
            (self.pd_staging_memory == 0 or self.pd_staging_memory >= 1 << 20,
             "pd_staging_memory must be 0 or at least 1 MiB"),
        ]
        for ok, message in checks:
            if not ok:
                raise PDConfigError(message)

    @property
    def is_pd(self) -> bool:
        return self.role != "colocated"


def check_pd_engine(page_size: int, window: int | None) -> None:
    """PD needs each request's SWA tail pinned while it moves: the lock a request holds
    pins the window before its committed end, which covers the tail
    `[page_floor(L - W), L)` unless page_size == 1 or W % page_size == 1 (then one
    page of the tail may sit in an unpinned tree node that eviction could take)."""
    if window is None:
        return
    if page_size == 1 or window % page_size == 1:
        raise PDConfigError(
            f"PD serving needs page_size > 1 and window % page_size != 1 (window {window}, "
            f"page_size {page_size}): pick another --page-size")


@dataclass(frozen=True)
class RouterConfig:
    """Settings of `swakv router`."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    health_interval: float = 1.0
    max_request_bytes: int = 4 << 20
    log_level: str = "info"

    def __post_init__(self) -> None:
        urls = self.prefill + self.decode
        checks = [
            (all(u.startswith(("http://", "https://")) for u in urls),
             "worker URLs must start with http:// or https://"),
            (1 <= self.port <= 65535 or self.port == 0, "port must be in [1, 65535] (0: any)"),
            (self.health_interval > 0, "health_interval must be > 0"),
            (self.max_request_bytes >= 1024, "max_request_bytes must be >= 1024"),
            (self.log_level in ("debug", "info", "warning", "error"),
             "log_level must be debug, info, warning or error"),
        ]
        for ok, message in checks:
            if not ok:
                raise PDConfigError(message)
