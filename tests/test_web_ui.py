"""The chat page at ``/``: served files and headers over plain HTTP, then the real page driven
in headless Chromium against a real server.

The browser is Debian's ``/usr/bin/chromium`` (never one downloaded by Playwright). Without it
the browser tests are skipped, except under ``CI=true`` where they fail. The tiny model writes
random bytes, so the assertions are about structure (turns, counts, states), not wording.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LONG_CONTEXT, isolated_settings

from shimmy.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "artifacts"
API_KEY = "web-page-test-key"
ASSETS = {
    "/ui/app.js": "text/javascript",
    "/ui/sse.js": "text/javascript",
    "/ui/app.css": "text/css",
    "/ui/favicon.svg": "image/svg+xml",
}
# Generous waits for model loading and generation on a loaded CI machine; they only bound how
# long a broken page takes to fail.
SLOW = 60_000


# --- plain HTTP -----------------------------------------------------------------------------


def csp_directives(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def test_the_page_is_served_with_a_strict_policy(tiny_server: str) -> None:
    response = httpx.get(f"{tiny_server}/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    csp = csp_directives(response.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    # Everything the page loads comes from this server's /ui/ assets.
    html = response.text
    references = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert references and all(ref in ASSETS for ref in references), references
    assert "<script>" not in html and "<style" not in html and " style=" not in html


def test_assets_have_their_types_and_revalidate_cheaply(tiny_server: str) -> None:
    with httpx.Client(base_url=tiny_server) as client:
        for path, media_type in ASSETS.items():
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].split(";")[0] == media_type, path
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-cache"
            etag = response.headers["etag"]
            again = client.get(path, headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b""
            assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
        assert client.get("/ui/missing.js").status_code == 404
        assert client.head("/").status_code == 200


def test_with_api_keys_only_the_page_is_public(
    server_factory: Callable[..., str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, api_keys=[API_KEY]))
    with httpx.Client(base_url=url) as client:
        for path in ["/", *ASSETS]:
            assert client.get(path).status_code == 200, path
        for path in ["/api/models", "/v1/models", "/ui/missing.js", "/api/system"]:
            assert client.get(path).status_code == 401, path
        assert client.post("/", json={}).status_code == 401  # only reads are public
        authorized = {"Authorization": f"Bearer {API_KEY}"}
        assert client.get("/api/models", headers=authorized).status_code == 200
        # The Host check still guards the page (DNS rebinding).
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 403


def test_the_page_can_be_switched_off(
    server_factory: Callable[..., str],
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHIMMY_WEB_UI", "false")
    assert Settings().web_ui is False
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, web_ui=False))
    for path in ["/", "/ui/app.js"]:
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/api/models").status_code == 200


# --- the page in Chromium -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt install chromium) for the web page's tests"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page in a fresh browser profile, with everything it logged and requested."""

    page: Any
    console: list[Any] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def chat_requests(self) -> list[Any]:
        return [
            r
            for r in self.requests
            if r.method == "POST" and r.url.endswith("/v1/chat/completions")
        ]

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.post_data) for r in self.chat_requests()]


@pytest.fixture
def open_tab(browser: Any) -> Iterator[Callable[..., Tab]]:
    contexts: list[Any] = []

    def open_(width: int = 1100, height: int = 700) -> Tab:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(SLOW)
        tab = Tab(page)
        # Playwright tags its handlers with an attribute, which builtins cannot take.
        page.on("console", lambda message: tab.console.append(message))
        page.on("pageerror", lambda error: tab.errors.append(error))
        context.on("request", lambda request: tab.requests.append(request))
        return tab

    yield open_
    for context in contexts:
        context.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def wait_ready(tab: Tab) -> None:
    expect(tab.page.locator("#app")).to_have_attribute("data-state", "ready", timeout=SLOW)


def open_settings(tab: Tab) -> None:
    if tab.page.locator("#settings").is_hidden():
        tab.page.click("#settings-toggle")
    expect(tab.page.locator("#settings")).to_be_visible()


def set_max_tokens(tab: Tab, value: int) -> None:
    open_settings(tab)
    tab.page.fill("#max-tokens", str(value))


def send(tab: Tab, text: str) -> None:
    tab.page.fill("#prompt", text)
    tab.page.press("#prompt", "Enter")


def wait_answer(tab: Tab, index: int) -> Any:
    """The index-th assistant message, once its statistics are shown (the answer is done)."""
    answer = tab.page.locator(".message.assistant").nth(index)
    expect(answer.locator(".meta")).to_contain_text("tok/s", timeout=SLOW)
    return answer


def health(url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/api/health", timeout=30).json()
    return data


@pytest.mark.browser
def test_the_page_loads_cleanly_and_offers_the_model(
    open_tab: Callable[..., Tab], tiny_server: str
) -> None:
    tab = open_tab()
    response = tab.page.goto(tiny_server)
    assert response is not None and response.status == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    wait_ready(tab)
    options = tab.page.locator("#model option")
    expect(options).to_have_count(1)
    assert options.first.get_attribute("value") == "tiny"
    expect(tab.page.locator("#model")).to_have_value("tiny")
    expect(tab.page.locator("#send")).to_be_disabled()  # nothing typed yet
    assert tab.errors == []
    assert [m.text for m in tab.console if m.type in ("error", "warning")] == []
    assert tab.requests and all(r.url.startswith(tiny_server + "/") for r in tab.requests)


@pytest.mark.browser
def test_the_model_picker_preselects_the_default(
    open_tab: Callable[..., Tab],
    server_factory: Callable[..., str],
    tiny_model_path: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.gguf").write_bytes(tiny_model_path.read_bytes())
    (folder / "broken.gguf").write_bytes(b"not a model")
    url = server_factory(isolated_settings(folder, tmp_path, default_model="beta"))
    tab = open_tab()
    tab.page.goto(url)
    wait_ready(tab)
    values = tab.page.locator("#model option").evaluate_all("els => els.map(e => e.value)")
    assert sorted(values) == ["alpha", "beta"]  # the unusable file is not offered
    expect(tab.page.locator("#model")).to_have_value("beta")


@pytest.mark.browser
def test_a_conversation_streams_answers_and_sends_its_history(
    open_tab: Callable[..., Tab], tiny_server: str
) -> None:
    tab = open_tab()
    tab.page.goto(tiny_server)
    wait_ready(tab)
    set_max_tokens(tab, 12)
    tab.page.fill("#seed", "7")

    send(tab, "first question")
    first = wait_answer(tab, 0)
    stats = first.locator(".meta").inner_text()
    assert re.search(r"\b12 tokens\b", stats), stats
    assert "first token" in stats and "prompt" in stats
    first_text = first.locator(".content").text_content()
    assert first_text
    expect(tab.page.locator("#send")).to_be_visible()
    expect(tab.page.locator("#stop")).to_be_hidden()

    # Shift+Enter is a new line, not a send.
    tab.page.fill("#prompt", "second")
    tab.page.press("#prompt", "Shift+Enter")
    tab.page.keyboard.type("question")
    expect(tab.page.locator("#prompt")).to_have_value("second\nquestion")
    expect(tab.page.locator(".message.user")).to_have_count(1)
    tab.page.click("#send")
    wait_answer(tab, 1)
    expect(tab.page.locator(".message.user").nth(1).locator(".content")).to_have_text(
        "second\nquestion"
    )

    first_body, second_body = tab.chat_bodies()
    assert first_body["stream"] is True
    assert first_body["stream_options"] == {"include_usage": True}
    assert first_body["model"] == "tiny"
    assert first_body["max_tokens"] == 12 and first_body["seed"] == 7
    assert first_body["messages"] == [{"role": "user", "content": "first question"}]
    assert second_body["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "second\nquestion"},
    ]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(ARTIFACTS / "web-chat.png"))

    tab.page.click("#new-chat")
    expect(tab.page.locator(".message")).to_have_count(0)
    send(tab, "fresh start")
    wait_answer(tab, 0)
    assert tab.chat_bodies()[-1]["messages"] == [{"role": "user", "content": "fresh start"}]
    assert tab.errors == []


@pytest.mark.browser
def test_stop_ends_a_long_generation_and_the_server_answers_again(
    open_tab: Callable[..., Tab], long_server: Callable[..., str]
) -> None:
    url = long_server()
    tab = open_tab()
    tab.page.goto(url)
    wait_ready(tab)
    set_max_tokens(tab, LONG_CONTEXT - 200)
    send(tab, "go on forever")
    answer = tab.page.locator(".message.assistant").first
    expect(answer.locator(".content")).not_to_have_text("", timeout=SLOW)
    expect(tab.page.locator("#stop")).to_be_visible()
    assert health(url)["slots"]["busy"] == 1  # far from done: the Stop below is what ends it

    # A click event straight to the button: with text streaming in, the layout keeps moving
    # and a mouse click would wait for the button to hold still.
    tab.page.locator("#stop").dispatch_event("click")
    expect(tab.page.locator("#app")).to_have_attribute("data-state", "ready")
    expect(tab.page.locator("#stop")).to_be_hidden()
    expect(answer.locator(".meta")).to_contain_text("stopped")
    # The server noticed the disconnect and freed its only slot (well before the minutes
    # the answer would have taken: each health call is a fresh look, no sleeping).
    deadline = time.monotonic() + 30
    while health(url)["slots"]["busy"] != 0:
        assert time.monotonic() < deadline, "the stopped generation still holds the slot"

    set_max_tokens(tab, 8)
    send(tab, "and now briefly")
    wait_answer(tab, 1)
    last = tab.chat_bodies()[-1]["messages"]
    partial = answer.locator(".content").text_content()
    assert last[1] == {"role": "assistant", "content": partial}  # what the user saw
    assert tab.errors == []


@pytest.mark.browser
def test_settings_persist_across_reload_and_are_sent(
    open_tab: Callable[..., Tab], tiny_server: str
) -> None:
    tab = open_tab()
    tab.page.goto(tiny_server)
    wait_ready(tab)
    open_settings(tab)
    tab.page.fill("#temperature", "0.3")
    tab.page.fill("#top-p", "0.5")
    tab.page.fill("#max-tokens", "9")
    tab.page.fill("#seed", "42")
    tab.page.fill("#system-prompt", "Be brief.")

    tab.page.reload()
    wait_ready(tab)
    open_settings(tab)
    expect(tab.page.locator("#temperature")).to_have_value("0.3")
    expect(tab.page.locator("#top-p")).to_have_value("0.5")
    expect(tab.page.locator("#max-tokens")).to_have_value("9")
    expect(tab.page.locator("#seed")).to_have_value("42")
    expect(tab.page.locator("#system-prompt")).to_have_value("Be brief.")

    send(tab, "hello")
    wait_answer(tab, 0)
    body = tab.chat_bodies()[-1]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        0.3,
        0.5,
        9,
        42,
    )
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]

    # An out-of-range value is pointed out, not replaced or sent.
    tab.page.fill("#temperature", "3")
    send(tab, "too hot")
    expect(tab.page.locator("#temperature")).to_be_focused()
    expect(tab.page.locator("#prompt")).to_have_value("too hot")
    assert len(tab.chat_bodies()) == 1

    tab.page.click("#reset-settings")
    expect(tab.page.locator("#max-tokens")).to_have_value("512")
    expect(tab.page.locator("#seed")).to_have_value("")
    assert tab.errors == []


@pytest.mark.browser
def test_an_api_key_is_asked_for_remembered_and_sent(
    open_tab: Callable[..., Tab],
    server_factory: Callable[..., str],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, api_keys=[API_KEY]))
    tab = open_tab()
    response = tab.page.goto(url)
    assert response is not None and response.status == 200
    key_form = tab.page.locator("#key-form")
    expect(key_form).to_be_visible()  # /api/models answered 401

    tab.page.fill("#api-key", "wrong-key")
    tab.page.press("#api-key", "Enter")
    expect(tab.page.locator("#key-message")).to_contain_text("refused")
    tab.page.fill("#api-key", API_KEY)
    tab.page.click("#save-key")
    wait_ready(tab)
    expect(key_form).to_be_hidden()
    expect(tab.page.locator("#model")).to_have_value("tiny")
    set_max_tokens(tab, 6)
    send(tab, "with a key")
    wait_answer(tab, 0)

    # Remembered across a reload.
    tab.page.reload()
    wait_ready(tab)
    expect(key_form).to_be_hidden()

    # A chat request that meets a 401 asks again, then sends the message once the key is in.
    open_settings(tab)
    tab.page.click("#forget-key")
    send(tab, "after forgetting")
    expect(key_form).to_be_visible()
    expect(tab.page.locator(".message")).to_have_count(0)
    tab.page.fill("#api-key", API_KEY)
    tab.page.press("#api-key", "Enter")
    wait_answer(tab, 0)
    expect(tab.page.locator(".message.user .content")).to_have_text("after forgetting")

    assert [r.all_headers().get("authorization") for r in tab.chat_requests()] == [
        f"Bearer {API_KEY}",
        None,
        f"Bearer {API_KEY}",
    ]
    assert tab.errors == []


@pytest.mark.browser
def test_api_errors_are_shown_readably(open_tab: Callable[..., Tab], tiny_server: str) -> None:
    tab = open_tab()
    tab.page.goto(tiny_server)
    wait_ready(tab)
    open_settings(tab)
    tab.page.fill("#system-prompt", "far too long " * 2000)  # beyond the 1024-token context
    send(tab, "hello")
    error = tab.page.locator(".error")
    expect(error).to_be_visible(timeout=SLOW)
    message = error.inner_text()
    assert "context" in message.lower() and "{" not in message, message
    expect(tab.page.locator("#app")).to_have_attribute("data-state", "ready")
    expect(tab.page.locator("#prompt")).to_have_value("hello")  # ready to try again
    expect(tab.page.locator(".message.assistant")).to_have_count(0)
    assert tab.errors == []


@pytest.mark.browser
def test_model_text_is_shown_as_text_never_as_markup(
    open_tab: Callable[..., Tab], tiny_server: str
) -> None:
    hostile = '<img src="/x" onerror="window.pwned=1"><b>bold</b>'
    chunk = {"choices": [{"index": 0, "delta": {"content": hostile}, "finish_reason": None}]}
    stream = (
        f"data: {json.dumps(chunk)}\r\n\r\n"
        ': a comment\n\ndata: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,'
        '"total_tokens":8}}\n\ndata: [DONE]\n\n'
    )
    tab = open_tab()
    tab.page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream),
    )
    tab.page.goto(tiny_server)
    wait_ready(tab)
    send(tab, "say something nasty")
    answer = wait_answer(tab, 0)
    expect(answer.locator(".content")).to_have_text(hostile)
    expect(answer.locator(".meta")).to_contain_text("5 tokens")
    assert answer.locator("img, b").count() == 0
    assert tab.page.evaluate("window.pwned") is None

    error = {"error": {"message": "Model exploded", "type": "server_error", "code": "x"}}
    tab.page.unroute("**/v1/chat/completions")
    tab.page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n",
        ),
    )
    send(tab, "again")
    expect(tab.page.locator(".error")).to_have_text("Model exploded")
    assert tab.errors == []


@pytest.mark.browser
def test_the_policy_blocks_inline_script(open_tab: Callable[..., Tab], tiny_server: str) -> None:
    tab = open_tab()
    tab.page.goto(tiny_server)
    wait_ready(tab)
    violated = tab.page.evaluate(
        """() => new Promise((resolve) => {
            document.addEventListener("securitypolicyviolation",
                (e) => resolve(e.effectiveDirective), { once: true });
            const script = document.createElement("script");
            script.textContent = "window.inlineRan = true";
            document.body.append(script);
        })"""
    )
    assert violated == "script-src-elem"
    assert tab.page.evaluate("window.inlineRan") is None


@pytest.mark.browser
def test_the_event_parser_survives_any_chunking(
    open_tab: Callable[..., Tab], tiny_server: str
) -> None:
    tab = open_tab()
    tab.page.goto(tiny_server)
    wait_ready(tab)
    # Every split position of a stream mixing line endings, comments, multi-line data and a
    # four-byte character, fed as bytes so the character itself gets split too.
    stream = (
        'data: {"a":1}\r\ndata: 2\r\n\r\n: keep-alive\n\ndata: first\ndata:second\r\r'
        "id: 3\nevent: x\ndata: café 😀\n\ndata: [DONE]\n\ndata: cut"
    )
    result = tab.page.evaluate(
        """async (text) => {
            const { SseParser } = await import("/ui/sse.js");
            const bytes = new TextEncoder().encode(text);
            const runs = [];
            for (let i = 0; i <= bytes.length; i++) {
                for (let j = i; j <= bytes.length; j += 7) {
                    const parser = new SseParser();
                    const events = [
                        ...parser.push(bytes.slice(0, i)),
                        ...parser.push(bytes.slice(i, j)),
                        ...parser.push(bytes.slice(j)),
                        ...parser.end(),
                    ];
                    runs.push(JSON.stringify(events));
                }
            }
            return [...new Set(runs)];
        }""",
        stream,
    )
    expected = ['{"a":1}\n2', "first\nsecond", "café 😀", "[DONE]"]
    assert result == [json.dumps(expected, ensure_ascii=False, separators=(",", ":"))]


@pytest.mark.browser
def test_the_page_fits_a_phone_screen(open_tab: Callable[..., Tab], tiny_server: str) -> None:
    tab = open_tab(width=360, height=640)
    tab.page.goto(tiny_server)
    wait_ready(tab)
    set_max_tokens(tab, 40)
    tab.page.click("#settings-toggle")
    send(tab, "a narrow screen")
    wait_answer(tab, 0)
    overflow = tab.page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0
    for selector in ("#send", "#prompt", "#model", "#new-chat"):
        box = tab.page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
