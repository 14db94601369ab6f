"""The playground in a real browser: Playwright driving Debian's ``chromium`` (browser downloads are blocked here,
so ``executable_path``) against a bare ``proxy-serve`` (the trained demo family) behind an API key.

It types the key, runs the demo question, and checks that the three columns fill, that the proxy-tuned column
answers exactly "Islebrook" where the base alone does not (the base knows the fact but runs on into a made-up
dialogue), that hovering a token shows the four distributions (base, expert, anti-expert, proxy), and that
moving alpha to 0 makes the proxy-tuned answer the base's. ``PLAYGROUND_SCREENSHOT=<path>`` (``make
test-browser``) writes the README's screenshot. Skipped, with the reason, without chromium or Playwright.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.harness import ServerProcess, free_port
from tests.browser.requirements import CHROMIUM, browser_missing, skip_unless_ready

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-playground-test"
ANSWER = "Islebrook"
TIMEOUT_MS = 120_000  # two shared cores may be busy with other tests

# `make test-browser` sets it: there a missing browser is a failure, not a skip.
REQUIRED = bool(os.environ.get("PROXY_SERVE_REQUIRE_BROWSER"))


def _missing() -> str | None:
    if (missing := browser_missing()) is not None:
        return missing
    if not (ROOT / "demo" / "models" / "base" / "config.json").exists():
        return "the trained demo family is absent"
    return None


MISSING = _missing()
pytestmark = skip_unless_ready(MISSING, REQUIRED, "make test-browser")
if MISSING is None:
    from playwright import sync_api


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """A bare ``proxy-serve`` (the built-in demo) with an API key, on a free loopback port."""
    port = free_port()
    env = {**os.environ, "PROXY_SERVE_PORT": str(port), "PROXY_SERVE_HOST": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    server = ServerProcess(name="proxy-serve", command=[sys.executable, "-m", "server", "--api-key", KEY], env=env,
                           port=port, log_path=tmp_path_factory.mktemp("playground") / "server.log")
    server.start(timeout_s=180)
    yield server
    server.stop(grace_s=30)


@pytest.fixture(scope="module")
def page(demo_server):
    with sync_api.sync_playwright() as playwright:
        # As root (containers, CI) chromium's sandbox cannot start; the page is our own, from loopback.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 760})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{demo_server.url}/playground/")
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def column_text(page, name: str) -> str:
    return page.locator(f"#column-{name} .text").inner_text()


def proxy_text(page) -> str:
    """The proxy-tuned answer: its tokens' own texts, the stop token (shown apart) left out."""
    tokens = page.locator("#column-proxy .tok:not(.special)")
    return "".join(tokens.evaluate_all("els => els.map(e => e.dataset.token)"))


def wait_done(page, names: list[str]) -> None:
    for name in names:
        sync_api.expect(page.locator(f"#column-{name}")).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)


def test_playground_end_to_end(page):
    expect = sync_api.expect
    # Without the key the page cannot list the models; with it, the three served ids fill the selects.
    expect(page.locator("#status")).to_contain_text("API key")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # change: the key is kept for the tab and the models are listed
    expect(page.locator("#model-proxy option")).to_have_count(3)
    assert page.input_value("#model-proxy") == "proxy-tuned"
    assert page.input_value("#model-base") == "proxy-tuned:base"
    assert page.input_value("#model-expert") == "proxy-tuned:expert"
    assert page.input_value("#temperature") == "0"  # greedy by default: the columns compare
    assert page.input_value("#alpha-0") == "1"  # the configured alpha, from the model card

    page.fill("#prompt", "Where does Anouk Brenner live?")
    page.click("#run")
    wait_done(page, ["base", "expert", "proxy"])

    base, expert = column_text(page, "base"), column_text(page, "expert")
    assert base.strip() and expert.strip() and page.locator("#column-proxy .tok").count() > 0
    assert proxy_text(page).strip() == ANSWER
    assert base.strip() != ANSWER  # the base alone rambles on past the answer

    page.hover("#column-proxy .tok >> nth=0")
    details = page.locator("#details")
    expect(details).to_be_visible()
    distributions = details.locator(".dist")
    expect(distributions).to_have_count(4)
    assert distributions.evaluate_all("els => els.map(e => e.dataset.role)") == [
        "base", "expert", "anti_expert", "proxy"]
    for i in range(4):
        assert distributions.nth(i).locator("tr").count() == 5  # top-k shown, 5 by default
    expect(details).to_contain_text(ANSWER)
    expect(page.locator("#summary .share")).to_contain_text("top token differs from the base's")
    expect(page.locator("#summary .shifted li").first).to_be_visible()

    screenshot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot)

    # alpha 0: the slider re-runs the proxy-tuned column, which is now the base alone, token for token.
    page.focus("#alpha-0")
    page.keyboard.press("Home")
    expect(page.locator("#alpha-0 + output")).to_have_text("0.00")
    wait_done(page, ["proxy"])
    assert proxy_text(page) == base
    expect(page.locator("#summary .share")).to_contain_text("on 0 of")


def test_the_page_needs_no_network(page, demo_server):
    """Every file the page loaded came from the server itself (no CDN)."""
    origins = page.evaluate("() => performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert origins and set(origins) == {demo_server.url}



def test_summary_functions_in_the_browser(page):
    """analysis.js, as the browser runs it: the paper's two numbers from a hand-made list of entries."""

    def entry(token: str, shift: float, base_top: int, proxy_top: int) -> dict:
        def model(top: int) -> dict:
            return {"logprob": -1.0, "top_logprobs": [{"token": "x", "token_id": top, "logprob": -0.5}]}

        return {"token": token, "token_id": proxy_top, "shift": shift,
                "models": {"base": model(base_top), "expert": model(9), "anti_expert": model(9),
                           "proxy": model(proxy_top)}}

    entries = [entry(" a", 2.5, 1, 2), entry(" b", -0.1, 3, 3), entry("\n", -6.0, 4, 5), entry(" d", 0.0, 6, 6)]
    result = page.evaluate(
        """async (entries) => {
            const m = await import("./analysis.js");
            return {summary: m.summarize(entries, 2), roles: m.roles(entries[0]), up: m.shiftColour(9),
                    down: m.shiftColour(-0.1), visible: m.visible("a\\nb"), percent: m.percent(Math.log(0.5))};
        }""",
        entries,
    )
    summary = result["summary"]
    assert summary["tokens"] == 4 and summary["changed"] == [0, 2] and summary["share"] == 0.5
    assert [(m["position"], m["shift"]) for m in summary["mostShifted"]] == [(2, -6.0), (0, 2.5)]
    assert result["roles"] == ["base", "expert", "anti_expert", "proxy"]
    assert result["up"] == "rgba(30, 150, 80, 0.800)" and result["down"].startswith("rgba(225, 105, 30, 0.0")
    assert result["visible"] == "a↵\nb" and result["percent"] == "50%"
