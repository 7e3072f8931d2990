"""`swakv bench serve` against a live `swakv serve` on the tiny model: a small chat +
docs workload produces the JSON (exact request and token counts, prefix hits from the
shared system prompt, /metrics pool samples) and a valid PNG."""

from __future__ import annotations

import json

import pytest

from swakv.bench.report import percentile, throughput_timeline
from swakv.bench.workload import ChatPrompts, ChatWorkload, TokenRange, WorkloadError
from swakv.cli import main
from swakv.server.testing import ServerProcess

PAGE = 4
SESSIONS, TURNS, SYSTEM, USER, OUT = 3, 2, 16, 6, 5
DOCS, DOC_OUT = 2, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny-bench")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=6)
    with ServerProcess.start([str(path), "--page-size", str(PAGE), "--kv-memory", "16MiB",
                              "--num-threads", "1"]) as proc:
        yield proc


def test_bench_serve_writes_json_and_png(server, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "serve", "--base-url", server.url + "/v1", "--sessions", str(SESSIONS),
            "--turns", str(TURNS), "--system-len", str(SYSTEM), "--user-len", str(USER),
            "--output-len", str(OUT), "--docs", str(DOCS), "--doc-len", "30:50",
            "--doc-output-len", str(DOC_OUT), "--token-range", "10:120", "--seed", "3",
            "--scrape-interval", "0.05", "--out", str(out), "--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "TTFT p50" in printed and "prefix-hit tokens" in printed

    doc = json.loads(out.read_text())
    assert doc["server"]["is_swakv"] and doc["server"]["token_ids_returned"]
    assert doc["server"]["model"] == "tiny-bench0"  # the first id of /v1/models
    chat, docs = doc["workloads"]["chat"], doc["workloads"]["docs"]
    assert (chat["requests"], chat["failed"], docs["requests"], docs["failed"]) == (
        SESSIONS * TURNS, 0, DOCS, 0)
    assert chat["output_tokens"] == SESSIONS * TURNS * OUT
    assert docs["output_tokens"] == DOCS * DOC_OUT
    # Turn 1 prompts: system + user; turn 2: + the 5 returned outputs + 6 user tokens.
    assert chat["prompt_tokens"] == SESSIONS * ((SYSTEM + USER) + (SYSTEM + 2 * USER + OUT))
    # Every turn-2 prompt extends its own turn-1 conversation, cached page-aligned:
    # at least page_floor(22) = 20 tokens each, plus the shared system prompt's pages.
    assert chat["prefix_hit_tokens"] >= SESSIONS * 20
    for w in (chat, docs):
        assert w["output_tok_s"] > 0
        assert 0 < w["ttft_s_p50"] <= w["ttft_s_p90"] <= w["ttft_s_p99"]
        assert w["ttft_s_p50"] <= w["latency_s_p50"]
    requests = doc["requests"]
    assert sorted((r["workload"], r["session"], r["turn"]) for r in requests) == sorted(
        [("chat", s, t) for s in range(SESSIONS) for t in range(TURNS)]
        + [("docs", d, 0) for d in range(DOCS)])
    assert all(30 <= r["prompt_tokens"] <= 50 for r in requests if r["workload"] == "docs")
    timeline = doc["timeline"]
    assert sum(v * timeline["bin_s"] for _, v in timeline["output_tok_s"]) == pytest.approx(
        chat["output_tokens"] + docs["output_tokens"])
    assert len(timeline["ttft"]) == SESSIONS * TURNS + DOCS
    pools = timeline["kv_pools"]
    assert len(pools) >= 2
    assert all(0 <= s["full_used"] <= s["full_total"] and s["swa_total"] > 0 for s in pools)
    assert max(s["full_used"] for s in pools) > 0  # the cache holds the conversations

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 600


def test_same_seed_same_prompts():
    w = ChatWorkload(sessions=2, turns=3, system_len=5, user_len=4, output_len=2)
    a, b = ChatPrompts(w, TokenRange(10, 20), 7), ChatPrompts(w, TokenRange(10, 20), 7)
    assert a.first_prompt(1) == b.first_prompt(1)
    assert a.first_prompt(0)[:5] == a.first_prompt(1)[:5]  # the shared system prompt
    assert a.next_prompt(0, 1, [1], [2, 3]) == [1, 2, 3, *a.user[0][1]]
    assert all(10 <= t < 20 for t in a.first_prompt(0))
    assert ChatPrompts(w, TokenRange(10, 20), 8).first_prompt(0) != a.first_prompt(0)


def test_percentile_and_timeline_arithmetic():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 99) == 4.0
    assert percentile([], 50) is None
    from swakv.bench.client import RequestRecord

    r = RequestRecord("docs", 0, 0, 0.0, 10, token_times=[(0.1, 2), (0.6, 1), (1.4, 3)])
    assert throughput_timeline([r], 1.5, 0.5) == [(0.0, 4.0), (0.5, 2.0), (1.0, 6.0)]


@pytest.mark.parametrize("argv,message", [
    (["--token-range", "50:10"], "token range must satisfy 0 <= lo < hi"),
    (["--doc-len", "9:3"], "docs lengths must satisfy 1 <= min <= max"),
    (["--sessions", "0"], "chat sessions must be >= 1"),
])
def test_bad_workload_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unreachable_server_is_one_line(capsys):
    from swakv.server.testing import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "serve", "--base-url", url, "--out", "/dev/null"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"swakv bench serve: error: cannot reach {url}")


def test_workload_error_type():
    with pytest.raises(WorkloadError):
        TokenRange.parse("10-20")
