"""docs/images/serve.png: `parti-jax serve` in headless Chromium over a trained pipeline.

    python scripts/serve_screenshot.py /path/to/demo_workdir [docs/images/serve.png]

Loads the models with `Pipeline.from_pretrained` (a `parti-jax demo` folder, a
bundle, ...), serves them on a free port of 127.0.0.1 in this process, asks
for two prompts of 12 images each through the page and saves the window.
Needs Debian's chromium and chromium-driver (as tests/eval/test_browser.py).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROMPTS = (
    "a large green circle to the right of a yellow triangle",
    "a large cyan circle above a small red triangle",
)
NUM_IMAGES = 12


def main(source: str, out: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from parti_jax.pipeline import Pipeline
    from parti_jax.serve import Server, ServerThread

    server = Server(Pipeline.from_pretrained(source))
    print(f"compiled in {server.warm_up():.1f} s")
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("PARTI_JAX_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1150"):  # fmt: skip
        options.add_argument(arg)
    driver_path = os.environ.get("PARTI_JAX_CHROMEDRIVER", "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    grid_ready = (
        "return document.getElementById('result-prompt').textContent === arguments[0] && "
        "Array.from(document.querySelectorAll('#grid img')).filter("
        "i => i.complete && i.naturalWidth > 0).length === arguments[1]"
    )
    try:
        with ServerThread(server) as url:
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(
                lambda d: d.find_element(By.ID, "num_images").get_attribute("value")
            )
            for prompt in PROMPTS:
                for field, value in (("prompt", prompt), ("num_images", str(NUM_IMAGES))):
                    box = driver.find_element(By.ID, field)
                    box.clear()
                    box.send_keys(value)
                driver.find_element(By.ID, "submit").click()
                WebDriverWait(driver, 600).until(
                    lambda d, p=prompt: d.execute_script(grid_ready, p, NUM_IMAGES)
                )
            time.sleep(0.5)
            driver.save_screenshot(out)
    finally:
        driver.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "docs/images/serve.png")
