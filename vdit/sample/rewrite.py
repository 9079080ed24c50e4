"""Prompt rewriting: a short prompt expanded into one detailed caption by a language model the
user runs behind an OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp's
server, a hosted API), before sampling. `vdit sample --rewrite-prompt` (docs/sampling.md).

Nothing is sent unless asked (the flag; training's end-of-run samples never rewrite). Each
prompt is one request through the `openai` client (an optional extra: pip install
'vdit[rewrite]'), each try waits at most `timeout_s` for the server, and a try that timed out,
found no server or got HTTP 408/409/429/5xx is retried once; a refusal (another HTTP error), an
answer that is not JSON and an empty answer are not. The key is read from the environment
variable that `api_key_env` names and goes only into the request's Authorization header: no
record, message or log line holds it (error texts are scrubbed of it).

Every sampling path calls `rewrite_prompts` and records its results:

    settings = settings_from_args(args, cfg.sample.rewrite)  # None: no --rewrite-prompt
    if settings is not None:
        results = rewrite_prompts(prompts, settings, token_budget(cfg.text))
        prompts = [r.text for r in results]               # what the model is conditioned on
    ... generate from prompts ...
    write_samples(out, videos, prompts, num, fps, ..., rewrites=results)

`vdit/sample/generate.py: sample_run` does this for vdit runs and exports (`rewrite=settings`).
A path with its own text encoder (`vdit sample --pipeline PATH`) passes a `TokenBudget` of its
tokenizer, e.g. `TokenBudget(lambda t: len(tok(t).input_ids), 512, "the umt5 tokenizer")`, and
its base settings `RewriteConfig()` when it has no vdit config. With on_error 'stop' a failure
raises `RewriteError` (a ConfigError: `vdit sample: error: ...`) before anything is generated;
with 'original' it warns and that prompt is sampled as given (its result says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vdit.config import ConfigError, parse_overrides, to_dict
from vdit.config.loading import section_from_dict
from vdit.config.sections import RewriteConfig, TextConfig

EXTRA = "pip install 'vdit[rewrite]'"
RETRY_PAUSE_S = 0.5  # before the one retry
TRANSIENT_STATUS = (408, 409, 429)  # and >= 500: retried once

DEFAULT_SYSTEM = (
    "You rewrite a short prompt for a text-to-video model into the kind of caption it was "
    "trained on. Reply with exactly one caption and nothing else: a single paragraph of plain "
    "prose that describes what is seen in the video, in the present tense: the subjects and "
    "their appearance (colours, sizes, materials), where they are, how they move and interact "
    "from start to end, the setting and background, the lighting, and the camera's view and "
    "motion. Keep every detail the prompt gives and contradict none; add only visible, "
    "concrete details; no sound, no story, no lists, no headings, no quotation marks. At most "
    "120 words."
)


class RewriteError(ConfigError):
    """Prompt rewriting could not be done as asked (a ConfigError, so `vdit` reports it in one
    `vdit sample: error:` line)."""


@dataclass(frozen=True)
class TokenBudget:
    """How the text encoder of a sampling path counts a caption's tokens, and how many it
    reads (`max_length`): a longer rewritten prompt is reported as truncated."""

    count: Callable[[str], int]
    max_length: int
    encoder: str  # for messages: "the word tokenizer (text.max_length)"


def token_budget(text: TextConfig) -> TokenBudget:
    """The budget of a vdit run's text encoder: the word tokenizer's BOS + one token per word
    (text.encoder transformer), or the T5 tokenizer of text.checkpoint with its </s>."""
    if text.encoder == "transformer":
        from vdit.models.text import WordTokenizer

        return TokenBudget(lambda t: 1 + len(WordTokenizer.split(t)), text.max_length,
                           "the word tokenizer (text.max_length)")
    from vdit.data.captions import encoder_folder
    from vdit.io.hf_t5 import load_tokenizer

    tokenizer = load_tokenizer(encoder_folder(text.checkpoint, text.checkpoint_sha256))

    def count(t: str) -> int:
        _, mask, _ = tokenizer.tokenize([t], max(1 << 14, text.max_length))
        return int(mask.sum())

    return TokenBudget(count, text.max_length, "the T5 tokenizer (text.max_length)")


@dataclass(frozen=True)
class RewriteResult:
    """One prompt's rewrite. `text` is what the model is conditioned on: the rewritten prompt,
    or the prompt as given when rewriting failed under on_error 'original' (`error` says why)."""

    prompt: str  # as the user gave it
    text: str
    rewritten: bool
    model: str  # the endpoint's name for the model that answered (else the one asked for)
    settings: dict[str, Any]  # `settings_record`: no key, only the variable's name
    error: str | None = None
    tokens: int | None = None  # of `text`, counted by the text encoder's tokenizer
    max_length: int | None = None
    finish_reason: str | None = None  # the endpoint's ("length": cut by max_tokens)

    @property
    def truncated(self) -> bool:
        return self.tokens is not None and self.max_length is not None and (
            self.tokens > self.max_length)

    def record(self) -> dict[str, Any]:
        """The video's provenance entry ("prompt_rewrite" in its sidecar and prompts.json)."""
        return {"user_prompt": self.prompt, "rewritten": self.rewritten, "model": self.model,
                "error": self.error, "tokens": self.tokens, "max_length": self.max_length,
                "truncated": self.truncated, "finish_reason": self.finish_reason,
                "settings": self.settings}


def endpoint_url(endpoint: str) -> str:
    """The chat-completions URL as recorded and shown: `.../v1` or `.../v1/chat/completions`
    alike, without user:password, query or fragment (they may hold secrets)."""
    parts = urlsplit(endpoint.rstrip("/"))
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def _base_url(endpoint: str) -> str:
    """What the openai client is given: the endpoint without /chat/completions (kept with its
    user:password and query, which the client sends)."""
    url = endpoint.rstrip("/")
    return url[: -len("/chat/completions")] if url.endswith("/chat/completions") else url


def settings_record(settings: RewriteConfig) -> dict[str, Any]:
    """The settings as recorded: every key, the endpoint as `endpoint_url` shows it, the
    instruction actually sent, the key's variable name (never its value)."""
    out = to_dict(settings)
    out["endpoint"] = endpoint_url(settings.endpoint)
    out["system"] = settings.system or DEFAULT_SYSTEM
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--rewrite-prompt` and `--rewrite KEY=VALUE` on a sampling command."""
    parser.add_argument("--rewrite-prompt", action="store_true",
                        help="expand each prompt into a detailed caption with the language model "
                        "at sample.rewrite.endpoint first (needs pip install 'vdit[rewrite]'); "
                        "both prompts are recorded")
    parser.add_argument("--rewrite", action="append", default=[], metavar="KEY=VALUE",
                        help="a sample.rewrite setting for --rewrite-prompt (repeatable): "
                        "endpoint, model, system, api_key_env, timeout_s, max_tokens, seed, "
                        "temperature, on_error")


def settings_from_args(args: argparse.Namespace,
                       base: RewriteConfig | None = None) -> RewriteConfig | None:
    """The rewrite settings of a command (`base`, e.g. the run's sample.rewrite, with its
    --rewrite overrides), or None without --rewrite-prompt. Refuses, naming the key, bad
    values and a missing endpoint or model."""
    overrides = list(getattr(args, "rewrite", None) or [])
    if not getattr(args, "rewrite_prompt", False):
        if overrides:
            raise ConfigError("--rewrite sets sample.rewrite keys for --rewrite-prompt; add "
                              "--rewrite-prompt to rewrite the prompts")
        return None
    # Values are YAML scalars (seed=null, timeout_s=30), except the instruction, taken as
    # written: prose holds colons.
    system = [o[len("system="):] for o in overrides if o.startswith("system=")]
    tree = parse_overrides([f"sample.rewrite.{o}" for o in overrides
                            if not o.startswith("system=")])
    merged = to_dict(base or RewriteConfig()) | tree.get("sample", {}).get("rewrite", {})
    if system:
        merged["system"] = system[-1]
    settings = section_from_dict(RewriteConfig, merged, "sample.rewrite")
    missing = [k for k in ("endpoint", "model") if not getattr(settings, k)]
    if missing:
        raise ConfigError(
            f"--rewrite-prompt needs sample.rewrite.{' and sample.rewrite.'.join(missing)}, "
            "e.g. --rewrite endpoint=http://127.0.0.1:8000/v1 --rewrite model=MODEL (the "
            "OpenAI-compatible server you run and the model name it serves)")
    return settings


class _Failure(Exception):
    def __init__(self, what: str, retry: bool = False):
        super().__init__(what)
        self.what, self.retry = what, retry


def _api_key(settings: RewriteConfig) -> str:
    if not settings.api_key_env:
        return "none"  # the client needs one; servers without keys ignore it
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        raise RewriteError(f"sample.rewrite.api_key_env: the environment variable "
                           f"{settings.api_key_env} is not set (it should hold the key for "
                           f"{endpoint_url(settings.endpoint)})")
    return key


def _client(settings: RewriteConfig, key: str):
    try:
        import openai
    except ImportError:
        raise RewriteError("--rewrite-prompt talks to the endpoint through the optional "
                           f"package openai: {EXTRA} (or pip install openai)") from None
    return openai, openai.OpenAI(base_url=_base_url(settings.endpoint), api_key=key,
                                 timeout=settings.timeout_s, max_retries=0)


def _warn_cleartext(settings: RewriteConfig) -> None:
    parts = urlsplit(settings.endpoint)
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if settings.api_key_env and parts.scheme == "http" and not local:
        print(f"warning: prompt rewriting: the key in ${settings.api_key_env} is sent to "
              f"{parts.hostname} over plain http (not encrypted); use an https:// endpoint",
              file=sys.stderr)


def _snippet(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def clean_answer(text: str) -> str:
    """The caption in a model's answer: reasoning (<think>...</think>) dropped, whitespace
    collapsed to single spaces, wrapping quotation marks removed."""
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)
    text = " ".join(text.split())
    while len(text) >= 2 and text[0] + text[-1] in ('""', "''", "“”", "‘’", "``"):
        text = text[1:-1].strip()
    return text


def _ask(openai: Any, client: Any, settings: RewriteConfig, prompt: str
         ) -> tuple[str, str, str | None]:
    """One try -> (caption, model name, finish_reason), or _Failure saying what went wrong."""
    extra: dict[str, Any] = {} if settings.seed is None else {"seed": settings.seed}
    messages = [{"role": "system", "content": settings.system or DEFAULT_SYSTEM},
                {"role": "user", "content": prompt}]
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=settings.model, messages=messages, max_tokens=settings.max_tokens,
            temperature=settings.temperature, **extra)
    except openai.APITimeoutError:
        raise _Failure(f"timed out (no answer within timeout_s={settings.timeout_s:g} s)",
                       retry=True) from None
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        what = ("refused the connection" if "refused" in str(cause).lower()
                else f"could not be reached ({cause})")
        raise _Failure(what, retry=True) from None
    except openai.APIStatusError as e:
        status = e.status_code
        detail = re.sub(r"^Error code: \d+ - ", "", str(e.message))
        raise _Failure(f"refused the request: HTTP {status} {_snippet(detail)}",
                       retry=status in TRANSIENT_STATUS or status >= 500) from None
    except openai.APIError as e:
        raise _Failure(f"failed: {type(e).__name__}: {e}") from None
    body_text = raw.http_response.text
    try:
        body = json.loads(body_text)
    except ValueError:
        raise _Failure(f"answered with something that is not JSON: {_snippet(body_text)}"
                       ) from None
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Failure("answered JSON that is not a chat completion (no "
                       f"choices[0].message.content): {_snippet(body_text)}") from None
    caption = clean_answer(content) if isinstance(content, str) else ""
    if not caption:
        raise _Failure("gave an empty answer")
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    reason = choice.get("finish_reason") if isinstance(choice, dict) else None
    return caption, model or settings.model, reason if isinstance(reason, str) else None


def _rewrite_one(openai: Any, client: Any, settings: RewriteConfig, prompt: str):
    """At most two tries (one retry, for transient failures only)."""
    for attempt in (1, 2):
        try:
            return _ask(openai, client, settings, prompt)
        except _Failure as f:
            if not f.retry or attempt == 2:
                tries = " (after one retry)" if attempt == 2 else ""
                raise _Failure(f.what + tries) from None
        time.sleep(RETRY_PAUSE_S)
    raise AssertionError("unreachable")


def rewrite_prompts(prompts: Sequence[str], settings: RewriteConfig,
                    budget: TokenBudget | None = None) -> list[RewriteResult]:
    """Each prompt rewritten by the endpoint of `settings` (one request each, in order) ->
    one RewriteResult per prompt. `budget` (the text encoder's tokenizer and max_length)
    reports a caption longer than the encoder reads, on stderr and in the result.

    on_error 'stop': the first failure raises RewriteError naming the endpoint and what went
    wrong; 'original': it is printed as a warning and that prompt is kept as given. A missing
    `openai` package or key variable always raises."""
    key = _api_key(settings)
    openai, client = _client(settings, key)
    url, record = endpoint_url(settings.endpoint), settings_record(settings)

    def scrub(text: str) -> str:
        return text.replace(key, "***") if settings.api_key_env else text

    _warn_cleartext(settings)
    results = []
    try:
        for i, prompt in enumerate(prompts):
            try:
                caption, model, reason = _rewrite_one(openai, client, settings, prompt)
            except _Failure as f:
                error = scrub(f.what)  # a server may echo the key back
                what = f"prompt rewriting: {url} {error}"
                if settings.on_error == "stop":
                    raise RewriteError(f"{what} (prompt {i + 1}: {_snippet(prompt)}); nothing "
                                       "was generated. Set sample.rewrite.on_error=original "
                                       "(--rewrite on_error=original) to sample the prompts "
                                       "as given instead") from None
                print(f"warning: {what}; prompt {i + 1} is sampled as given: "
                      f"{_snippet(prompt)}", file=sys.stderr)
                results.append(_measured(RewriteResult(
                    prompt, prompt, False, settings.model, record, error=error), budget, i))
                continue
            print(scrub(f"prompt {i + 1} rewritten by {model}: {caption}"), file=sys.stderr)
            results.append(_measured(RewriteResult(prompt, caption, True, model, record,
                                                   finish_reason=reason), budget, i))
    finally:
        client.close()
    return results


def _measured(result: RewriteResult, budget: TokenBudget | None, i: int) -> RewriteResult:
    """`result` with its token count; a truncated caption is reported on stderr."""
    if budget is None:
        return result
    out = dataclasses.replace(result, tokens=budget.count(result.text),
                              max_length=budget.max_length)
    if out.truncated and out.rewritten:
        print(f"warning: prompt rewriting: the rewritten prompt {i + 1} is {out.tokens} "
              f"tokens for {budget.encoder}, which reads {out.max_length}: it is truncated "
              f"(the rest is not seen); ask for shorter captions (sample.rewrite.system or "
              f"max_tokens)", file=sys.stderr)
    if out.rewritten and out.finish_reason == "length":
        print(f"warning: prompt rewriting: the answer for prompt {i + 1} was cut at "
              f"max_tokens={result.settings.get('max_tokens')}", file=sys.stderr)
    return out
