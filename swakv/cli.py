"""`swakv serve | generate | settings`.

Flags come from the frozen config dataclasses (ServerConfig, EngineConfig): one
flag per field, named after it (`kv_memory` -> `--kv-memory`), with the field's
`help` metadata and default. Booleans get `--x / --no-x`; `X | None` fields take
an X and default to None ("auto").
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence

from swakv.config import EngineConfig, ServerConfig
from swakv.plan.cli import register as register_planning

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_number(text: str) -> float:
    """A float, optionally with a size suffix: '0.25', '2e9', '512M', '2GiB' (= 2 * 2**30).

    K/M/G/T are decimal (1000**k) unless followed by 'i' (1024**k).
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a number or size: {text!r}")
    value, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = " kmgt".index(unit) if unit else 0
    return value * (1024 if binary else 1000) ** power


def _inner_type(tp) -> tuple[type, bool]:
    """(base type, optional) of an annotation like `int`, `float | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type,
                    only: Iterable[str] | None = None) -> None:
    """One flag per dataclass field of `cls` (or only the named ones)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        base, optional = _inner_type(hints[f.name])
        help_text = f.metadata.get("help", "") + (" (default: %(default)s)"
                                                  if f.default is not None else "")
        kw: dict = {"dest": f.name, "default": f.default, "help": help_text}
        if base is bool:
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = parse_number if base is float else base
        kw["metavar"] = {int: "N", float: "X", str: "STR"}.get(base, "VALUE")
        if "memory" in f.name:
            kw["metavar"] = "SIZE"
            kw["help"] += "; sizes like 2GiB or 512M are accepted"
        group.add_argument(flag_name(f.name), **kw)


def config_from_args(ns: argparse.Namespace, cls: type, only: Iterable[str] | None = None):
    names = [f.name for f in dataclasses.fields(cls) if only is None or f.name in only]
    return cls(**{n: getattr(ns, n) for n in names})


def settings_markdown() -> str:
    """The README settings table, generated from the dataclasses' help text."""
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for cls in (ServerConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            default = "auto" if f.default is None else f"`{f.default}`"
            text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{flag_name(f.name)}` | {default} | {text} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swakv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Run the OpenAI-compatible HTTP server.")
    add_config_args(serve, ServerConfig)
    add_config_args(serve, EngineConfig)

    gen = sub.add_parser("generate", help="print a streamed completion (in-process, no server)",
                         description="Print a streamed completion of PROMPT (no server).")
    gen.add_argument("prompt", help="prompt text")
    add_config_args(gen, ServerConfig, only=["model"])
    add_config_args(gen, EngineConfig)
    s = gen.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    s.add_argument("--top-k", type=int, default=0, help="0 disables top-k (default: 0)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the chat template")

    sub.add_parser("settings", help="print the settings table (markdown) of all flags")
    register_planning(sub)  # plan, simulate: set `run`
    return parser


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        server_cfg = config_from_args(ns, ServerConfig)
        engine_cfg = config_from_args(ns, EngineConfig)
    except ValueError as e:
        parser.error(str(e))
    _setup_logging(server_cfg.log_level)
    from swakv.server.app import run_server

    return run_server(engine_cfg, server_cfg)


def cmd_generate(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from swakv.sampling_params import SamplingParams

    try:
        engine_cfg = config_from_args(ns, EngineConfig)
        params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature,
                                top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed,
                                stop=tuple(ns.stop))
    except ValueError as e:
        parser.error(str(e))
    _setup_logging("warning")
    from swakv.engine.llm import LLM

    llm = LLM(ns.model, **dataclasses.asdict(engine_cfg))
    prompt = (llm.chat_prompt([{"role": "user", "content": ns.prompt}]) if ns.chat
              else ns.prompt)
    try:
        for chunk in llm.stream(prompt, params):
            sys.stdout.write(chunk.delta_text)
            sys.stdout.flush()
    except ValueError as e:  # PromptTooLong, EmptyPrompt
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if hasattr(ns, "run"):
        return ns.run(ns)
    if ns.command == "serve":
        return cmd_serve(ns, _sub(parser, "serve"))
    if ns.command == "generate":
        return cmd_generate(ns, _sub(parser, "generate"))
    print(settings_markdown())
    return 0


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


if __name__ == "__main__":
    sys.exit(main())
