"""Open the built docs site in a real headless Chromium (Debian's package) and use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _site import build_site, require, serve

# one pytest-xdist worker runs this file (--dist loadgroup): its module fixtures run once
pytestmark = pytest.mark.xdist_group("site")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Offline: no sandbox as root, no GPU, and none of the background connections Chromium
# would otherwise try (and fail) to make at start.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    require(CHROMIUM is not None, "chromium (apt-get install chromium)")
    sync_api = _playwright()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _playwright():  # type: ignore[no-untyped-def]
    try:
        from playwright import sync_api
    except ImportError:
        require(False, "playwright")
    return sync_api


@pytest.fixture(scope="module")
def site() -> Path:
    return build_site()


def _pages(site: Path) -> list[str]:
    return sorted(
        str(p.relative_to(site).parent).replace(".", "") + "/"
        for p in site.rglob("index.html")
        if "assets" not in p.parts
    )


def test_every_page_renders_without_javascript_errors(browser, site: Path) -> None:  # type: ignore[no-untyped-def]
    pages = _pages(site)
    assert len(pages) >= 15, pages
    errors: list[str] = []
    with serve(site) as base:
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
        page.on(
            "console",
            lambda m: errors.append(f"{page.url}: {m.text}") if m.type == "error" else None,
        )
        page.on(
            "requestfailed",
            # ERR_ABORTED: a request cut off by the next navigation, not a missing file
            lambda r: (
                None
                if "ERR_ABORTED" in (r.failure or "")
                else errors.append(f"{page.url}: failed {r.url} ({r.failure})")
            ),
        )
        page.on(
            "response",
            lambda r: errors.append(f"{page.url}: {r.status} {r.url}") if r.status >= 400 else None,
        )
        for rel in pages:
            response = page.goto(base + "/" + rel.lstrip("/"), wait_until="load")
            assert response is not None and response.ok, rel
            assert page.locator("h1").first.inner_text().strip(), f"{rel} has no title"
        page.close()
    assert errors == []


def test_home_page_renders(browser, site: Path) -> None:  # type: ignore[no-untyped-def]
    with serve(site) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/", wait_until="load")
        assert "momentum-contrast" in page.title()
        assert page.locator("h1").first.inner_text().strip(" ¶\n") == "momentum-contrast"
        assert page.locator("table").count() >= 1  # the comparison table
        assert page.locator("nav.md-nav--primary").is_visible()
        shots = site / "screenshots"
        shots.mkdir(exist_ok=True)
        page.screenshot(path=str(shots / "home.png"), full_page=True)
        assert (shots / "home.png").stat().st_size > 10_000
        page.close()


def test_api_page_shows_momentum_encoder_with_its_signature(browser, site: Path) -> None:  # type: ignore[no-untyped-def]
    with serve(site) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/api/encoder/", wait_until="load")
        heading = page.locator("h2#momentum_contrast.encoder.MomentumEncoder".replace(".", "\\."))
        assert heading.is_visible()
        signature = page.locator(".doc-signature").filter(has_text="MomentumEncoder(").first
        text = signature.inner_text()
        for part in ("online", "momentum", "0.999", "buffers"):
            assert part in text, text
        page.screenshot(path=str(site / "screenshots" / "api-encoder.png"))
        page.close()


def test_site_search_finds_key_queue(browser, site: Path) -> None:  # type: ignore[no-untyped-def]
    with serve(site) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/", wait_until="load")
        page.locator("label.md-search__icon, .md-search__input").first.click()
        search = page.locator("input.md-search__input")
        results = page.locator(".md-search-result__item")
        # the index is built in a web worker after load: on a busy 2-core machine that
        # takes a while, so type again until results show (at most a minute)
        for _ in range(6):
            search.fill("")
            search.type("KeyQueue")
            try:
                results.first.wait_for(state="visible", timeout=10_000)
                break
            except _playwright().TimeoutError:
                continue
        assert results.count() > 0, "the site search found nothing for KeyQueue"
        assert "KeyQueue" in results.first.inner_text()
        links = [
            results.nth(i).locator("a").first.get_attribute("href")
            for i in range(min(results.count(), 5))
        ]
        assert any("api/queue" in (h or "") for h in links), links
        page.screenshot(path=str(site / "screenshots" / "search.png"))
        page.close()
