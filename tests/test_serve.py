"""The real server on a loopback port, driven by the official openai client, raw HTTP and a schema fuzzer."""

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings

from phikit.chat import chat
from phikit.errors import PhikitError
from phikit.generate import GenerationConfig
from phikit.serve import create_app
from phikit.templates import get_template

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from serving import Server, free_port  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("PHIKIT_FUZZ_EXAMPLES", 30))  # raise it to fuzz harder


PROMPTS = [
    "Hello world",
    "def add(a, b):",
    "The lighthouse keeper",
    "One two three",
    "Paris is",
    "In 1905,",
    "### Human: hi",
    "x = 1\ny =",
]


def test_completion_equals_local_greedy_generation(server, phi):
    reply = server.client().completions.create(model="tiny", prompt="Hello world", max_tokens=20, temperature=0)
    expected = phi.generate("Hello world", max_new_tokens=20)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_streamed_completion_and_chat(server, phi):
    client = server.client()
    pieces = [
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="Paris is", max_tokens=16, temperature=0, stream=True)
    ]
    assert "".join(pieces) == phi.generate("Paris is", max_new_tokens=16).text
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    prompt = get_template("guanaco").render_chat([("Hi", "Hello!")], "Tell me a joke")
    expected = phi.generate(prompt, max_new_tokens=16, stop=get_template("guanaco").stop).text
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_are_batched_and_equal_single_requests(server, phi):
    engine = server.app.state.engine
    steps_before = engine.steps
    client = server.client()

    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [phi.generate(p, max_new_tokens=24).text for p in PROMPTS]
    # batched: far fewer decode steps than one request at a time would need
    assert engine.steps - steps_before < 0.6 * 23 * len(PROMPTS)


def test_sampling_with_a_seed_is_reproducible(server):
    client = server.client()
    a, b = (
        client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0.9, top_p=0.9, seed=11)
        .choices[0]
        .text
        for _ in range(2)
    )
    assert a == b


@pytest.mark.parametrize(
    "temperature,top_p,seed", [(5e-324, 1.0, 1), (1e-30, 1e-9, -5), (2.0, 1e-300, 18789068734726466390982656)]
)
def test_extreme_sampling_parameters_still_generate(server, temperature, top_p, seed):
    """Found by the schema fuzz: a denormal temperature overflowed the logits to inf and a huge seed
    overflowed torch's; either killed the engine thread."""
    reply = server.client().completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=temperature, top_p=top_p, seed=seed
    )
    assert reply.usage.completion_tokens >= 1


def test_an_internal_error_fails_one_request_and_the_server_lives_on(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_batch=2, max_queue=4)
    with Server(app) as s:
        engine = app.state.engine
        real = engine._sample
        calls = []

        def broken(r, logits):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(r, logits)

        engine._sample = broken
        client = s.client()
        with pytest.raises(openai.InternalServerError):
            client.with_options(max_retries=0).completions.create(model="tiny", prompt="Hi", max_tokens=4)
        reply = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert engine.active == 0


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ("{not json", 400, "not valid JSON"),
        ({"prompt": "hi", "max_tokens": 5, "temprature": 0.5}, 400, "temprature"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**9}, 400, "context"),
        ({"prompt": "word " * 400, "max_tokens": 5}, 400, "context"),
        ({"prompt": "word " * 400}, 400, "context"),  # no max_tokens: found by the schema fuzz
        ({"prompt": "hi", "n": 99}, 400, "n"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be at least 1 (0 only with echo"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "only allowed when stream is true"),
        ({"prompt": "hi", "stop": 123}, 400, "stop: Input should be a valid string or Input should be a valid list"),
    ],
)
def test_bad_completion_requests_get_openai_errors(server, body, status, fragment):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{server.url}/v1/completions", headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_a_chat_reply_of_no_tokens_is_refused_without_mentioning_echo(server, max_tokens):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    error = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "max_tokens" and "greater than or equal to 1" in error["message"]
    assert "echo" not in error["message"]
    body = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}  # a path as written
    assert (
        httpx.post(f"{server.url}/v1/chat/completions", json=body)
        .json()["error"]["message"]
        .startswith("messages[0].content[0]")
    )


@pytest.mark.parametrize(
    "messages,fragment",
    [
        ([], "messages"),
        ([{"role": "assistant", "content": "hi"}], "assistant message must follow"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two user messages"),
        ([{"role": "robot", "content": "hi"}], "role"),
    ],
)
def test_bad_chat_requests_get_openai_errors(server, messages, fragment):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=messages or [{"role": "system", "content": "x"}])


def test_client_disconnect_frees_the_slot(server):
    engine = server.app.state.engine
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True},
    ) as r:
        next(r.iter_lines())
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0


def test_api_key_and_full_queue(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_batch=1, max_queue=1, api_key="sekrit")
    with Server(app) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        client = s.client("sekrit")
        assert client.models.list().data[0].id == "tiny"

        def ask(_):
            try:
                client.completions.create(model="tiny", prompt="Hello", max_tokens=150, temperature=0)
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}


@pytest.mark.slow
def test_schema_fuzzing_finds_no_server_errors(server):
    """schemathesis generates requests from the server's own OpenAPI schema (valid and invalid); none may
    get a 5xx. (Its pytest plugin does not run under this pytest, so hypothesis drives it directly.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            body = case.body if isinstance(case.body, dict) else {}
            if isinstance(body.get("max_tokens"), int):
                body["max_tokens"] = min(body["max_tokens"], 8)  # keep generations short
            for key in ("n", "best_of"):  # and few of them
                if isinstance(body.get(key), int):
                    body[key] = min(body[key], 2)
            if isinstance(body.get("prompt"), list):
                body["prompt"] = body["prompt"][:2]
            response = case.call()
            if response.status_code >= 500:
                failures.append((case.path, case.body, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:3]


def test_terminal_chat_keeps_history_and_resets(phi):
    import io

    lines = iter(["Hi there", "And again", "/reset", "Fresh start", "/exit"])
    out = io.StringIO()
    history = chat(
        phi, "guanaco", GenerationConfig(max_new_tokens=8, temperature=0), read=lambda _: next(lines), out=out
    )
    assert [u for u, _ in history] == ["Fresh start"]
    assert "(conversation reset)" in out.getvalue() and out.getvalue().count("phi> ") == 3


def test_ctrl_c_stops_a_terminal_reply_and_the_conversation_goes_on(phi):
    import io

    from phikit.errors import Terminated

    class Interrupting(io.StringIO):  # a Ctrl-C as the first piece of the first reply is shown
        raised = False

        def write(self, text):
            if self.getvalue().endswith("phi> ") and not self.raised:
                self.raised = True
                raise self.signal
            return super().write(text)

    lines = iter(["Hi there", "And again", "/exit"])
    out = Interrupting()
    out.signal = KeyboardInterrupt()
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    history = chat(phi, "guanaco", config, read=lambda _: next(lines), out=out)
    assert [u for u, _ in history] == ["Hi there", "And again"] and " (stopped)\n" in out.getvalue()
    lines = iter(["Hi there", "/exit"])
    out = Interrupting()
    out.signal = Terminated()  # SIGTERM ends the program, not the reply
    with pytest.raises(Terminated):
        chat(phi, "guanaco", config, read=lambda _: next(lines), out=out)


def test_terminal_chat_skips_what_is_not_utf8_or_its_template_refuses(phi):
    import io

    from phikit.templates import ChatTemplate

    strict = ChatTemplate(
        "{% for m in messages %}{% if 'bad' in m['content'] %}{{ raise_exception('no bad words') }}{% endif %}"
        "<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    )
    lines = iter(["caf\udce9", "a bad word", "fine", "/exit"])  # invalid UTF-8 read from stdin: a lone surrogate
    out = io.StringIO()
    history = chat(phi, strict, GenerationConfig(max_new_tokens=4, temperature=0), read=lambda _: next(lines), out=out)
    said = out.getvalue()
    assert "(that message is not valid UTF-8 text; type it again)" in said
    assert "(the chat template refused the conversation: no bad words)" in said
    assert [u for u, _ in history] == ["fine"] and said.count("phi> ") == 1


def test_terminal_chat_says_what_does_not_fit_and_cuts_nothing(phi):
    import io

    context = phi.model.config.max_position_embeddings
    budget = context // 2  # what a turn may take: the rest is kept for the reply
    turn = get_template("guanaco")

    def size(words: int) -> int:  # tokens of a message of that many words, as a turn
        return len(phi.tokenizer.encode(turn.render_messages([{"role": "user", "content": "more " * words}])))

    words = 1
    while size(words + 1) <= budget:
        words += 1
    full = ("more " * words).strip()  # fits alone, within a few tokens of the budget: no earlier turn fits beside
    lines = iter(["Hi there", "word " * context, "And again", full, "/exit"])
    out = io.StringIO()
    config = GenerationConfig(max_new_tokens=context - budget, temperature=0)
    history = chat(phi, "guanaco", config, read=lambda _: next(lines), out=out)
    said = out.getvalue()
    assert "(this message does not fit" in said and said.count("phi> ") == 3  # the long one: refused, not cut
    assert "oldest turn(s) left out to fit the context" in said
    assert [u for u, _ in history] == [full]
    lines = iter(["Hi there", "word " * context, "/exit"])  # a refused message leaves the conversation as it was
    out = io.StringIO()
    history = chat(phi, "guanaco", config, read=lambda _: next(lines), out=out)
    assert [u for u, _ in history] == ["Hi there"] and "left out" not in out.getvalue()
    with pytest.raises(PhikitError, match="leaves no room"):
        chat(phi, "guanaco", GenerationConfig(max_new_tokens=context), read=lambda _: "/exit", out=out)


# ---- hardening: bad input, load, disconnects ----


def openai_error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_a_body_too_large_gets_413_and_a_stalled_body_408(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_body_bytes=64 * 1024, body_timeout=0.5)
    with Server(app) as s:
        big = {"prompt": "x" * 100_000, "max_tokens": 1}
        r = httpx.post(f"{s.url}/v1/completions", json=big)
        assert r.status_code == 413 and "larger than" in openai_error(r)["message"]

        def chunks():  # no content-length: the limit is counted while reading
            for _ in range(20):
                yield b"x" * 8192

        r = httpx.post(f"{s.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        with socket.create_connection(("127.0.0.1", s.port)) as raw:
            raw.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"prompt": '
            )
            raw.settimeout(10)
            reply = b""
            while b'"error"' not in reply and (chunk := raw.recv(4096)):
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408") and '"error"' in reply


def test_long_prompts_are_tokenized_off_the_event_loop(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_body_bytes=16 * 2**20)
    with Server(app) as s:
        text = "Hello world, this is a long prompt. " * 150_000  # ~5 MB: seconds of tokenizing
        worker = threading.Thread(
            target=lambda: httpx.post(f"{s.url}/v1/completions", json={"prompt": text}, timeout=120)
        )
        worker.start()
        time.sleep(0.5)
        slowest = 0.0
        while worker.is_alive():
            started = time.perf_counter()
            assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)
        worker.join()
        assert slowest < 1.0


@pytest.mark.parametrize("field", ["prompt", "chat", "stop"])
def test_a_lone_surrogate_is_a_400(server, field):
    payload = {
        "prompt": {"prompt": "bad \ud800 text", "max_tokens": 2},
        "chat": {"messages": [{"role": "user", "content": "bad \udfff"}], "max_tokens": 2},
        "stop": {"prompt": "fine", "stop": ["\ud800"], "max_tokens": 2},
    }[field]
    path = "/v1/chat/completions" if field == "chat" else "/v1/completions"
    body = json.dumps(payload)  # json escapes the surrogate as \ud800, as a client would send it
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in openai_error(r)["message"]


def test_requests_wait_for_slots_before_counting_against_the_queue(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_batch=8, max_queue=1)
    with Server(app) as s:
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
        with ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(lambda _: httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).status_code, range(8))
            )
        assert codes == [200] * 8
    app = create_app(phi.model, phi.tokenizer, "tiny")  # the defaults: 8 slots + 64 waiting
    with Server(app) as s:
        body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(72) as pool:
            codes = list(
                pool.map(lambda _: httpx.post(f"{s.url}/v1/completions", json=body, timeout=120).status_code, range(72))
            )
        assert codes == [200] * 72


def test_a_full_server_says_when_to_retry(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_batch=1, max_queue=0)
    real = app.state.engine._sample
    app.state.engine._sample = lambda *args: time.sleep(0.01) or real(*args)
    with Server(app) as s:
        long = threading.Thread(
            target=lambda: httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 200}, timeout=60)
        )
        long.start()
        deadline = time.time() + 10
        while app.state.engine.active == 0 and time.time() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and openai_error(r)["code"] == "overloaded"
        long.join()


@pytest.mark.slow
def test_clients_that_leave_free_their_slot_and_their_place_in_the_queue(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", max_batch=1, max_queue=8)
    engine = app.state.engine
    real = engine._sample
    engine._sample = lambda *args: time.sleep(0.02) or real(*args)  # 200 tokens take 4 s
    with Server(app) as s:
        body = {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stop": ["@@@"]}
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up while generating
            httpx.post(f"{s.url}/v1/completions", json=body, timeout=0.5)
        deadline = time.time() + 3
        while (engine.active or engine.outstanding) and time.time() < deadline:
            time.sleep(0.02)
        assert engine.active == 0 and engine.outstanding == 0
        # one request generating; three more queued behind it whose clients leave
        long = threading.Thread(target=lambda: httpx.post(f"{s.url}/v1/completions", json=body, timeout=60))
        long.start()
        while engine.active == 0:
            time.sleep(0.01)
        started = engine.started

        def leave(_):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{s.url}/v1/completions", json=body, timeout=0.3)

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(leave, range(3)))
        deadline = time.time() + 3
        while engine.outstanding > 1 and time.time() < deadline:
            time.sleep(0.02)
        assert engine.outstanding == 1  # only the generating one counts
        long.join()
        time.sleep(0.3)
        assert engine.started == started  # the ones that left were never started


def test_framework_errors_are_openai_shaped(server):
    r = httpx.get(f"{server.url}/v1/nope")
    assert r.status_code == 404 and "no such endpoint" in openai_error(r)["message"]
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and openai_error(r)["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": 5})
    assert r.status_code == 400 and openai_error(r)["param"].startswith("prompt")


def test_api_key_rules(phi):
    from phikit.errors import PhikitError

    with pytest.raises(PhikitError, match="empty"):
        create_app(phi.model, phi.tokenizer, "tiny", api_key="")
    app = create_app(phi.model, phi.tokenizer, "tiny", api_key="sekrit")
    with Server(app) as s:
        for header, status in (("bearer sekrit", 200), ("BEARER sekrit", 200), ("Basic sekrit", 401), ("sekrit", 401)):
            assert httpx.get(f"{s.url}/v1/models", headers={"Authorization": header}).status_code == status


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--port", "70000"], "between 1 and 65535"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-batch", "0"], "--max-batch"),
        (["--api-key", ""], "--api-key is empty"),
        (["--cors-origin", "app.example"], "--cors-origin app.example"),
        (["--cors-origin", "https://app.example/chat"], "no path"),
        (["--adapter", "a=/x", "--adapter", "a=/y"], "--adapter a: a name given twice"),
        (["--adapter", "/x", "--adapter", "b=/y"], "or name them: --adapter NAME=DIR ..., not both"),
        (["--adapter", "model=/x"], "model is the base model's name"),
    ],
)
def test_serve_flags_are_checked_before_the_model_loads(flags, fragment, capsys):
    from phikit.cli import main

    started = time.perf_counter()
    assert main(["serve", "--model", "/nonexistent/model", *flags]) == 2
    assert fragment in capsys.readouterr().err and time.perf_counter() - started < 5


def test_serve_starts_with_named_adapters_beside_the_base(tiny, tmp_path, capsys, monkeypatch):
    """The command as docs/serve.md gives it: --adapter NAME=DIR twice; the app gets the base model's name and
    both adapters, and the server line names them."""
    import phikit.serve
    from phikit.checkpoint import load_model
    from phikit.cli import main
    from phikit.lora import LoRAConfig, inject_lora, save_adapter

    folder, _ = tiny
    model = load_model(folder, dtype="fp32", device="cpu")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name in ("chat", "code"):
        save_adapter(model, tmp_path / name, base_model=str(folder))
    started = {}
    monkeypatch.setattr(phikit.serve, "serve", lambda app, host, port: started.update(app=app, port=port))
    code = main(
        [
            "serve",
            "-m",
            str(folder),
            "--port",
            str(free_port()),
            "--adapter",
            f"chat={tmp_path / 'chat'}",
            "--adapter",
            f"code={tmp_path / 'code'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"serving {Path(folder).name}: " in err and "adapters chat, code" in err
    assert started["app"].state.engine is not None


def test_serving_on_a_port_in_use_fails_before_loading(capsys):
    from phikit.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent/model", "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_the_engine_decodes_only_active_rows_and_moves_a_row_into_a_hole(phi):
    """Row 0 finishes first: the highest row moves into it (keys and values with it) and the next steps run
    two rows, not three with a dead one between; every reply equals generating it alone."""
    prompts, budgets = ["Hello there", "The sky is", "Once upon a time"], [2, 9, 7]
    batches = run_engine(phi, 3, prompts, budgets, static=False)
    assert batches[0] == 3 and 2 in batches and batches == sorted(batches, reverse=True)


def run_engine(phi, max_batch: int, prompts: list[str], budgets: list[int], static: bool) -> list[int]:
    """Submit every prompt to an engine of ``max_batch`` rows and step it until all are done, through a
    decoding step (``static``: a compiled or graph-captured one, as the CUDA backend's) that records its
    batch sizes; each reply must equal generating it alone. Returns the batch sizes in order."""
    import torch

    from phikit.serve.engine import Engine, Request

    engine = Engine(phi.model, phi.tokenizer, max_batch=max_batch, max_queue=4)
    replies = {i: [] for i in range(len(prompts))}
    batches = []
    step = phi.model.decode_step

    class Recorded:
        def __call__(self, ids, *rest):
            batches.append(ids.shape[0])
            return step(ids, *rest)

    Recorded.static = static
    phi.model.decode_step = Recorded()
    try:
        for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
            deliver = lambda event, i=i: replies[i].append(event[1][0]) if event[0] == "token" else None  # noqa: E731
            config = GenerationConfig(max_new_tokens=budget)
            engine.submit(Request(phi.tokenizer.encode(prompt), budget, config, (), deliver, time.time() + 60))
        with torch.inference_mode():
            engine._admit()
            while any(engine.slots):
                engine._decode_step()
    finally:
        phi.model.decode_step = step
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        alone = phi.generate(prompt, max_new_tokens=budget)
        assert [t for t in replies[i] if t is not None] == alone.token_ids
    return batches


def test_the_prefix_cache_lives_in_one_arena_finds_blocks_by_hash_and_reuses_the_oldest():
    import torch

    from phikit.models import KVCache
    from phikit.serve.engine import PrefixCache

    layers, heads, dim, block = 2, 3, 8, PrefixCache.BLOCK
    per_block = 2 * layers * heads * block * dim * 2
    cache = PrefixCache(max_bytes=10 * per_block)

    def kv(ids):
        t = torch.tensor(ids, dtype=torch.float16).view(1, 1, -1, 1).expand(layers, heads, -1, dim)
        return t.contiguous(), (t + 1).contiguous()

    prompts = [[p] * 5 + list(range(27)) for p in range(1000)]  # 32 tokens: 2 blocks each
    for ids in prompts:
        cache.store(0, ids, *kv(ids))
    assert cache.bytes == 10 * per_block and len(cache.index) == 10  # the arena, not a buffer per prompt
    assert cache.lookup(0, prompts[-1] + [1, 2]) == (32, cache.lookup(0, prompts[-1] + [1, 2])[1])
    assert cache.lookup(0, prompts[0] + [1])[0] == 0  # reused long ago
    assert cache.lookup(1, prompts[-1] + [1])[0] == 0  # another adapter's keys/values are its own
    assert cache.lookup(0, prompts[-1])[0] == 16  # at least one token is left to prefill
    tokens, blocks = cache.lookup(0, prompts[-2] + [9])
    row = KVCache(layers, 1, heads, 40, dim, torch.float16, "cpu")
    cache.copy_into(row, blocks)
    k, v = kv(prompts[-2])
    assert tokens == 32 and torch.equal(row.k[:, 0, :, :32], k) and torch.equal(row.v[:, 0, :, :32], v)


def test_a_static_shape_step_sees_batches_rounded_to_powers_of_two(phi):
    """A compiled or CUDA-graph step (``static``) compiles or captures once per batch size: the engine rounds
    its rows up to 1, 2, 4, 8 (free rows decoded along, their results unused); every reply still equals
    generating it alone."""
    prompts, budgets = ["Hello there", "The sky is", "Once upon a time", "Paris is", "def add(a, b):"], [3, 9, 5, 7, 4]
    batches = run_engine(phi, 6, prompts, budgets, static=True)
    assert set(batches) <= {1, 2, 4, 6} and batches[0] == 6 and 4 in batches and 2 in batches
