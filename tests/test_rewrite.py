"""`vdit sample --rewrite-prompt` against a stub OpenAI-compatible server on 127.0.0.1 (no
network): what reaches the text encoder, what is recorded, that the key is never written, each
failure under on_error stop and original, the one-retry bound, and truncation reports."""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import pytest
from conftest import tiny_dict

from vdit.cli import main
from vdit.config import ConfigError, from_dict
from vdit.config.sections import RewriteConfig, TextConfig
from vdit.models.text import WordTokenizer
from vdit.sample import rewrite as rw

KEY = "sk-test-0123456789abcdef-DO-NOT-LEAK"
KEY_ENV = "VDIT_TEST_REWRITE_KEY"
USER_PROMPT = "a red ball falls"
# 17 words: 18 word-tokenizer tokens, past the tiny config's text.max_length of 12.
ANSWER = ("a large red ball falls from the top and bounces twice on the floor then rolls "
          "right")
SERVED_MODEL = "stub-served-model-q4"  # the name the endpoint answers with
FIXTURES = Path(__file__).parent / "fixtures" / "t5"


class Stub:
    """A chat-completions server: `script` is the mode of each request in turn (the last one
    repeats): ok, slow (answers after the client's timeout), garbage (not JSON), refuse (HTTP
    401, the key echoed), busy (HTTP 503), empty (an empty answer)."""

    def __init__(self):
        self.script, self.requests, self.delay = ["ok"], [], 1.0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                mode = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                code, kind, data = 200, "application/json", None
                if mode == "slow":
                    time.sleep(stub.delay)
                if mode == "garbage":
                    kind, data = "text/html", b"<html><body>Bad gateway, sorry</body></html>"
                elif mode in ("refuse", "busy"):
                    code = 401 if mode == "refuse" else 503
                    # echoes the key, as some servers do: vdit must not repeat it
                    message = f"invalid api key {self.headers.get('Authorization')}"
                    data = json.dumps({"error": {"message": message}}).encode()
                else:
                    content = "" if mode == "empty" else f'  "{ANSWER}"\n'
                    data = json.dumps({
                        "id": "c1", "object": "chat.completion", "created": 0,
                        "model": SERVED_MODEL, "choices": [{
                            "index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self, *script: str) -> None:
        self.script, self.requests = list(script or ["ok"]), []


@pytest.fixture(scope="module")
def stub():
    s = Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    """The tiny DiT as a safetensors export (what `vdit export` writes)."""
    from vdit.io.checkpoint import load_params
    from vdit.io.safetensors_io import write_export

    tensors, info = load_params(tiny_run)
    return write_export(tmp_path_factory.mktemp("rewrite") / "export", tensors, info)


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """Every caption the word tokenizer encodes for the model (what its text encoder sees)."""
    seen: list[str] = []
    original = WordTokenizer.encode

    def spy(self, text):
        seen.append(text)
        return original(self, text)

    monkeypatch.setattr(WordTokenizer, "encode", spy)
    return seen


def _settings(stub: Stub, **kw) -> RewriteConfig:
    return RewriteConfig(**{"endpoint": stub.url, "model": "stub", "timeout_s": 0.3} | kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_text(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.mark.filterwarnings("ignore:prompt .* words outside the vocabulary")
def test_rewritten_prompt_reaches_the_encoder_and_both_prompts_are_recorded(
        stub, export, tmp_path, monkeypatch, capsys, caplog, encoded):
    caplog.set_level(logging.DEBUG)  # the openai client's and its HTTP library's logs too
    monkeypatch.setenv(KEY_ENV, KEY)
    stub.reset("ok")
    out = tmp_path / "out"
    argv = ["sample", str(export), "--prompt", USER_PROMPT, "--out", str(out),
            "--rewrite-prompt", "--rewrite", f"endpoint={stub.url}", "--rewrite", "model=stub",
            "--rewrite", f"api_key_env={KEY_ENV}", "--rewrite", "seed=7"]
    assert main(argv) == 0
    logs = capsys.readouterr()

    # The request: the key in the header only, vdit's instruction, the user's prompt.
    (request,) = stub.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "stub" and body["seed"] == 7 and body["max_tokens"] == 300
    assert body["messages"] == [{"role": "system", "content": rw.DEFAULT_SYSTEM},
                                {"role": "user", "content": USER_PROMPT}]

    # The model was conditioned on the rewritten prompt (cleaned of quotes), never the user's.
    assert ANSWER in encoded and USER_PROMPT not in encoded

    # prompts.json: what the model saw, what the user typed, the endpoint's model, settings.
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["prompts"] == [ANSWER] and prompts["user_prompts"] == [USER_PROMPT]
    (entry,) = prompts["prompt_rewrite"]
    assert entry["rewritten"] and entry["model"] == SERVED_MODEL and entry["error"] is None
    settings = entry["settings"]
    assert settings["endpoint"] == f"{stub.url}/chat/completions"
    assert settings["model"] == "stub" and settings["api_key_env"] == KEY_ENV
    assert settings["system"] == rw.DEFAULT_SYSTEM and settings["on_error"] == "stop"
    # Truncation: BOS + 17 words against text.max_length 12, reported and recorded.
    assert (entry["tokens"], entry["max_length"], entry["truncated"]) == (18, 12, True)
    assert "is 18 tokens" in logs.err and "truncated" in logs.err

    # The sidecar and the mp4 tags of the video, named after the user's prompt.
    (video,) = out.glob("*.mp4")
    assert video.name.startswith("00_a-red-ball-falls_")
    sidecar = json.loads(Path(f"{video}.json").read_text())
    assert sidecar["prompt"] == ANSWER and sidecar["prompt_rewrite"] == entry
    with av.open(str(video)) as container:
        tags = dict(container.metadata)
    brief = json.loads(tags["comment"])
    assert brief["prompt_rewritten"] is True and brief["user_prompt"] == USER_PROMPT
    assert brief["rewrite_model"] == SERVED_MODEL and brief["prompt"] == ANSWER
    assert "prompt rewritten" in tags["keywords"] and "rewritten by" in tags["description"]

    # The key is in no file written and in no output or log line.
    assert KEY.encode() not in _all_text(out)
    assert KEY not in logs.out + logs.err + caplog.text
    assert f"rewritten by {SERVED_MODEL}" in logs.err


def test_stop_ends_with_one_error_line_before_anything_is_generated(
        stub, tiny_run, tmp_path, monkeypatch, capsys, encoded):
    monkeypatch.setenv(KEY_ENV, KEY)
    stub.reset("slow")
    out = tmp_path / "out"
    argv = ["sample", str(tiny_run), "--out", str(out), "--rewrite-prompt",
            "--rewrite", f"endpoint={stub.url}/chat/completions", "--rewrite", "model=stub",
            "--rewrite", "timeout_s=0.3", "--rewrite", f"api_key_env={KEY_ENV}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("vdit sample: error:")]
    assert f"prompt rewriting: {stub.url}/chat/completions timed out" in line
    assert "after one retry" in line and "nothing was generated" in line
    assert len(stub.requests) == 2  # one retry, no more
    assert not encoded and not out.exists() and KEY not in err


def test_original_warns_and_samples_the_prompt_as_given(stub, tiny_run, tmp_path, capsys,
                                                        encoded):
    stub.reset("garbage")
    out = tmp_path / "out"
    argv = ["sample", str(tiny_run), "--prompt", USER_PROMPT, "--out", str(out),
            "--rewrite-prompt", "--rewrite", f"endpoint={stub.url}", "--rewrite", "model=stub",
            "--rewrite", "on_error=original"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: prompt rewriting:" in err and "not JSON" in err
    assert encoded == [USER_PROMPT] and len(stub.requests) == 1  # not JSON: no retry
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["prompts"] == [USER_PROMPT]
    (entry,) = prompts["prompt_rewrite"]
    assert not entry["rewritten"] and "not JSON" in entry["error"]
    assert entry["settings"]["on_error"] == "original"
    (video,) = out.glob("*.mp4")
    with av.open(str(video)) as container:
        tags = dict(container.metadata)
    assert "prompt_rewritten" not in json.loads(tags["comment"])
    assert "rewritten" not in tags["keywords"]


# Each failure: the script of answers, what the message says, how many requests were made.
FAILURES = {
    "timeout": (["slow"], "timed out (no answer within timeout_s=0.3 s) (after one retry)", 2),
    "refused": (["refuse"], "refused the request: HTTP 401", 1),
    "busy": (["busy"], "refused the request: HTTP 503", 2),
    "garbage": (["garbage"], "answered with something that is not JSON: '<html>", 1),
    "empty": (["empty"], "gave an empty answer", 1),
    "no server": ([], "refused the connection (after one retry)", 0),
}


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
@pytest.mark.parametrize("on_error", ["stop", "original"])
def test_each_failure_under_stop_and_original(case, on_error, stub, monkeypatch, capsys):
    script, message, requests = FAILURES[case]
    monkeypatch.setattr(rw, "RETRY_PAUSE_S", 0.05)
    stub.reset(*script)
    settings = _settings(stub, on_error=on_error, api_key_env=KEY_ENV)
    if not script:  # nothing listening on that port
        settings = _settings(stub, endpoint=f"http://127.0.0.1:{_free_port()}/v1",
                             on_error=on_error, api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, KEY)
    prompts = [USER_PROMPT, "a blue ball rolls"]
    url = rw.endpoint_url(settings.endpoint)
    if on_error == "stop":
        with pytest.raises(rw.RewriteError) as info:
            rw.rewrite_prompts(prompts, settings)
        text = str(info.value)
        assert text.startswith(f"prompt rewriting: {url} {message}")
        assert "prompt 1" in text and KEY not in text
        assert len(stub.requests) == requests  # stopped at the first prompt
    else:
        results = rw.rewrite_prompts(prompts, settings)
        assert [r.text for r in results] == prompts and not any(r.rewritten for r in results)
        assert all(r.error.startswith(message) and KEY not in r.error for r in results)
        assert len(stub.requests) == 2 * requests
        err = capsys.readouterr().err
        assert err.count(f"warning: prompt rewriting: {url} {message}") == 2
        assert KEY not in err


def test_a_transient_failure_is_retried_once(stub, monkeypatch):
    monkeypatch.setattr(rw, "RETRY_PAUSE_S", 0.05)
    stub.reset("busy", "ok")
    (result,) = rw.rewrite_prompts([USER_PROMPT], _settings(stub))
    assert result.rewritten and result.text == ANSWER and len(stub.requests) == 2
    assert stub.requests[0]["auth"] == "Bearer none"  # no api_key_env: no key of the user's


def test_truncation_is_reported_against_the_encoders_budget(stub, capsys):
    words = rw.token_budget(from_dict(tiny_dict()).text)
    assert words.max_length == 12 and words.count(ANSWER) == 18
    stub.reset("ok")
    (short,) = rw.rewrite_prompts([USER_PROMPT], _settings(stub),
                                  rw.TokenBudget(words.count, 64, "a test encoder"))
    assert (short.tokens, short.truncated) == (18, False)
    assert "truncated" not in capsys.readouterr().err

    # T5 runs count with the T5 folder's tokenizer (its </s> included).
    from vdit.io.hf_t5 import load_tokenizer

    folder = FIXTURES / "t5_v11"
    t5 = rw.token_budget(TextConfig(encoder="t5", checkpoint=str(folder), max_length=8))
    _, mask, _ = load_tokenizer(folder).tokenize([ANSWER], 256)
    assert t5.count(ANSWER) == int(mask.sum()) > 8 and t5.max_length == 8
    (long,) = rw.rewrite_prompts([USER_PROMPT], _settings(stub), t5)
    assert long.truncated and long.tokens == int(mask.sum())
    assert f"is {long.tokens} tokens for the T5 tokenizer" in capsys.readouterr().err


def _args(*overrides: str, enabled: bool = True) -> argparse.Namespace:
    return argparse.Namespace(rewrite_prompt=enabled, rewrite=list(overrides))


def test_settings_are_checked_and_named():
    base = RewriteConfig(endpoint="http://127.0.0.1:1/v1", model="m")
    assert rw.settings_from_args(_args(enabled=False), base) is None  # nothing is sent
    assert rw.settings_from_args(_args("timeout_s=5", "seed=null", "system=Say: more"),
                                 base) == RewriteConfig(endpoint=base.endpoint, model="m",
                                                        timeout_s=5.0, seed=None,
                                                        system="Say: more")
    for overrides, named in [
        (["timeout_s=0"], "sample.rewrite.timeout_s: must be > 0"),
        (["on_error=ignore"], "sample.rewrite.on_error: expected one of 'stop', 'original'"),
        (["endpont=x"], "sample.rewrite.endpont: unknown key (did you mean 'endpoint'?)"),
        (["endpoint=ftp://host"], "sample.rewrite.endpoint: must be an http"),
        (["temperature=3"], "sample.rewrite.temperature: must be in [0, 2]"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(named)):
            rw.settings_from_args(_args(*overrides), base)
    with pytest.raises(ConfigError) as info:  # a key pasted where its variable's name goes
        rw.settings_from_args(_args(f"api_key_env={KEY}"), base)
    assert "api_key_env: must be the NAME" in str(info.value) and KEY not in str(info.value)
    with pytest.raises(ConfigError, match=r"needs sample\.rewrite\.endpoint and sample\.rewrite"):
        rw.settings_from_args(_args(), RewriteConfig())
    with pytest.raises(ConfigError, match="add --rewrite-prompt"):
        rw.settings_from_args(_args("model=m", enabled=False), base)
    # The section in a config file is checked like every other.
    d = tiny_dict()
    d["sample"]["rewrite"] = {"on_error": "stop", "max_tokens": 0}
    with pytest.raises(ConfigError, match=r"sample\.rewrite\.max_tokens: must be > 0"):
        from_dict(d)


def test_setup_problems_always_stop_and_name_the_fix(stub, monkeypatch):
    stub.reset("ok")
    settings = _settings(stub, api_key_env=KEY_ENV, on_error="original")
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(rw.RewriteError, match=f"{KEY_ENV} is not set"):
        rw.rewrite_prompts([USER_PROMPT], settings)
    monkeypatch.setitem(__import__("sys").modules, "openai", None)  # not installed
    with pytest.raises(rw.RewriteError, match=r"pip install 'vdit\[rewrite\]'"):
        rw.rewrite_prompts([USER_PROMPT], _settings(stub))
    assert not stub.requests


def test_recorded_endpoints_hold_no_secrets():
    assert rw.endpoint_url("https://user:pw@api.example.com:8443/v1/?key=abc#x") == (
        "https://api.example.com:8443/v1/chat/completions")
    assert rw.endpoint_url("http://127.0.0.1:8080/v1/chat/completions") == (
        "http://127.0.0.1:8080/v1/chat/completions")
    assert rw.clean_answer('<think>hmm</think>\n "A ball.\n Falls." ') == "A ball. Falls."


def test_pipeline_sampling_rewrites_through_the_same_entry(stub, tmp_path, monkeypatch, capsys):
    """`vdit sample --pipeline ... --rewrite-prompt`: the Wan pipeline's UMT5 encodes the
    rewritten prompt, both prompts are recorded, the key is in no file; the budget is the
    UMT5 tokenizer's at --text-length."""
    from vdit.sample import pipeline as wp

    seen: list[str] = []
    original = wp.embed_prompts
    monkeypatch.setattr(wp, "embed_prompts", lambda loaded, prompts, dtype: (
        seen.extend(prompts), original(loaded, prompts, dtype))[1])
    monkeypatch.setenv(KEY_ENV, KEY)
    stub.reset("ok")
    out = tmp_path / "pipe"
    folder = Path(__file__).parent / "fixtures" / "wan_pipeline" / "wan21"
    assert main(["sample", "--pipeline", str(folder), "--prompt", USER_PROMPT, "--frames", "5",
                 "--height", "32", "--width", "48", "--steps", "2", "--text-length", "24",
                 "--out", str(out), "--rewrite-prompt", "--rewrite", f"endpoint={stub.url}",
                 "--rewrite", "model=stub", "--rewrite", f"api_key_env={KEY_ENV}"]) == 0
    logs = capsys.readouterr()
    assert ANSWER in seen and USER_PROMPT not in seen
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["prompts"] == [ANSWER] and prompts["user_prompts"] == [USER_PROMPT]
    (entry,) = prompts["prompt_rewrite"]
    assert entry["max_length"] == 24 and entry["model"] == SERVED_MODEL
    (video,) = out.glob("*.mp4")
    assert json.loads(Path(f"{video}.json").read_text())["prompt_rewrite"] == entry
    assert KEY.encode() not in _all_text(out) and KEY not in logs.out + logs.err
