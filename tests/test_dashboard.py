"""The dashboard at `/`, driven in headless Chromium against a real two-node mesh on loopback.

Needs /usr/bin/chromium (`.ci/run` installs it) and the `playwright` package; the browser is the
system's, never one that Playwright downloads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.mesh import LocalMesh, ring_covers, wait_for

pytestmark = pytest.mark.slow  # starts real processes

CHROMIUM = Path("/usr/bin/chromium")
# The machine's network is closed: without the background-networking flags Chromium keeps
# trying to reach Google's services and floods the log with refused connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
NUM_LAYERS = 8
TWO_WAY = "6MB"  # see test_mesh.py: with 6 MB budgets both nodes hold layers
WAIT_MS = 20_000


@pytest.fixture
def page() -> Iterator[Page]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the dashboard test needs the system Chromium, which "
                    "`.ci/run` installs (apt-get install chromium)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


def test_dashboard_shows_the_mesh_live_and_chats(mesh: LocalMesh, page: Page) -> None:
    first = mesh.add("node0", budget=TWO_WAY)
    mesh.add("node1", budget=TWO_WAY, propose=False)
    view = wait_for(mesh, ring_covers(NUM_LAYERS, size=2), 90, "a ring of two nodes")
    coordinator = next(n["name"] for n in view["nodes"] if n["coordinator"])
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{first.url}/")
    ring = page.locator("#ring")
    # Both members drawn on the ring, in its order, and the coordinator marked.
    expect(ring.locator(".node")).to_have_count(2, timeout=WAIT_MS)
    for name in ("node0", "node1"):
        expect(ring.locator(".node", has_text=name)).to_have_count(1)
    expect(ring.locator(".node.coordinator")).to_contain_text(f"★ {coordinator}")
    expect(page.locator("#ring-path")).to_contain_text(" → ")
    expect(page.locator("#nodes tbody tr")).to_have_count(2)
    expect(page.locator("#nodes")).to_contain_text("MiB")  # memory in human units
    # Each shard's prefix cache: bytes held of its capacity, and its hits once looked up.
    expect(page.locator("#nodes thead")).to_contain_text("Prefix cache")
    expect(page.locator("#nodes tbody")).to_contain_text("no lookups yet")
    expect(page.locator("#model")).to_have_text(view["model"])
    expect(page.locator("#epoch")).to_have_text(str(view["epoch"]))
    expect(page.locator("#status")).to_contain_text("live")

    # The chat streams an answer in (random weights: gibberish, but not nothing).
    page.fill("#max-tokens", "12")
    page.fill("#chat-input", "What is 2+2?")
    with page.expect_response("**/v1/chat/completions") as chat:
        page.click("#chat-send")
    assert chat.value.status == 200
    assert chat.value.headers["content-type"].startswith("text/event-stream")
    assert chat.value.request.post_data_json["stream"] is True
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=60_000)
    assert answer.locator(".text").inner_text().strip(), "no text streamed in"
    expect(answer.locator(".error")).to_have_count(0)
    expect(page.locator(".msg.user")).to_have_text(re.compile("What is 2\\+2\\?"))
    # The entry's decode speed from that answer, in the next polls.
    expect(page.locator("#rate")).to_have_text(re.compile(r"^\d+\.\d$"), timeout=WAIT_MS)
    expect(page.locator("#latency")).to_contain_text(re.compile(r"measured \d"))

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # A third node shows up without reloading the page: the dashboard polls.
    mesh.add("node2", budget=TWO_WAY, propose=False)
    expect(page.locator("#ring-panel")).to_contain_text("node2", timeout=30_000)
    expect(page.locator("#nodes tbody tr")).to_have_count(3)

    # The node behind the page goes away: the page says so instead of freezing.
    mesh.kill(first)
    expect(page.locator("#status")).to_contain_text("unreachable", timeout=WAIT_MS)
    assert not errors, f"errors in the page: {errors}"
