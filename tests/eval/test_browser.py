"""The report pages in a real browser: headless Chromium (Debian's) driven by selenium 4.

Checks what a person sees: the gallery's counts and filters, votes recorded and
exported by the side-by-side page (un-blinded correctly, kept across a reload),
and untrusted prompts shown as text without running anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest

from parti_jax.eval import gallery
from parti_jax.eval import side_by_side as S
from tests.eval.test_gallery import NASTY, build_eval_dir, parti_rows

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PARTI_JAX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PARTI_JAX_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = (
    "needs Debian's chromium and chromium-driver ({} / {}); scripts/test.sh installs them "
    "when run as root (apt-get install -y chromium chromium-driver)"
)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    chromedriver = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(INSTALL_HINT.format(CHROMIUM, CHROMEDRIVER))
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={root / 'profile'}",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(root / "downloads"),
            "download.prompt_for_download": False,
        },
    )
    drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()


def _no_alert(drv) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        text = drv.switch_to.alert.text
    except NoAlertPresentException:
        return
    pytest.fail(f"an alert opened (injected script ran): {text!r}")


def _visible_cards(drv) -> list[dict]:
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('article.card'))"
        ".filter(c => c.offsetParent !== null)"
        ".map(c => ({id: +c.dataset.promptId, category: c.dataset.category,"
        " challenge: c.dataset.challenge}));"
    )


def test_gallery_counts_and_filters(driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rows = parti_rows()
    build_eval_dir(tmp_path, rows)
    page = gallery.write_gallery(tmp_path, title="PartiPrompts gallery")
    driver.get(page.as_uri())
    _no_alert(driver)
    assert driver.title == "PartiPrompts gallery"
    assert driver.find_element(By.ID, "visible-count").text == "Showing 1632 of 1632 prompts"
    counts = driver.execute_script(
        "const out = {};"
        "for (const tr of document.querySelectorAll('tr[data-group]')) {"
        "  out[tr.dataset.group + '|' + tr.dataset.name] = +tr.querySelector('.count').textContent; }"
        "return out;"
    )
    want = {f"category|{k}": v for k, v in Counter(r["Category"] for r in rows).items()}
    want.update({f"challenge|{k}": v for k, v in Counter(r["Challenge"] for r in rows).items()})
    assert counts == want and len(want) == 12 + 11

    # Click the "Vehicles" category: only its 104 prompts stay visible.
    vehicles = driver.find_element(
        By.CSS_SELECTOR, 'button.filter-button[data-group="category"][data-name="Vehicles"]'
    )
    vehicles.click()
    shown = _visible_cards(driver)
    assert len(shown) == 104 and {c["category"] for c in shown} == {"Vehicles"}
    assert driver.find_element(By.ID, "visible-count").text == "Showing 104 of 1632 prompts"
    # And the "Quantity" challenge on top: the intersection.
    Select(driver.find_element(By.ID, "filter-challenge")).select_by_value("Quantity")
    both = {
        i
        for i, r in enumerate(rows)
        if r["Category"] == "Vehicles" and r["Challenge"] == "Quantity"
    }
    assert {c["id"] for c in _visible_cards(driver)} == both and both
    # Group by challenge: one visible section, with the visible count in its heading.
    Select(driver.find_element(By.ID, "group-by")).select_by_value("challenge")
    sections = driver.execute_script(
        "return Array.from(document.querySelectorAll('#groups-challenge section.group'))"
        ".filter(s => s.offsetParent !== null)"
        ".map(s => [s.dataset.name, s.querySelector('.group-visible').textContent]);"
    )
    assert sections == [["Quantity", str(len(both))]]
    # Clicking the selected category again clears it; "Show all" clears everything.
    vehicles.click()
    assert {c["challenge"] for c in _visible_cards(driver)} == {"Quantity"}
    assert len(_visible_cards(driver)) == sum(r["Challenge"] == "Quantity" for r in rows)
    driver.find_element(By.ID, "reset-filters").click()
    assert len(_visible_cards(driver)) == 1632
    _no_alert(driver)


def test_untrusted_prompts_render_as_text(driver, tmp_path):
    from selenium.webdriver.common.by import By

    rows = [{"Prompt": t, "Category": "Animals", "Challenge": "Basic", "Note": t} for t in NASTY]
    build_eval_dir(tmp_path, rows)
    page = gallery.write_gallery(tmp_path, title="escaping")
    driver.get(page.as_uri())
    _no_alert(driver)
    assert driver.title == "escaping"
    texts = driver.execute_script(
        "return Array.from(document.querySelectorAll('article.card')).map(c =>"
        " [c.querySelector('.prompt').textContent, c.querySelector('.note').textContent]);"
    )
    assert texts == [[t, t] for t in NASTY]
    assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
    assert (
        driver.execute_script(
            "return document.querySelectorAll('img[onerror], img[src=\"x\"]').length;"
        )
        == 0
    )
    assert driver.find_element(By.ID, "visible-count").text == "Showing 3 of 3 prompts"


def test_side_by_side_votes_export_and_persist(driver, tmp_path):
    from selenium.webdriver.common.by import By

    rows = parti_rows()[:20]
    rows[3] = dict(rows[3], Prompt=NASTY[2] + NASTY[0])
    build_eval_dir(tmp_path / "a", rows, colours=((200, 0, 0),))
    build_eval_dir(tmp_path / "b", rows, colours=((0, 0, 200),))
    page = S.write_side_by_side(
        tmp_path / "a", tmp_path / "b", tmp_path / "sbs.html", name_a="A</script>", name_b="B"
    )
    data = S.read_page_data(page)
    a_left = next(p["prompt_id"] for p in data["prompts"] if p["left"] == "a")
    b_left = next(p["prompt_id"] for p in data["prompts"] if p["left"] == "b")
    choices = {a_left: "right", b_left: "left", 3: "tie"}

    driver.get(page.as_uri())
    _no_alert(driver)
    assert driver.title == "Side-by-side"
    prompt3 = driver.find_element(By.CSS_SELECTOR, "#q-3 .prompt").text
    assert prompt3 == NASTY[2] + NASTY[0]
    # The left column of each card really shows the system the page data says.
    left_src = driver.find_element(By.CSS_SELECTOR, f'#q-{a_left} .side[data-side="left"] img')
    assert "/a/images/" in left_src.get_attribute("src")
    for pid, choice in choices.items():
        driver.find_element(
            By.CSS_SELECTOR, f'button.vote-button[data-prompt-id="{pid}"][data-choice="{choice}"]'
        ).click()
    driver.find_element(By.ID, "rater").send_keys("tester")
    assert driver.find_element(By.ID, "progress").text == "3 of 20 rated"
    driver.find_element(By.ID, "export").click()
    exported = json.loads(driver.find_element(By.ID, "votes-json").get_attribute("value"))
    winners = {v["prompt_id"]: v["winner"] for v in exported["votes"]}
    assert winners == {a_left: "b", b_left: "b", 3: "tie"}
    want = S.export_votes(data, choices, rater="tester")
    exported.pop("exported_at")
    assert exported == want
    assert exported["a"] == "A</script>" and exported["page_id"] == data["page_id"]

    # Votes survive a reload (localStorage keyed by the page id).
    driver.refresh()
    _no_alert(driver)
    assert driver.find_element(By.ID, "progress").text == "3 of 20 rated"
    selected = driver.execute_script(
        "return Array.from(document.querySelectorAll('button.vote-button.selected'))"
        ".map(b => [+b.dataset.promptId, b.dataset.choice]);"
    )
    assert dict(selected) == choices
    driver.find_element(By.ID, "export").click()
    again = json.loads(driver.find_element(By.ID, "votes-json").get_attribute("value"))
    assert again["votes"] == want["votes"] and again["rater"] == "tester"
    # Clicking a selected choice again withdraws that vote.
    driver.find_element(
        By.CSS_SELECTOR, 'button.vote-button[data-prompt-id="3"][data-choice="tie"]'
    ).click()
    assert driver.find_element(By.ID, "progress").text == "2 of 20 rated"
