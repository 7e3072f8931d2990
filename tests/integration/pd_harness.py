"""A prefill and a decode engine in one process: real control plane (pyzmq over
loopback), real Mooncake transfers, the tiny Gemma 3, stepped by the test thread so
that every step is followed by both sides' integrity checks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from swakv.config import EngineConfig
from swakv.disagg.config import PDConfig
from swakv.disagg.control import ControlPlane
from swakv.disagg.decode_worker import DecodeEngine, RoutedPrompt
from swakv.disagg.prefill_worker import PrefillEngine
from swakv.disagg.transfer import MooncakeBackend
from swakv.engine.build import build_engine
from swakv.engine.core import EngineCore, StepOutput
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes

WINDOW, PAGE = 8, 4


def engine_config(**overrides) -> EngineConfig:
    settings = dict(page_size=PAGE, chunk_size=32, max_running_requests=16, frontier_stride=4,
                    decode_reserve=8, num_threads=1)
    settings.update(overrides)
    return EngineConfig(**settings)


def core(tiny_dir: str, full_pages: int, swa_pages: int, **overrides) -> EngineCore:
    return build_engine(tiny_dir, engine_config(**overrides),
                        sizes=PoolSizes(full_pages, swa_pages, PAGE, 0, 0))


def make_prefill(p_core: EngineCore, cfg: PDConfig | None = None) -> PrefillEngine:
    cfg = cfg or PDConfig(role="prefill", pd_heartbeat_interval=0.2, pd_peer_timeout=2.0)
    control = ControlPlane("prefill-test", listen="tcp://127.0.0.1:0",
                           heartbeat_interval=cfg.pd_heartbeat_interval,
                           peer_timeout=cfg.pd_peer_timeout)
    return PrefillEngine(p_core, control, MooncakeBackend(), cfg, "prefill-test")


@dataclass
class Pair:
    prefill: PrefillEngine
    decode: DecodeEngine
    outputs: dict[str, list[StepOutput]] = field(default_factory=dict)

    @classmethod
    def build(cls, p_core: EngineCore, d_core: EngineCore, cfg: PDConfig | None = None
              ) -> Pair:
        cfg = cfg or PDConfig(role="decode", pd_heartbeat_interval=0.2, pd_peer_timeout=2.0)
        prefill = make_prefill(p_core, cfg)
        try:
            d_cp = ControlPlane("decode-test", heartbeat_interval=cfg.pd_heartbeat_interval,
                                peer_timeout=cfg.pd_peer_timeout)
            decode = DecodeEngine(d_core, d_cp, MooncakeBackend(), cfg, "decode-test")
        except BaseException:  # the prefill side's threads and sockets must not outlive it
            prefill.close()
            raise
        return cls(prefill, decode)

    @property
    def address(self) -> str:
        return self.prefill.control.address

    def submit(self, prompt: list[int], params: SamplingParams, rid: str):
        return self.decode.add_request(RoutedPrompt(prompt, self.address), params, rid)

    def step(self) -> None:
        for eng in (self.decode, self.prefill):
            for out in eng.step():
                self.outputs.setdefault(out.request.request_id, []).append(out)
            eng.check_integrity()

    def run(self, reqs, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.done(r.request_id) for r in reqs):
            assert time.monotonic() < deadline, "PD pair made no progress"
            self.step()

    def done(self, rid: str) -> bool:
        outs = self.outputs.get(rid, [])
        return bool(outs) and outs[-1].finished

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.new_token_ids]

    def close(self) -> None:
        self.decode.close()
        self.prefill.close()


def flushed_at_baseline(eng: EngineCore) -> bool:
    eng.flush_cache()
    eng.check_integrity()
    return eng.allocator.available() == eng.allocator.total()
