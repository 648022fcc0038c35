"""The dashboard shows who is left out of planning and why, and why no ring can serve
(headless Chromium against real nodes on loopback; see tests/test_dashboard.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from dnet.local_ring import free_port
from tests.mesh import LocalMesh, hiding, ring_covers, wait_for
from tests.test_dashboard import WAIT_MS, page  # noqa: F401  (the browser fixture)

pytestmark = pytest.mark.slow


def test_the_dashboard_shows_an_excluded_node_and_its_reason(mesh: LocalMesh, page: Page,  # noqa: F811
                                                             qwen3_model: Path) -> None:
    good = mesh.add("good", budget="64MB")
    wait_for(mesh, ring_covers(8), 90, "a ring")
    mesh.add("broken", budget="64MB", propose=False, prefix=hiding(qwen3_model),
             http_port=free_port(), grpc_port=free_port())
    wait_for(mesh, lambda v: any(n["excluded"] for n in v["nodes"]), 90, "the exclusion")
    page.goto(f"{good.url}/")
    row = page.locator("#nodes tbody tr", has_text="broken")
    expect(row.locator(".badge.excluded")).to_have_text("excluded: load error",
                                                       timeout=WAIT_MS)
    expect(row.locator(".exclusion")).to_contain_text("cannot read")
    expect(row.locator(".exclusion")).to_contain_text("or when it changes")
    expect(page.locator("#entry-list")).not_to_contain_text("broken")
    expect(page.locator("#last-error")).to_be_hidden()


def test_the_dashboard_says_why_no_ring_can_serve(mesh: LocalMesh, page: Page) -> None:  # noqa: F811
    node = mesh.add("tiny", budget="1MB")
    wait_for(mesh, lambda v: "bytes" in v["unavailable"], 90, "the verdict")
    page.goto(f"{node.url}/")
    expect(page.locator("#last-error")).to_contain_text("No ring can serve: cannot run",
                                                        timeout=WAIT_MS)
    expect(page.locator("#last-error")).to_contain_text("bytes")
