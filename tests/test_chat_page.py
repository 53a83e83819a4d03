"""The chat page of ``phikit serve`` in a real browser (Debian's headless Chromium driven by selenium), and
the server's guard against DNS rebinding and other sites.

The page is checked against the API itself: the reply a page streams equals the API's greedy answer for
the same conversation and model. A tiny model trained here to answer one prompt with Markdown, HTML and a
script makes the safety test end to end: what the model writes is shown as text, and runs nothing.
"""

from __future__ import annotations

import json
import shutil
import struct
import time

import httpx
import pytest
import torch
from serving import Server

import phikit
from phikit.serve import create_app
from phikit.templates import get_template

PAYLOAD = (
    "Here is **bold**, `code` and a list:\n- one\n- two\n```python\nprint(1)\n```\n"
    "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
)
QUESTION = "Show me"
BUDGET = 200  # max_tokens: all of PAYLOAD also with the tiny byte-level tokenizer of a fresh clone


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (bash setup.sh --dev installs it)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no Chromium here (Debian: apt-get install chromium chromium-driver; CI installs them)"
    if not shutil.which("chromedriver"):
        return "no chromedriver here (Debian: apt-get install chromium-driver; CI installs it)"
    return None


needs_browser = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, vocab_size):
    """A tiny Phi checkpoint trained until its greedy answer to QUESTION (guanaco chat format) is PAYLOAD,
    and a LoRA adapter "a" that answers otherwise: (folder, adapter folder)."""
    from conftest import make_checkpoint
    from test_lora import peft_model

    folder = tmp_path_factory.mktemp("memorized")
    hf = make_checkpoint(folder, tokenizer_dir, vocab_size, seed=3)
    tokenizer = phikit.load(folder, dtype="fp32", device="cpu").tokenizer
    prompt = get_template("guanaco", tokenizer).render_messages([{"role": "user", "content": QUESTION}])
    train_to_say(hf, [tokenizer.encode(prompt) + tokenizer.encode(PAYLOAD) + [tokenizer.eos_id]])
    hf.save_pretrained(folder)
    torch.manual_seed(5)
    adapter = peft_model(hf, r=4)
    for name, p in adapter.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    adapter.save_pretrained(folder / "adapter-a")
    return folder, folder / "adapter-a"


def train_to_say(hf, sequences: list[list[int]], steps: int = 300) -> None:
    """Train a tiny transformers model on ``sequences`` (token ids) until it repeats them greedily."""
    optimizer = torch.optim.Adam(hf.parameters(), lr=3e-3)
    hf.train()
    for _ in range(steps):
        loss = sum(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss for ids in sequences) / len(sequences)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    hf.eval()


def serve(folder, adapter=None, **kw):
    phi = phikit.load(folder, dtype="fp32", device="cpu")
    phi.generate("Hello", max_new_tokens=2)  # the one-call decoding step built before adapters wrap layers
    adapters = {"a": adapter} if adapter else None
    return Server(create_app(phi.model, phi.tokenizer, "tiny", "guanaco", max_batch=4, adapters=adapters, **kw))


def api_reply(server, text, model="tiny", key=None, max_tokens=BUDGET, whole=False):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json() if whole else reply.json()["choices"][0]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,860"):
        options.add_argument(flag)
    options.add_argument("--host-resolver-rules=MAP evil.example 127.0.0.1")  # a rebinding site's name
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    d = webdriver.Chrome(options=options, service=service)
    d.downloads = downloads
    yield d
    d.quit()


def wait_for(condition, timeout=30.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(driver, server, clear=True):
    driver.get(server.url + "/")
    if clear:
        driver.execute_script("localStorage.clear(); sessionStorage.clear();")
        driver.get(server.url + "/")
    wait_for(lambda: driver.find_elements("css selector", "#model option"), what="the model list")
    driver.get_log("browser")  # only what follows counts


def set_field(driver, element_id, value):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];e.dispatchEvent(new Event('change'));",
        element_id,
        str(value),
    )


def send(driver, text):
    box = driver.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def last_reply(driver, states=("done",), timeout=60):
    def finished():
        replies = driver.find_elements("css selector", ".message.assistant")
        return replies and replies[-1].get_attribute("data-state") in states and replies[-1]

    return wait_for(finished, timeout, "the reply")


def stored_messages(driver):
    return driver.execute_script(
        "const s = JSON.parse(localStorage.getItem('phikit.conversations'));"
        "return s.conversations.find(c => c.id === s.current).messages;"
    )


def console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@needs_browser
def test_a_sent_message_streams_the_api_greedy_reply_shown_as_safe_markdown(trained, driver, tmp_path):
    folder, _ = trained
    with serve(folder) as server:
        expected = api_reply(server, QUESTION, whole=True)
        assert expected["choices"][0]["message"]["content"] == PAYLOAD  # the model learnt its answer
        open_page(driver, server)
        set_field(driver, "temperature", 0)
        set_field(driver, "max-tokens", BUDGET)
        send(driver, QUESTION)
        reply = last_reply(driver)
        assert stored_messages(driver)[-1]["content"] == PAYLOAD
        assert int(reply.get_attribute("data-chunks")) > 5  # it came in pieces
        content = reply.find_element("css selector", ".content")
        assert content.find_element("tag name", "strong").text == "bold"
        assert [e.text for e in content.find_elements("tag name", "li")] == ["one", "two"]
        assert content.find_element("css selector", "pre code.language-python").text == "print(1)"
        assert "<script>document.title='pwned'</script>" in content.text  # shown, as text
        assert not driver.find_elements("css selector", "#messages img, #messages script")
        time.sleep(0.3)
        assert driver.title == "phikit chat"
        stats = reply.find_element("css selector", ".stats").text
        assert f"{expected['usage']['completion_tokens']} tokens" in stats and "tok/s" in stats
        assert console_errors(driver) == []
        shot = tmp_path / "chat.png"
        driver.save_screenshot(str(shot))
        assert png_size(shot.read_bytes()) == tuple(driver.execute_script("return [innerWidth, innerHeight]"))

        # a conversation restored from the browser's storage is drawn as safely
        driver.refresh()
        reply = last_reply(driver)
        assert "<img src=x" in reply.text and not driver.find_elements("css selector", "#messages img")


@needs_browser
def test_stop_ends_the_stream_and_frees_the_slot(trained, driver):
    folder, _ = trained
    with serve(folder) as server:
        engine = server.app.state.engine
        step = engine._decode_step

        def slow_step():  # 30 ms a token, so that the test stops it midway
            time.sleep(0.03)
            step()

        engine._decode_step = slow_step
        full = api_reply(server, "Tell me more", max_tokens=200)["message"]["content"]
        open_page(driver, server)
        set_field(driver, "temperature", 0)
        set_field(driver, "max-tokens", 200)
        send(driver, "Tell me more")
        wait_for(
            lambda: (
                int(driver.find_elements("css selector", ".message.assistant")[-1].get_attribute("data-chunks")) >= 3
            )
        )
        driver.find_element("id", "stop").click()
        reply = last_reply(driver, states=("stopped",))
        assert "stopped" in reply.find_element("css selector", ".stats").text
        partial = stored_messages(driver)[-1]["content"]
        assert partial and full.startswith(partial) and len(partial) < len(full)
        wait_for(lambda: httpx.get(f"{server.url}/health").json()["active"] == 0, 10, "the slot to be freed")
        assert driver.find_element("id", "send").is_displayed()


@needs_browser
def test_regenerate_edit_and_the_adapter_picker_answer_as_the_api(trained, driver):
    folder, adapter = trained
    with serve(folder, adapter) as server:
        open_page(driver, server)
        names = [o.get_attribute("value") for o in driver.find_elements("css selector", "#model option")]
        assert names == ["tiny", "a"]
        set_field(driver, "temperature", 0)
        set_field(driver, "max-tokens", 40)
        set_field(driver, "model", "a")
        send(driver, QUESTION)
        last_reply(driver)
        by_adapter = api_reply(server, QUESTION, model="a", max_tokens=40)["message"]["content"]
        base = api_reply(server, QUESTION, model="tiny", max_tokens=40)["message"]["content"]
        assert by_adapter != base
        assert stored_messages(driver)[-1]["content"] == by_adapter

        set_field(driver, "model", "tiny")
        driver.find_element("xpath", "//button[text()='Regenerate']").click()
        last_reply(driver)
        messages = stored_messages(driver)
        assert len(messages) == 2 and messages[-1]["content"] == base

        driver.find_element("xpath", "//button[text()='Edit']").click()
        box = driver.find_element("css selector", "textarea.edit")
        box.clear()
        box.send_keys("Hello there")
        driver.find_element("xpath", "//button[text()='Save and send']").click()
        last_reply(driver)
        messages = stored_messages(driver)
        assert [m["content"] for m in messages[:1]] == ["Hello there"] and len(messages) == 2
        assert messages[-1]["content"] == api_reply(server, "Hello there", max_tokens=40)["message"]["content"]

        # kept in the browser, and exported as JSON
        driver.refresh()
        wait_for(lambda: len(driver.find_elements("css selector", ".message")) == 2, what="the kept conversation")
        driver.find_element("id", "export").click()
        exported = wait_for(lambda: list(driver.downloads.glob("phikit-chat-*.json")), what="the export")[0]
        data = wait_for(lambda: _json_or_none(exported), what="the export's content")
        assert data["format"] == "phikit-chat"
        assert [m["content"] for m in data["conversations"][0]["messages"]] == [m["content"] for m in messages]

        # JSON-schema mode sends the schema as response_format: the reply is the API's under the same schema
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        driver.find_element("id", "json-mode").click()
        set_field(driver, "json-schema", json.dumps(schema))
        driver.find_element("id", "new-chat").click()
        send(driver, QUESTION)
        last_reply(driver)
        fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        body = {
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 40,
            "response_format": fmt,
        }
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert stored_messages(driver)[-1]["content"] == reply and reply.startswith('{"n"')


def _json_or_none(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@needs_browser
def test_the_page_asks_for_the_api_key_and_sends_it_as_a_header_only(trained, driver):
    folder, _ = trained
    key = "sk-page-test-0123"
    with serve(folder, api_key=key) as server:
        driver.get(server.url + "/")
        driver.execute_script("localStorage.clear(); sessionStorage.clear();")
        driver.get(server.url + "/")
        row = wait_for(lambda: driver.find_element("id", "api-key-row").is_displayed(), what="the key field")
        assert row and "API key" in driver.find_element("id", "server-status").text
        field = driver.find_element("id", "api-key")
        driver.execute_script("window.samePage = true")
        field.send_keys(key + "\n")  # Enter: the key is taken, the page stays (its form is not submitted)
        driver.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait_for(lambda: driver.find_elements("css selector", "#model option"), what="the models")
        assert driver.execute_script("return window.samePage === true")
        said = [e["message"] for e in driver.get_log("browser")]
        assert not any("Password field is not contained in a form" in m for m in said), said
        set_field(driver, "temperature", 0)
        set_field(driver, "max-tokens", BUDGET)
        send(driver, QUESTION)
        last_reply(driver)
        assert stored_messages(driver)[-1]["content"] == api_reply(server, QUESTION, key=key)["message"]["content"]
        urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and not any(key in u for u in urls + [driver.current_url])
        assert key not in driver.execute_script("return JSON.stringify(localStorage)")  # not kept on disk


@needs_browser
def test_other_sites_cannot_use_the_server_from_a_browser(trained, driver):
    folder, _ = trained
    fetch = (
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.text().then(t => done(r.status + ' ' + t))).catch(e => done('blocked ' + e))"
    )
    with serve(folder) as site, serve(folder, cors_origins=[f"http://localhost:{site.port}"]) as shared:
        # a site whose DNS name now points here (rebinding) gets an error, not the page
        driver.get(f"http://evil.example:{site.port}/")
        assert "host_not_allowed" in driver.page_source and not driver.find_elements("id", "messages")
        # a page of another origin (here another server's /health on localhost) may not read the API...
        driver.get(f"http://localhost:{site.port}/health")
        assert driver.execute_async_script(fetch, f"http://127.0.0.1:{site.port}/v1/models").startswith("blocked")
        # ...unless the server names that origin with --cors-origin
        answer = driver.execute_async_script(fetch, f"{shared.url}/v1/models")
        assert answer.startswith("200 ") and '"tiny"' in answer


def test_hosts_origins_and_content_types_are_checked(phi):
    app = create_app(phi.model, phi.tokenizer, "tiny", "guanaco", allowed_hosts=["phi.lan"])
    with Server(app) as s:
        models = f"{s.url}/v1/models"

        def status(headers=None):
            return httpx.get(models, headers=headers or {}).status_code

        assert status() == 200
        for host in (
            "localhost",
            "localhost:1234",
            "127.0.0.1:9",
            "[::1]:8000",
            "phi.lan",
            "PHI.LAN:80",
            "x.localhost",
            "localhost.",
        ):
            assert status({"Host": host}) == 200, host
        refused = httpx.get(models, headers={"Host": "evil.example"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
        assert "--allowed-host evil.example" in refused.json()["error"]["message"]
        assert status({"Host": "evil.example:8000"}) == 400
        assert status({"Host": "127.0.0.1.evil.example"}) == 400
        # a browser request from another origin: refused; from the page's own origin: answered
        other = httpx.get(models, headers={"Origin": "https://evil.example"})
        assert other.status_code == 403 and other.json()["error"]["code"] == "origin_not_allowed"
        assert status({"Origin": s.url}) == 200
        # a cross-site form can send only text/plain or form bodies: not JSON, so refused
        form = httpx.post(
            f"{s.url}/v1/completions", content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"}
        )
        assert form.status_code == 400 and "application/json" in form.json()["error"]["message"]
        page = httpx.get(s.url + "/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(s.url + "/ui/chat.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(s.url + "/ui/../app.py").status_code == 404
    quiet = create_app(phi.model, phi.tokenizer, "tiny", "guanaco", ui=False, cors_origins=["https://app.example"])
    with Server(quiet) as s:
        assert httpx.get(s.url + "/").status_code == 404
        preflight = httpx.options(
            f"{s.url}/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = httpx.get(f"{s.url}/v1/models", headers={"Origin": "https://app.example"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert httpx.get(f"{s.url}/v1/models", headers={"Origin": "https://evil.example"}).status_code == 403


@needs_browser
def test_a_refused_request_leaves_the_conversation_usable(trained, driver):
    """A reply refused before any text (here temperature -1) leaves no turn behind, only the error, and the
    message goes back to the composer: sent again, it is answered as the API answers it (not glued to it). A
    schema that is not JSON is said before anything is sent, and the typed text stays in the composer."""
    folder, _ = trained
    with serve(folder) as server:
        open_page(driver, server)
        set_field(driver, "max-tokens", 30)
        set_field(driver, "temperature", -1)
        send(driver, "Hello")
        error = wait_for(lambda: driver.find_element("id", "error").text, what="the error")
        assert "temperature" in error and not driver.find_elements("css selector", ".message")
        assert driver.find_element("id", "input").get_attribute("value") == "Hello" and stored_messages(driver) == []
        set_field(driver, "temperature", 0)
        send(driver, "Hello")
        last_reply(driver)
        messages = stored_messages(driver)
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hello"
        assert messages[1]["content"] == api_reply(server, "Hello", max_tokens=30)["message"]["content"]
        assert not driver.find_element("id", "error").is_displayed()

        driver.find_element("id", "json-mode").click()
        set_field(driver, "json-schema", "{not json")
        send(driver, "keep me")
        assert "not valid JSON" in wait_for(lambda: driver.find_element("id", "error").text, what="the error")
        assert driver.find_element("id", "input").get_attribute("value") == "keep me"
        assert len(stored_messages(driver)) == 2


@needs_browser
def test_the_page_fits_a_phone_and_the_keyboard_opens_conversations(trained, driver, tmp_path):
    """At a phone's 390 px the conversations sit above the chat: nothing scrolls sideways, the composer keeps
    most of the width; a conversation's title takes the keyboard's focus and Enter opens it."""
    from selenium.webdriver.common.keys import Keys

    folder, _ = trained
    phone = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
    with serve(folder) as server:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
        try:
            open_page(driver, server)
            set_field(driver, "max-tokens", 8)
            set_field(driver, "temperature", 0)
            send(driver, "Hello")
            last_reply(driver)
            driver.find_element("id", "new-chat").click()
            send(driver, "Second")
            last_reply(driver)
            sizes = driver.execute_script(
                "const r = (id) => document.getElementById(id).getBoundingClientRect();"
                "return {page: document.documentElement.scrollWidth, view: window.innerWidth,"
                " input: r('input').width, toggle: r('settings-toggle').right, send: r('send').right};"
            )
            driver.save_screenshot(str(tmp_path / "phone.png"))
            assert sizes["page"] <= sizes["view"] and max(sizes["toggle"], sizes["send"]) <= sizes["view"], sizes
            assert sizes["input"] >= 0.6 * sizes["view"], sizes
            other = next(
                t
                for t in driver.find_elements("css selector", "#conversations .title")
                if t.get_attribute("aria-current") != "true"
            )
            name = other.text
            other.send_keys(Keys.ENTER)
            current = "#conversations li.current .title"
            wait_for(lambda: driver.find_element("css selector", current).text == name, what="the conversation")
            assert driver.switch_to.active_element.text == name  # the keyboard stays on the list
            assert [m["content"] for m in stored_messages(driver)][0] == name
            assert console_errors(driver) == []
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
