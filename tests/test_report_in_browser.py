"""The run report of a real ``make run``, opened in headless Chromium (Debian's ``chromium``;
``.ci/run`` installs it): every image loads, nothing is logged to the console, every stage has
its section, and a screenshot is saved beside the report."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from pipelines import local_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# what the closed network here needs: no call home, no sync, no component updates
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_SECTIONS = ["fingerprint", "ingest", "tag", "augment", "train", "select", "generate", "claims"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


def open_page(browser: Any, path: Path) -> tuple[Any, list[str]]:
    """``path`` loaded in a new page, and every console error and uncaught exception it had."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def images_that_did_not_load(page: Any) -> list[str]:
    """The alt text of every image that did not load or does not decode."""
    return page.evaluate(
        """async () => {
            const images = [...document.images];
            const decoded = await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
            return images.filter((i, n) => !decoded[n] || i.naturalWidth === 0).map(i => i.alt);
        }"""
    )


def test_the_run_report_shows_every_stage_with_every_image_loaded(
    browser: Any, demo_run: local_run.LocalRun
) -> None:
    page, problems = open_page(browser, demo_run.report)

    sections = page.eval_on_selector_all("section.stage", "nodes => nodes.map(n => n.id)")
    assert sections == RUN_SECTIONS
    images = page.eval_on_selector_all("img", "nodes => nodes.length")
    assert images >= 40, "thumbnails, charts, samples and sheets"
    assert images_that_did_not_load(page) == []
    assert problems == []
    # the select section shows a row of training samples per checkpoint, the chosen one marked
    rows = page.eval_on_selector_all("#select table.samples tr", "rows => rows.length")
    chosen = page.eval_on_selector_all("#select table.samples tr.chosen", "rows => rows.length")
    assert rows >= 3 and chosen == 1
    # every link to a full-size file points at a file that is there
    links = page.eval_on_selector_all("main a[href]", "nodes => nodes.map(n => n.href)")
    files = [Path(unquote(link.removeprefix("file://"))) for link in links]
    assert files and all(file.is_file() for file in files), files

    screenshot = demo_run.report.with_name("report.png")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 50_000


def test_each_stage_page_the_kfp_ui_shows_is_its_section_alone(
    browser: Any, demo_run: local_run.LocalRun
) -> None:
    (run_dir,) = (demo_run.report.parent / "pipeline-root").glob("lorapipe-lora-training-*")
    for stage in RUN_SECTIONS[:-1]:
        (artifact,) = [
            *run_dir.glob(f"{stage}*/report"),
            *run_dir.glob(f"for-loop-*/{stage}*/report"),
        ]
        html = artifact.with_name("report.html")
        shutil.copyfile(artifact, html)  # the KFP UI serves the artifact as an HTML page
        page, problems = open_page(browser, html)
        sections = page.eval_on_selector_all("section.stage", "nodes => nodes.map(n => n.id)")
        assert sections == [stage]
        assert images_that_did_not_load(page) == [] and problems == [], stage
        page.close()
    (run_page,) = run_dir.glob("run-report*/report")
    assert run_page.read_text().count('<section class="stage"') == len(RUN_SECTIONS) - 1
