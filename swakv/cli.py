"""`swakv serve | router | generate | bench serve | settings | plan | simulate`.

Flags come from the frozen config dataclasses (ServerConfig, EngineConfig): one
flag per field, named after it (`kv_memory` -> `--kv-memory`), plus the aliases
users know from vLLM, SGLang and llama-server (`--max-model-len` -> max_context),
all with the field's `help` metadata and default. Booleans get `--x / --no-x` (for
every alias too); `X | None` fields take an X and default to None ("auto").

A subcommand is one `add_<name>(subparsers)` function that builds its parser and
sets `run=<function(ns, parser) -> exit code>`; `build_parser` calls each.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence

from swakv.config import EngineConfig, ServerConfig, parse_size
from swakv.disagg.config import PDConfig, RouterConfig
from swakv.plan.cli import register as register_planning

Runner = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def parse_number(text: str) -> float:
    """A float, optionally with a size suffix: '0.25', '2e9', '512M', '2GiB' (= 2 * 2**30)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _inner_type(tp) -> tuple[type, bool]:
    """(base type, optional) of an annotation like `int`, `float | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_flags(f: dataclasses.Field) -> list[str]:
    """The swakv flag of a config field first, then its aliases."""
    return [flag_name(f.name), *f.metadata.get("aliases", ())]


def _argparse_type(parse: Callable[[str], typing.Any]) -> Callable[[str], typing.Any]:
    """Wrap a parser so that its ValueError message reaches the user (argparse would
    print only 'invalid value')."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_config_args(parser: argparse.ArgumentParser, cls: type,
                    only: Iterable[str] | None = None) -> None:
    """One flag (plus its aliases) per dataclass field of `cls` (or only the named ones)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        base, _optional = _inner_type(hints[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%") + (
            " (default: %(default)s)" if f.default is not None else "")
        kw: dict = {"dest": f.name, "default": f.default, "help": help_text}
        if base is bool:
            group.add_argument(*field_flags(f), action=argparse.BooleanOptionalAction, **kw)
            continue
        parse = f.metadata.get("parse") or (parse_size if base is float else base)
        kw["type"] = _argparse_type(parse)
        kw["metavar"] = {int: "N", float: "X", str: "STR"}.get(base, "VALUE")
        if "memory" in f.name:
            kw["metavar"] = "SIZE"
        group.add_argument(*field_flags(f), **kw)


def config_from_args(ns: argparse.Namespace, cls: type, only: Iterable[str] | None = None):
    names = [f.name for f in dataclasses.fields(cls) if only is None or f.name in only]
    return cls(**{n: getattr(ns, n) for n in names})


def settings_markdown() -> str:
    """The README settings table, generated from the dataclasses' help text."""
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for cls in (ServerConfig, EngineConfig, PDConfig):
        for f in dataclasses.fields(cls):
            default = "auto" if f.default is None else f"`{f.default}`"
            text = f.metadata.get("help", "").replace("|", "\\|")
            flag, *aliases = field_flags(f)
            cell = f"`{flag}`" + (" (also " + ", ".join(f"`{a}`" for a in aliases) + ")"
                                  if aliases else "")
            lines.append(f"| {cell} | {default} | {text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- commands


class CliError(Exception):
    """A user error that ends the command with one line on stderr and exit code 1."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this model (or a file named by a flag) cannot be used"."""
    from swakv.model.generation_config import GenerationConfigError
    from swakv.model.loader import ModelLoadError
    from swakv.model.tokenizer import ChatTemplateError, TokenizerLoadError

    return (ModelLoadError, TokenizerLoadError, ChatTemplateError, GenerationConfigError,
            OSError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_serve(sub) -> None:
    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Run the OpenAI-compatible HTTP server on MODEL (default: the bundled "
                    "Gemma 3 270M base model). Flags of vLLM, SGLang and llama-server that "
                    "mean the same thing are accepted as aliases.")
    serve.add_argument("model_arg", nargs="?", metavar="MODEL", default=None,
                       help="model to serve (same as --model)")
    add_config_args(serve, ServerConfig)
    add_config_args(serve, EngineConfig)
    add_config_args(serve, PDConfig)
    serve.set_defaults(run=cmd_serve)


def serve_configs(ns: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The configs of parsed `serve` flags; the positional MODEL is the same as --model
    (giving both, differently, is a ValueError like any bad setting)."""
    if ns.model_arg is not None:
        if ns.model != ServerConfig.model and ns.model != ns.model_arg:
            raise ValueError(f"model given twice: {ns.model_arg!r} and --model {ns.model!r}")
        ns.model = ns.model_arg
    return config_from_args(ns, ServerConfig), config_from_args(ns, EngineConfig)


def cmd_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        server_cfg, engine_cfg = serve_configs(ns)
        pd_cfg = config_from_args(ns, PDConfig)
    except ValueError as e:
        parser.error(str(e))
    _setup_logging(server_cfg.log_level)
    try:
        if pd_cfg.is_pd:
            from swakv.server.pd_app import run_pd_server

            return run_pd_server(engine_cfg, server_cfg, pd_cfg)
        from swakv.server.app import run_server

        return run_server(engine_cfg, server_cfg)
    except _load_errors() as e:
        print(f"swakv serve: error: {_one_line(e)}", file=sys.stderr)
        return 1


def add_router(sub) -> None:
    router = sub.add_parser("router", help="one OpenAI endpoint over PD prefill/decode workers",
                            description="Route OpenAI requests to PD prefill and decode workers.")
    router.add_argument("--prefill", nargs="+", default=[], metavar="URL",
                        help="prefill workers' HTTP URLs (more may register: POST /pd/register)")
    router.add_argument("--decode", nargs="+", default=[], metavar="URL",
                        help="decode workers' HTTP URLs")
    router.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    router.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    router.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (forwarded to the workers)")
    router.add_argument("--health-interval", type=float, default=1.0,
                        help="seconds between worker health checks (default: %(default)s)")
    router.add_argument("--log-level", default="info", help="debug, info, warning or error")
    router.set_defaults(run=cmd_router)


def cmd_router(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = RouterConfig(prefill=tuple(ns.prefill), decode=tuple(ns.decode), host=ns.host,
                           port=ns.port, api_key=ns.api_key, health_interval=ns.health_interval,
                           log_level=ns.log_level)
    except ValueError as e:
        parser.error(str(e))
    _setup_logging(cfg.log_level)
    from swakv.server.router import run_router

    return run_router(cfg)


def add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="print a streamed completion (in-process, no server)",
                         description="Print a streamed completion of PROMPT (no server).")
    gen.add_argument("prompt", help="prompt text")
    add_config_args(gen, ServerConfig, only=["model"])
    add_config_args(gen, EngineConfig)
    s = gen.add_argument_group("sampling (unset: the model's generation config, else greedy)")
    s.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    s.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    s.add_argument("--top-k", type=int, default=None, help="0 disables top-k")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the chat template")
    gen.set_defaults(run=cmd_generate)


def cmd_generate(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from swakv.sampling_params import InvalidSamplingParams

    try:
        engine_cfg = config_from_args(ns, EngineConfig)
    except ValueError as e:
        parser.error(str(e))
    _setup_logging("warning")
    from swakv.engine.llm import LLM

    try:
        llm = LLM(ns.model, **dataclasses.asdict(engine_cfg))
    except _load_errors() as e:
        print(f"swakv generate: error: {_one_line(e)}", file=sys.stderr)
        return 1
    given = {"temperature": ns.temperature, "top_p": ns.top_p, "top_k": ns.top_k}
    try:
        params = llm.default_sampling_params(
            fallback={"temperature": 0.0}, max_tokens=ns.max_tokens, stop=tuple(ns.stop),
            **{k: v for k, v in given.items() if v is not None})
    except InvalidSamplingParams as e:
        parser.error(str(e))
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


def add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (bench serve: load-test a server)",
                           description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from swakv.bench.cli import add_bench_serve

    add_bench_serve(bench_sub)


def add_settings(sub) -> None:
    settings = sub.add_parser("settings", help="print the settings table (markdown) of all flags")
    settings.set_defaults(run=lambda ns, parser: print(settings_markdown()) or 0)


SUBCOMMANDS: tuple[Callable, ...] = (add_serve, add_router, add_generate, add_bench,
                                     add_settings, register_planning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swakv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    """The (nested) subparser `names`, e.g. subparser(p, "bench", "serve")."""
    for name in names:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = actions[0].choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    names = [ns.command] + ([ns.bench_command] if ns.command == "bench" else [])
    try:
        return ns.run(ns, subparser(parser, *names))
    except CliError as e:
        print(f"swakv {' '.join(names)}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
