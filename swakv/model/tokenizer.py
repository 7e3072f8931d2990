"""Tokenizer, incremental detokenizer and chat template for a model directory.

Run time uses only the `tokenizers` package and jinja2 (sandboxed); `transformers`
is imported once, at GGUF conversion time, to turn the GGUF vocabulary into a
`tokenizer.json` (`save_tokenizer_from_gguf`).

Files of a model directory this module reads / writes:
- `tokenizer.json`: a `tokenizers` fast tokenizer (special tokens flagged);
- `tokenizer_config.json`: `bos_token`, `eos_token`, `pad_token`, `unk_token`,
  optional `chat_template`;
- `chat_template.jinja`: the chat template (preferred over the config key).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from swakv.model.jsonfile import read_json_object

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
END_OF_TURN = "<end_of_turn>"

# The Gemma 3 chat template as shipped in Google's HF tokenizer_config.json. GGUF
# files that lack `tokenizer.chat_template` (the bundled 270M one does) get this.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerLoadError(RuntimeError):
    """Tokenizer files are missing or corrupt."""


class ChatTemplateError(ValueError):
    """The chat template is missing or raised while rendering (e.g. bad role order)."""


class Tokenizer:
    """A fast tokenizer plus the model's special tokens and chat template.

    `encode(text)` prepends `bos_id` (when add_bos and the model has one) to the
    tokenization of `text`; special-token strings inside `text` (for example
    "<start_of_turn>") map to their single ids.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._tok = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template
        self.bos_id = self._maybe_id(self.special_tokens.get("bos_token"))
        self.pad_id = self._maybe_id(self.special_tokens.get("pad_token"))
        self.eos_ids = self._collect_eos(extra_eos_ids)
        self._template: Any = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Load `tokenizer.json` (+ config and chat template) from a model directory.

        `extra_eos_ids` (e.g. the model config's eos ids) are added to `eos_ids`.
        """
        path = Path(path)
        tok_file = path / TOKENIZER_FILE
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # missing file or JSON/model error from the Rust side
            raise TokenizerLoadError(f"cannot read tokenizer file {tok_file}: {e}") from e
        cfg = _read_json(path / TOKENIZER_CONFIG_FILE)
        special = {k: _token_content(cfg.get(k)) for k in _SPECIAL_KEYS}
        return cls(backend, special, _read_chat_template(path, cfg), extra_eos_ids)

    def _maybe_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _collect_eos(self, extra: Iterable[int]) -> tuple[int, ...]:
        ids: list[int] = []
        for cand in (
            self._maybe_id(self.special_tokens.get("eos_token")),
            self._maybe_id(END_OF_TURN),
            *extra,
        ):
            if cand is not None and cand not in ids:
                ids.append(int(cand))
        return tuple(ids)

    # ----------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab + added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with `bos_id` first when `add_bos` and one exists.

        Lone surrogates (not encodable as UTF-8, e.g. from JSON "\\ud800") are
        tokenized as "?". Goes through `encode_batch`, which releases the GIL while
        it works (`encode` holds it: a 4 MiB prompt would stall every other thread,
        the server's event loop included, for seconds); the ids are the same.
        """
        try:
            ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:
            clean = text.encode("utf-8", "replace").decode("utf-8")
            ids = self._tok.encode_batch([clean], add_special_tokens=False)[0].ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 byte sequences decode to U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------- chat template

    def set_chat_template(self, source: str) -> None:
        """Use the jinja template `source` instead of the model's (compiled now, so a
        broken template fails at start-up with ChatTemplateError, not per request)."""
        self._template = _compile_template(source)
        self.chat_template = source

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render the model's jinja chat template (sandboxed) to a prompt string.

        The template sees `messages`, `add_generation_prompt`, the special tokens
        (`bos_token`, `eos_token`, ...) and `kwargs`, like transformers does. Encode
        the result with `encode(prompt, add_bos=False)`: Gemma's template already
        starts with `bos_token`.
        """
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **context
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja errors, sandbox violations
            raise ChatTemplateError(f"chat template failed: {e}") from e


class IncrementalDecoder:
    """Turns a token stream into text deltas without splitting multi-byte characters.

    Invariants: every push returns text free of a trailing partial character (text
    is held back while the decoded tail ends in U+FFFD, e.g. after 2 of the 4
    byte-fallback tokens of an emoji); the text emitted so far is always a prefix of
    `tokenizer.decode(ids)` once the stream is complete; and for a stream of
    complete characters `"".join(push(t) for t in ids) + flush() == decode(ids)`.
    A stream cut inside a character yields U+FFFD for the dangling bytes at flush.
    Only the ids from `_prefix` on are re-decoded, so each push costs O(few tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were already emitted as text
        self._read = 0  # ids[_read:] are pending

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(emitted) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Return any held-back text (invalid trailing bytes become U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :]


# --------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json_object(path, TokenizerLoadError)


def _token_content(value: Any) -> str | None:
    """A special token entry is a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(path: Path, cfg: Mapping[str, Any]) -> str | None:
    jinja_file = path / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def chat_template_source(value: str) -> str:
    """`--chat-template VALUE`: the contents of file VALUE, or VALUE itself when it is a
    template (contains '{{' or '{%'), like vLLM. ChatTemplateError otherwise."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read chat template file {path}: {e}") from e
    if "{{" in value or "{%" in value:
        return value
    raise ChatTemplateError(f"--chat-template {value!r}: no such file (give a jinja file or "
                            "the template itself)")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> Any:
    """Compile like transformers: sandboxed, trim_blocks, lstrip_blocks, loopcontrols."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"invalid chat template: {e}") from e


# ------------------------------------------------------------ GGUF conversion


def save_tokenizer_from_gguf(
    gguf_path: Path, out_dir: Path, chat_template: str | None = None
) -> None:
    """Convert the GGUF's tokenizer (via transformers, once) into `out_dir`.

    Writes tokenizer.json, tokenizer_config.json and chat_template.jinja
    (`chat_template`, i.e. the GGUF's `tokenizer.chat_template`, else
    GEMMA3_CHAT_TEMPLATE). Slow (~20-60 s for a 262k vocabulary: transformers
    re-parses the GGUF metadata); only conversion calls it.
    """
    from transformers import AutoTokenizer

    template = chat_template or GEMMA3_CHAT_TEMPLATE
    hf_tok = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    hf_tok.backend_tokenizer.save(str(out_dir / TOKENIZER_FILE))
    cfg = {k: getattr(hf_tok, k, None) for k in (*_SPECIAL_KEYS, "mask_token")}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    cfg |= {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    write_tokenizer_config(out_dir, cfg, template)


def write_tokenizer_config(
    out_dir: Path, cfg: Mapping[str, Any], chat_template: str | None
) -> None:
    """Write tokenizer_config.json (with `chat_template`) and chat_template.jinja."""
    data = dict(cfg)
    if chat_template is not None:
        data["chat_template"] = chat_template
        (out_dir / CHAT_TEMPLATE_FILE).write_text(chat_template)
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False))


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Tokenizer of a resolved model dir; eos_ids include config.json's eos ids."""
    path = Path(model_dir)
    cfg = _read_json(path / "config.json")
    eos = cfg.get("eos_token_id")
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return Tokenizer.from_dir(path, extra_eos_ids=[int(e) for e in extra])
