"""The page's speed: from page load to the first image shown, in headless Chromium against `sdedge serve`'s app
on 127.0.0.1 (the same uvicorn configuration as `sdedge serve`).

    python -m sdedge.benchmarks.page BUNDLE --out benchmarks/results/page [--runs 5] [--threads N]

Each run navigates to `/` afresh (the page, its script and style sheet, /v1/info), types a prompt and presses
Generate with the bundle's defaults; the time ends when the page shows the image. The first run is reported
apart (Chromium's own start-up is not in any run). Needs Debian's chromium and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1000,1400")


def launch_chromium(profile: Path):
    """Headless Chromium from the system's packages (chromium, chromedriver) through Selenium, with a fresh
    profile and nothing that reaches the network on its own; nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    options = Options()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    browser.set_script_timeout(30)
    return browser


def first_image_seconds(browser, url: str, prompt: str = "a red circle") -> float:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.005)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#scheduler option"))
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(bundle: str, runs: int, threads: int | None) -> dict:
    import uvicorn

    from sdedge.runtime.pipeline import Pipeline
    from sdedge.runtime.server import ServeSettings, create_app, server_config

    pipe = Pipeline.load(bundle, verify="off", threads=threads)
    port = _free_port()
    server = uvicorn.Server(server_config(create_app(pipe, ServeSettings(allow_unsigned=True)), "127.0.0.1", port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    m = pipe.manifest
    try:
        with tempfile.TemporaryDirectory(prefix="sdedge-page-bench-") as profile:
            browser = launch_chromium(Path(profile))
            try:
                times = [first_image_seconds(browser, f"http://127.0.0.1:{port}") for _ in range(runs + 1)]
            finally:
                browser.quit()
    finally:
        server.should_exit = True
        thread.join(30)
        pipe.close()
    steady = times[1:]
    return {"first_run_s": round(times[0], 3), "runs_s": [round(t, 3) for t in steady],
            "median_s": round(statistics.median(steady), 3), "min_s": round(min(steady), 3),
            "goal_s": 3.0, "image": {"width": m.shapes.default_width, "height": m.shapes.default_height,
                                     "steps": m.defaults.steps, "scheduler": m.defaults.scheduler}}


def main(argv=None) -> int:
    from sdedge.benchmarks.machine import describe_machine, load_average
    from sdedge.runtime.files import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--out", required=True, help="folder for page.json")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    machine = describe_machine()
    figures = measure(args.bundle, args.runs, args.threads)
    result = {"schema": "sdedge-page-bench/1", "what": "page load to first image, headless Chromium, 127.0.0.1",
              "bundle": Path(args.bundle).name, **figures, "machine": machine, "load_average_end": load_average()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "page.json", result)
    print(f"page load to first image: median {figures['median_s']:.2f} s over {args.runs} runs "
          f"(first {figures['first_run_s']:.2f} s); goal {figures['goal_s']:g} s -> {out / 'page.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
