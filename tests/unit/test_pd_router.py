"""`swakv router` without workers behind it (a real uvicorn server on loopback) and the
PD flags of the CLI. Routing through real workers: tests/integration/test_pd_serving.py."""

from __future__ import annotations

import httpx
import pytest

from swakv.cli import build_parser, config_from_args, main
from swakv.disagg.config import PDConfig, PDConfigError, RouterConfig
from swakv.server.router import WorkerPool, create_router_app
from swakv.server.testing import InProcessServer, free_port


@pytest.fixture
def router():
    with InProcessServer(create_router_app(RouterConfig(health_interval=0.1))) as srv:
        yield srv


def test_without_workers_it_is_unhealthy_and_answers_503(router):
    r = httpx.get(router.url + "/health")
    assert r.status_code == 503 and r.json() == {"status": "unhealthy", "prefill": 0,
                                                 "decode": 0}
    r = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_workers"
    assert "decode" in r.json()["error"]["message"]


def test_register_checks_the_body_and_the_worker(router):
    for body in ({"role": "both", "url": "http://x"}, {"role": "decode"},
                 {"role": "decode", "url": "ftp://x"}, [1]):
        r = httpx.post(router.url + "/pd/register", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
    dead = f"http://127.0.0.1:{free_port()}"
    r = httpx.post(router.url + "/pd/register", json={"role": "decode", "url": dead + "/"})
    assert r.status_code == 200 and r.json() == {"role": "decode", "url": dead, "alive": False}
    workers = httpx.get(router.url + "/pd/workers").json()
    assert [(w["role"], w["url"], w["alive"]) for w in workers] == [("decode", dead, False)]
    assert workers[0]["error"]


def test_a_worker_that_is_up_is_picked_round_robin(router):
    pool = WorkerPool(RouterConfig(decode=("http://a", "http://b/")))
    assert pool.pick("decode") is None  # not checked yet
    for w in pool.workers:
        w.alive = True
    assert [pool.pick("decode").url for _ in range(4)] == ["http://b", "http://a"] * 2
    pool.mark_dead(pool.workers[0], "gone")
    assert [pool.pick("decode").url for _ in range(2)] == ["http://b"] * 2
    prefill = pool.add("prefill", "http://p")
    prefill.alive = True
    assert pool.pick("prefill") is None  # alive but no control address yet
    prefill.control_address = "tcp://127.0.0.1:1"
    assert pool.pick("prefill") is prefill


def test_api_key_and_body_limit():
    cfg = RouterConfig(api_key="k", max_request_bytes=1024)
    with InProcessServer(create_router_app(cfg)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/chat/completions", content=b"x" * 2000,
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 413
        assert httpx.post(srv.url + "/pd/register", json={}).status_code == 401


def test_serve_role_flags():
    ns = build_parser().parse_args(["serve", "--role", "decode", "--pd-kv-timeout", "30",
                                    "--no-pd-swa-tail-prealloc", "--pd-staging-memory", "64MiB"])
    cfg = config_from_args(ns, PDConfig)
    assert cfg == PDConfig(role="decode", pd_kv_timeout=30.0, pd_swa_tail_prealloc=False,
                           pd_staging_memory=64 * 2**20)
    assert config_from_args(build_parser().parse_args(["serve"]), PDConfig) == PDConfig()
    assert not PDConfig().is_pd and cfg.is_pd


@pytest.mark.parametrize("kw", [{"role": "both"}, {"pd_peer_timeout": 0.5},
                                {"pd_staging_memory": 100.0}, {"pd_port": 70000}])
def test_bad_pd_settings(kw):
    with pytest.raises(PDConfigError):
        PDConfig(**kw)


def test_bad_router_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["router", "--decode", "localhost:8001"])
    assert e.value.code == 2 and "http://" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--role", "both"])
