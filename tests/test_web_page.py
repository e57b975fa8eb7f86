"""The page at `/` in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a real server on 127.0.0.1 with the tiny bundle. Nothing is downloaded at test time."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'sdedge[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed (the dev extra: pip install 'sdedge[dev]')")

import test_server
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_server import SLOW, TOKEN, ThreadServer

from sdedge.benchmarks.page import launch_chromium
from sdedge.runtime.server import ServeSettings, create_app

unsigned_bundle, pipe = test_server.unsigned_bundle, test_server.pipe  # the tiny bundle's fixtures


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = launch_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(pipe):
    with ThreadServer(create_app(pipe, ServeSettings(allow_unsigned=True, max_queue=4, timeout=60))) as srv:
        yield srv


def wait(browser, condition, timeout: float = 30, what: str = ""):
    return WebDriverWait(browser, timeout, poll_frequency=0.02).until(lambda d: condition(d), message=what)


def el(browser, element_id: str):
    return browser.find_element(By.ID, element_id)


def fill(browser, element_id: str, text) -> None:
    field = el(browser, element_id)
    field.clear()
    field.send_keys(str(text))


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#scheduler option"), what="the form was not filled")


def result_png(browser) -> tuple[int, int, bytes]:
    """The shown image's natural size and the first bytes of the file behind it (and behind the download link)."""
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1], img = document.getElementById('output');
        const link = document.getElementById('download');
        if (link.href !== img.src) { done([0, 0, []]); return; }
        fetch(img.src).then(r => r.arrayBuffer()).then(b => done([img.naturalWidth, img.naturalHeight,
            Array.from(new Uint8Array(b).slice(0, 8))])).catch(e => done([0, 0, [String(e)]]));
    """)


def requested_urls(browser) -> list[str]:
    return browser.execute_script(
        "return performance.getEntries().filter(e => e.entryType === 'navigation' || e.entryType === 'resource')"
        ".map(e => e.name)")


def png_file(path, size, color, mode="RGB"):
    from PIL import Image

    Image.new(mode, size, color).save(path, "PNG")
    return str(path)


# -- the page ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_page_generates_shows_progress_cancels_its_job_and_shows_the_servers_errors(browser, server, tmp_path):
    t0 = time.monotonic()
    open_page(browser, server.url)
    fill(browser, "prompt", "a red circle")
    fill(browser, "width", 64)
    fill(browser, "height", 48)
    el(browser, "generate").click()
    wait(browser, lambda d: el(d, "status").text == "done", what="the first image did not arrive")
    first_image = time.monotonic() - t0
    width, height, head = result_png(browser)
    assert (width, height) == (64, 48)
    assert bytes(head) == b"\x89PNG\r\n\x1a\n"
    shown = el(browser, "settings").text
    assert "a red circle" in shown and "64 × 48" in shown and "seed" in shown
    assert el(browser, "download").get_attribute("download").endswith(".png")
    print(f"\npage load to first image: {first_image:.2f} s")

    # a long job of this page: progress, then cancelled by its id while another client's job waits behind it
    fill(browser, "steps", SLOW["steps"])
    fill(browser, "width", SLOW["width"])
    fill(browser, "height", SLOW["height"])
    el(browser, "generate").click()
    seen = wait(browser, lambda d: (m := _step(el(d, "status").text)) and 0 < m[0] < m[1] and m,
                what="no per-step progress was shown")
    assert seen[1] == SLOW["steps"]
    assert 0 < float(el(browser, "progress").get_attribute("value")) < SLOW["steps"]
    page_job = browser.find_element(By.TAG_NAME, "body").get_attribute("data-job")
    other = {}

    def other_client():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            other["r"] = c.post("/v1/generate", json={"prompt": "a blue square", "steps": 3},
                                headers={"x-job-id": "other-client-job"})

    thread = threading.Thread(target=other_client)
    thread.start()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        wait(browser, lambda d: c.get("/v1/jobs/other-client-job").status_code == 200, what="other job not queued")
        el(browser, "cancel").click()
        wait(browser, lambda d: el(d, "status").text == "cancelled", what="the page did not show the cancel")
        thread.join(60)
        assert other["r"].status_code == 200 and other["r"].content.startswith(b"\x89PNG")
        cancelled = c.get(f"/v1/jobs/{page_job}").json()
        assert cancelled["state"] == "cancelled" and cancelled["steps_done"] < SLOW["steps"]
    assert el(browser, "error").text == ""

    # the server's own messages for a bad size
    fill(browser, "steps", 2)
    for bad, message in ((72, "multiple of 16"), (1024, "less than or equal to 128")):
        fill(browser, "width", bad)
        el(browser, "generate").click()
        wait(browser, lambda d, m=message: m in el(d, "error").text, what=f"no message for width {bad}")
        assert "width" in el(browser, "error").text

    urls = requested_urls(browser)
    assert any(u.endswith("/static/app.js") for u in urls) and any("/events" in u for u in urls)
    outside = [u for u in urls if not (u.startswith(server.url + "/") or u.startswith(f"blob:{server.url}/"))]
    assert not outside, outside  # no request from the page left the host
    browser.save_screenshot(str(tmp_path / "page.png"))


def _step(text: str):
    import re

    m = re.fullmatch(r"step (\d+)/(\d+)", text)
    return (int(m[1]), int(m[2])) if m else None


@pytest.mark.slow
def test_page_image_to_image_and_inpainting(browser, server, tmp_path):
    open_page(browser, server.url)
    assert el(browser, "init").is_displayed() and el(browser, "mask-row").is_displayed()
    fill(browser, "prompt", "a red circle")
    fill(browser, "steps", 4)
    fill(browser, "width", 64)
    fill(browser, "height", 64)
    el(browser, "image").send_keys(png_file(tmp_path / "init.png", (100, 80), (200, 30, 30)))
    el(browser, "generate").click()
    wait(browser, lambda d: el(d, "status").text == "done", what="img2img did not answer")
    assert result_png(browser)[:2] == [64, 64]
    assert "img2img" in el(browser, "settings").text and "strength" in el(browser, "settings").text
    el(browser, "mask").send_keys(png_file(tmp_path / "mask.png", (100, 80), 255, "L"))
    el(browser, "generate").click()
    wait(browser, lambda d: el(d, "status").text == "done" and "inpaint" in el(d, "settings").text,
         what="inpaint did not answer")
    el(browser, "image").clear()  # a mask without an image: the page says so
    el(browser, "generate").click()
    wait(browser, lambda d: "give the image" in el(d, "error").text)
    urls = requested_urls(browser)
    assert any(u.endswith("/v1/img2img") for u in urls) and any(u.endswith("/v1/inpaint") for u in urls)


@pytest.mark.slow
def test_page_asks_for_the_token(browser, pipe):
    app = create_app(pipe, ServeSettings(allow_unsigned=True, token=TOKEN))
    with ThreadServer(app) as srv:
        browser.execute_script("sessionStorage.clear()")
        open_page(browser, srv.url)
        assert el(browser, "auth").is_displayed()
        fill(browser, "prompt", "a red circle")
        fill(browser, "steps", 2)
        el(browser, "generate").click()
        wait(browser, lambda d: "missing or wrong bearer token" in el(d, "error").text)
        fill(browser, "token", TOKEN)
        el(browser, "use-token").click()
        assert not el(browser, "auth").is_displayed()
        el(browser, "generate").click()
        wait(browser, lambda d: el(d, "status").text == "done", what="no image with the token")
        assert bytes(result_png(browser)[2]) == b"\x89PNG\r\n\x1a\n"
        browser.execute_script("sessionStorage.clear()")
