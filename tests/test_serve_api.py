"""OpenAI's API in full against references: echo/logprobs against transformers' log-softmax, every prompt
form, n and best_of, penalties and logit bias, harmless fields, structured output validated by jsonschema,
several adapters in one batch against PEFT-made adapters loaded alone, the prefix cache against a cold
run, and /metrics."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import phikit
from phikit.serve import create_app

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from serving import Server  # noqa: E402


def post(server, path: str, **body) -> dict:
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def reference_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probability of each token given the ones before it (the first has none)."""
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_logprobs_score_the_prompt_as_transformers_does(server, phi, tiny):
    _, hf = tiny
    ids = phi.tokenizer.encode("The lighthouse keeper climbed the stairs")
    out = post(server, "/v1/completions", prompt=ids, echo=True, logprobs=2, max_tokens=0, temperature=0)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == phi.tokenizer.decode(ids) and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), reference_logprobs(hf, ids), rtol=0, atol=1e-4)
    for token, token_lp, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        # the 2 likeliest and always the prompt's own token: up to logprobs + 1 entries, as OpenAI's
        assert len(top) <= 3 and top[token] >= token_lp - 1e-6 and max(top.values()) >= token_lp - 1e-6
    assert lp["text_offset"] == [len(phi.tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_generated_tokens_carry_their_logprobs(server, phi, tiny):
    _, hf = tiny
    prompt = "Hello world"
    ids = phi.tokenizer.encode(prompt)
    out = post(server, "/v1/completions", prompt=prompt, max_tokens=6, logprobs=3, temperature=0, echo=True)
    lp = out["choices"][0]["logprobs"]
    generated = phi.generate(prompt, max_new_tokens=6).token_ids
    assert len(lp["tokens"]) == len(ids) + len(generated)
    full = reference_logprobs(hf, ids + generated)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), full, rtol=0, atol=1e-4)
    for token_lp, top in zip(lp["token_logprobs"][len(ids) :], lp["top_logprobs"][len(ids) :]):
        assert abs(max(top.values()) - token_lp) < 1e-6  # greedy: the chosen token is the most likely


def test_every_prompt_form_gives_one_choice_per_prompt_in_order(server, phi):
    prompts = ["Hello world", "def add(a, b):", "Paris is"]
    expected = [phi.generate(p, max_new_tokens=8).text for p in prompts]
    ids = [phi.tokenizer.encode(p) for p in prompts]
    for form in (prompts, ids):
        out = post(server, "/v1/completions", prompt=form, max_tokens=8, temperature=0)
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert [c["text"] for c in out["choices"]] == expected
    single = post(server, "/v1/completions", prompt=ids[1], max_tokens=8, temperature=0)
    assert single["choices"][0]["text"] == expected[1]


def test_n_and_best_of(server):
    out = post(server, "/v1/completions", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=4)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and len({c["text"] for c in out["choices"]}) > 1
    again = post(server, "/v1/completions", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=4)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in out["choices"]]  # seeded: reproducible
    best = post(
        server, "/v1/completions", prompt="Hello", max_tokens=8, n=1, best_of=3, temperature=1.0, seed=4, logprobs=0
    )
    scores = [
        sum(c["logprobs"]["token_logprobs"])
        for c in post(
            server, "/v1/completions", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=4, logprobs=0
        )["choices"]
    ]
    assert abs(sum(best["choices"][0]["logprobs"]["token_logprobs"]) - max(scores)) < 1e-4
    chat = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=4)
    assert [c["index"] for c in chat["choices"]] == [0, 1]


def test_logit_bias_and_penalties(server, phi):
    token = phi.tokenizer.encode(" lighthouse")[0]
    out = post(server, "/v1/completions", prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(token): 100})
    assert out["choices"][0]["text"] == phi.tokenizer.decode([token] * 4)
    plain = post(server, "/v1/completions", prompt="one one one one", max_tokens=16, temperature=0)["choices"][0][
        "text"
    ]
    for penalty in ("presence_penalty", "frequency_penalty"):
        penalized = post(
            server, "/v1/completions", prompt="one one one one", max_tokens=16, temperature=0, **{penalty: 2.0}
        )
        tokens = phi.tokenizer.encode(penalized["choices"][0]["text"])
        assert penalized["choices"][0]["text"] != plain or len(set(tokens)) == len(tokens)


HARMLESS = {
    "store": False,
    "metadata": {},
    "user": "someone",
    "service_tier": "auto",
    "parallel_tool_calls": True,
    "logit_bias": None,
    "top_p": None,
    "temperature": None,
    "response_format": {"type": "text"},
    "tools": [],
    "stream_options": None,
}


@pytest.mark.parametrize("field,value", list(HARMLESS.items()))
def test_harmless_fields_are_accepted(server, field, value):
    post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, **{field: value})
    if field not in ("parallel_tool_calls", "tools"):
        post(server, "/v1/completions", prompt="Hi", max_tokens=2, **{field: value})


@pytest.mark.parametrize(
    "path,body,param",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, "suffix"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0",
        ),
        ("/v1/completions", {"prompt": "Hi", "best_of": 1, "n": 2}, "best_of"),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": [999999999]}, "prompt"),
    ],
)
def test_unsupported_or_wrong_fields_are_400s_that_name_them(server, path, body, param):
    r = httpx.post(f"{server.url}{path}", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "less than or equal" not in r.json()["error"]["message"]


def test_chat_logprobs_content_parts_and_developer_role(server, phi):
    from phikit.templates import get_template

    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a joke"}]},
    ]
    out = post(
        server, "/v1/chat/completions", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    prompt = get_template("guanaco").render_chat([], "Be brief.\nTell me a joke")
    expected = phi.generate(prompt, max_new_tokens=6, stop=get_template("guanaco").stop)
    choice = out["choices"][0]
    assert choice["message"]["content"] == expected.text
    content = choice["logprobs"]["content"]
    assert len(content) == len(expected.token_ids) and all(len(c["top_logprobs"]) == 2 for c in content)
    client = server.client()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True)
    # the same prompt again may come from the prefix cache: equal up to the summation order
    assert reply.choices[0].logprobs.content[0].logprob == pytest.approx(content[0]["logprob"], abs=1e-5)
    legacy = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2, echo=True)
    assert legacy.choices[0].logprobs.token_logprobs[0] is None


def test_streamed_logprobs_and_several_prompts(server, phi):
    client = server.client()
    chunks = list(
        client.completions.create(
            model="tiny", prompt=["Hello", "Paris is"], max_tokens=5, temperature=0, stream=True, logprobs=1
        )
    )
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [phi.generate(p, max_new_tokens=5).text for p in ("Hello", "Paris is")]


def _closed(schema):
    """additionalProperties false on every object (as OpenAI's strict mode asks): a random model would
    otherwise invent extra keys forever."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            schema = {**schema, "additionalProperties": False}
        return {k: _closed(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


TEXT = {"type": "string", "maxLength": 12}
SCHEMAS = [
    _closed(s)
    for s in [
        {"type": "object", "properties": {"name": TEXT}, "required": ["name"]},
        {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["age"],
        },
        {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": TEXT, "maxItems": 3}},
            "required": ["tags"],
        },
        {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "score": {"type": "integer", "minimum": 0, "maximum": 10}},
            "required": ["ok", "score"],
        },
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": TEXT},
                    "required": ["id"],
                }
            },
            "required": ["user"],
        },
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 4},
        {
            "type": "object",
            "properties": {
                "kind": {"const": "point"},
                "x": {"type": "integer", "minimum": -99, "maximum": 99},
                "y": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["kind", "x", "y"],
        },
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": TEXT, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                        "required": ["sku", "qty"],
                    },
                    "maxItems": 2,
                }
            },
            "required": ["items"],
        },
        {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
        },
    ]
]


def test_structured_output_follows_every_schema_under_concurrency(server):
    jsonschema = pytest.importorskip("jsonschema")

    def ask(i: int):
        schema = SCHEMAS[i % len(SCHEMAS)]
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        if i % 2:
            out = post(
                server,
                "/v1/chat/completions",
                messages=[{"role": "user", "content": "Give JSON"}],
                max_tokens=120,
                temperature=0.8,
                seed=i,
                response_format=fmt,
            )
            text = out["choices"][0]["message"]["content"]
        else:
            text = post(
                server, "/v1/completions", prompt="JSON:", max_tokens=120, temperature=0.8, seed=i, response_format=fmt
            )["choices"][0]["text"]
        return schema, text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(2 * len(SCHEMAS))))
    for schema, text in results:
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            raise AssertionError(f"not JSON: {text!r} for {schema}") from None
        jsonschema.validate(document, schema)
    plain = post(
        server, "/v1/completions", prompt="JSON:", max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )["choices"][0]
    assert plain["text"].startswith("{")  # a random model may write one long key: complete only if it stopped
    if plain["finish_reason"] == "stop":
        assert isinstance(json.loads(plain["text"]), dict)


def test_several_adapters_decode_in_one_batch_as_each_does_alone(tiny, tmp_path):
    from test_lora import peft_model

    folder, hf = tiny
    for name, seed in (("a", 5), ("b", 6)):
        torch.manual_seed(seed)
        model = peft_model(hf, r=4 if name == "a" else 8)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
    base = phikit.load(folder, dtype="fp32", device="cpu")
    base.generate("Hello", max_new_tokens=2)  # the one-call decoding step built before the adapters wrap layers
    app = create_app(
        base.model, base.tokenizer, "tiny", adapters={"a": tmp_path / "a", "b": tmp_path / "b"}, max_batch=8
    )
    prompts = ["Hello world", "The lighthouse", "def add(a, b):", "Paris is"]
    expected = {
        name: [
            phikit.load(folder, dtype="fp32", device="cpu", adapter=tmp_path / name if name != "tiny" else None)
            .generate(p, max_new_tokens=10)
            .text
            for p in prompts
        ]
        for name in ("tiny", "a", "b")
    }
    assert expected["a"] != expected["tiny"] and expected["b"] != expected["a"]
    with Server(app) as s:
        assert {m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]} == {"tiny", "a", "b"}
        jobs = [(name, i) for i in range(len(prompts)) for name in ("tiny", "a", "b")]
        barrier = threading.Barrier(8)

        def ask(job):
            name, i = job
            if jobs.index(job) < 8:
                barrier.wait()
            return httpx.post(
                f"{s.url}/v1/completions",
                json={"model": name, "prompt": prompts[i], "max_tokens": 10, "temperature": 0},
                timeout=120,
            ).json()["choices"][0]["text"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, jobs))
    assert got == [expected[name][i] for name, i in jobs]


def test_a_shared_prefix_is_reused_with_the_cold_output(phi):
    prefix = "You are a helpful assistant who answers in one short sentence. " * 3
    questions = ["Hello world", "The lighthouse keeper", "def add(a, b):"]
    cold = [phi.generate(prefix + q, max_new_tokens=12).text for q in questions]
    app = create_app(phi.model, phi.tokenizer, "tiny", prefix_cache_mb=64)
    engine = app.state.engine
    with Server(app) as s:
        replies = [post(s, "/v1/completions", prompt=prefix + q, max_tokens=12, temperature=0) for q in questions]
        # the openai client reads what came from the cache, and /metrics counts it
        usage = s.client().completions.create(model="tiny", prompt=prefix + "Why?", max_tokens=2).usage
        metrics = httpx.get(f"{s.url}/metrics").text
    assert [r["choices"][0]["text"] for r in replies] == cold
    assert engine.prefix_cache.hits >= 2
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies]
    assert cached[0] == 0 and all(0 < c < r["usage"]["prompt_tokens"] for c, r in zip(cached[1:], replies[1:]))
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    counts = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert (
        float(counts["phikit_prefix_cache_hit_tokens_total"]) == sum(cached) + usage.prompt_tokens_details.cached_tokens
    )


def test_metrics_in_prometheus_format(server):
    post(server, "/v1/completions", prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "phikit_requests_total",
        "phikit_generation_tokens_total",
        "phikit_prompt_tokens_total",
        "phikit_queued_requests",
        "phikit_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    counts = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(counts["phikit_time_to_first_token_seconds_count"]) >= 1
    assert float(counts["phikit_generation_tokens_total"]) >= 3
    httpx.get(f"{server.url}/ui/chat.css")
    assert 'phikit_requests_total{endpoint="/ui/{file}",status="200"}' in httpx.get(f"{server.url}/metrics").text


def test_langchain_batches_prompts_and_chats(server, phi):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="none", model="tiny", max_tokens=6, temperature=0, max_retries=0
    )
    prompts = ["Hello world", "Paris is", "def add(a, b):"]
    assert llm.batch(prompts) == [phi.generate(p, max_new_tokens=6).text for p in prompts]
    chat = langchain_openai.ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="none", model="tiny", max_tokens=6, temperature=0, max_retries=0
    )
    replies = chat.batch(["Hi", "Tell me a joke"])
    assert len(replies) == 2 and all(isinstance(r.content, str) for r in replies)


# ---- round 3 of hardening: capacity before allocation, strict types, schemas, fields, metrics ----


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_capacity_is_checked_before_anything_is_built(phi, monkeypatch):
    """Prompts x best_of against the server's capacity before any tokenizing or grammar matcher: more prompts
    than --max-prompts and more generations than slots + queue are 400s naming the limit (never a 503 a
    client would retry forever); a request that fits later gets 503 only while the places are taken."""
    from phikit.serve import structured

    built = []
    real = structured.Grammar.__init__
    monkeypatch.setattr(structured.Grammar, "__init__", lambda self, *a: built.append(1) or real(self, *a))
    app = create_app(phi.model, phi.tokenizer, "tiny", max_batch=2, max_queue=2, max_prompts=8)
    json_mode = {"response_format": {"type": "json_object"}, "max_tokens": 2}
    with Server(app) as s:
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": ["a"] * 2000, "best_of": 16, **json_mode})
        assert "at most 8 per request" in error_of(r, 400)["message"]
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, **json_mode})
        assert "6 generations" in error_of(r, 400)["message"] and "--max-batch 2 + --max-queue 2" in r.text
        assert not built
        engine = app.state.engine
        assert engine.reserve(3) and not engine.reserve(2)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": ["a", "b"], **json_mode})
        assert error_of(r, 503)["code"] == "overloaded" and r.headers["Retry-After"] == "1" and not built
        engine.release(3)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": ["a", "b"], **json_mode})
        assert r.status_code == 200 and len(built) == 2 and engine.outstanding == 0


@pytest.mark.parametrize(
    "schema, status",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}, 200),
        ({"type": "string", "format": "not-a-format", "maxLength": 5}, 200),
        ({"enum": []}, 400),
        ({"type": "integer", "minimum": 5, "maximum": 1}, 400),
        ({"type": "nonsense"}, 400),
    ],
)
def test_schemas_llguidance_warns_about_work_and_unusable_ones_are_400(server, schema, status):
    """llguidance (the version setup.sh installs) ignores keywords it does not implement with a warning:
    those schemas work; an unsatisfiable or invalid one is an OpenAI-shaped 400, never a plain-text 500."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "temperature": 0}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    if status == 400:
        assert "schema cannot be used" in error_of(r, 400)["message"]
    else:
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("key", ["--5", "\u00b2", "\u0661", "\uff11", "-0", "+3", " 3", "9" * 5000, "1e3"])
def test_logit_bias_keys_are_ascii_token_ids(server, key):
    r = httpx.post(
        f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1, "logit_bias": {key: 1}}
    )
    assert error_of(r, 400)["param"] == "logit_bias"


@pytest.mark.parametrize(
    "change, param",
    [
        ({"prompt": [True, False]}, "prompt"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"echo": 1}, "echo"),
        ({"n": True}, "n"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_types_are_strict(server, change, param):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1, **change})
    assert error_of(r, 400)["param"].startswith(param), r.text


def test_current_openai_fields_are_accepted_when_harmless_and_models_retrieve(server):
    client = server.client()
    harmless = {
        "reasoning_effort": "low",
        "prediction": {"type": "content", "content": "Paris"},
        "modalities": ["text"],
        "verbosity": "low",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "user": "u",
        "audio": None,
        "web_search_options": None,
    }
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body=harmless)
    assert reply.choices[0].message.role == "assistant"
    for field, value in (("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {})):
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": messages, field: value})
        assert error_of(r, 400)["param"] == field
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and abs(card.created - time.time()) < 3600  # when the server started, not 1970
    r = httpx.get(f"{server.url}/v1/models/nope")
    assert error_of(r, 404)["code"] == "model_not_found"


def test_chat_logprob_bytes_of_a_token_inside_a_utf8_character_are_its_own(server, phi):
    """A byte-level token that is half of a character: ``token`` is U+FFFD, ``bytes`` its real byte."""
    vocab = phi.tokenizer._tok.get_vocab()
    byte_token = vocab.get("\u00f0")  # GPT-2's alphabet: byte 0xF0, the first byte of a 4-byte character
    if byte_token is None:
        pytest.skip("the tokenizer has no single-byte token for 0xF0")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "logprobs": True}
    out = post(server, "/v1/chat/completions", logit_bias={str(byte_token): 100}, **body)
    (entry,) = out["choices"][0]["logprobs"]["content"]
    assert entry["bytes"] == [0xF0] and entry["token"] == "\ufffd"


def test_metrics_label_routes_not_paths_and_can_need_the_key(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", api_key="k", protect_metrics=True)
    with Server(app) as s:
        for i in range(50):
            httpx.get(f"{s.url}/no/such/path/{i}")
        httpx.get(f"{s.url}/v1/models/tiny", headers={"Authorization": "Bearer k"})
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        text = httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer k"}).text
    requests = [line for line in text.splitlines() if line.startswith("phikit_requests_total")]
    assert 'endpoint="other"' in text and not any("/no/such" in line for line in requests)
    assert 'endpoint="/v1/models/{model}"' in text


def test_long_prompts_are_tokenized_in_a_worker_process_to_the_same_ids(phi):
    """tokenizers keeps the GIL while encoding: long text goes to a worker process (the event loop stays
    free: benchmarks/bench_serve_health.py); its ids are the tokenizer's own."""
    import asyncio

    from phikit.serve.tokenize import PromptTokenizer

    text = "The quick brown fox, jumping over 13 lazy dogs \u00e9\u65e5\U0001f600. " * 40
    offloaded = PromptTokenizer(phi.tokenizer, offload_chars=100)
    try:
        assert asyncio.run(offloaded.encode(text)) == phi.tokenizer.encode(text)
        assert offloaded.pool is not None
    finally:
        offloaded.close()
    assert not offloaded.fits("x" * 10_000, 10) and offloaded.fits("x" * 10, 10)


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "y" * 3_000_000, "max_tokens": 1})
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded" and "cannot fit" in error["message"]
