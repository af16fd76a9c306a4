"""What the server tests share: Debian's chromium, driven through Playwright, for the studio's browser tests."""

from pathlib import Path

import pytest
from playwright import sync_api as playwright
from servers import ARGS, CHROMIUM


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()
