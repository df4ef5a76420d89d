"""The demo page at `GET /`, in a real headless Chromium (Debian's chromium + chromium-driver, via
Selenium) against a real `python -m predictor` with API keys on."""

import base64
import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import IMAGES, Server, assert_error

KEY = "ui-test-key-3b1f0c"
SHOWN = ["cat_0000.jpg", "ship_0000.jpg", "horse_0001.jpg", "truck_0000.jpg"]


@pytest.fixture(scope="module")
def keyed_server():
    srv = Server("--rate_limit_per_minute", "0", env={"API_KEYS": KEY})
    yield srv
    srv.stop()


def chromium(*arguments: str) -> webdriver.Chrome:
    """Headless Chromium (installed by `make browser`), a phone-to-desktop sized window, with `arguments`
    added; its console is kept (`get_log("browser")`)."""
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900", *arguments):
        options.add_argument(argument)  # no sandbox: the tests may run as root (CI)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def enter_key(driver) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()  # the tab may remember a key from an earlier test
    field.send_keys(KEY)


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def wait_until_settled(driver, count: int, overlays: int) -> None:
    """Until `count` cards have an answer (class or error) and `overlays` heat-maps have loaded."""
    def settled(d) -> bool:
        shown = cards(d)
        loaded = d.execute_script(
            "return [...document.querySelectorAll('#results .overlay:not([hidden])')]"
            ".filter(img => img.complete && img.naturalWidth > 0).length")
        return len(shown) == count and all(c.get_attribute("data-state") != "pending" for c in shown) and loaded == overlays
    WebDriverWait(driver, 120, poll_frequency=0.2).until(settled)


def test_page_shows_class_probabilities_and_heatmap_of_real_images(keyed_server, browser, tmp_path):
    api = keyed_server.client
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    browser.get(f"{keyed_server.url}/")
    enter_key(browser)
    browser.find_element(By.ID, "files").send_keys("\n".join([*(str(IMAGES / n) for n in SHOWN), str(not_an_image)]))
    wait_until_settled(browser, len(SHOWN) + 1, overlays=len(SHOWN))

    by_file = {c.find_element(By.CLASS_NAME, "file").text: c for c in cards(browser)}
    headers = {"Authorization": f"Bearer {KEY}"}
    for name in SHOWN:
        answer = api.post("/classify/image", files={"file": (IMAGES / name).read_bytes()}, headers=headers).json()
        card = by_file[name]
        # The class as text, the confidence and all ten probabilities, as the API gives them.
        assert card.find_element(By.CLASS_NAME, "label").text == answer["predicted_class"]
        assert card.find_element(By.CLASS_NAME, "confidence").text == f"{100 * answer['confidence']:.1f} % confident"
        rows = card.find_elements(By.CSS_SELECTOR, ".probabilities li")
        assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == list(answer["all_probabilities"])
        overlay = card.find_element(By.CLASS_NAME, "overlay")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,") and "Grad-CAM" in overlay.get_attribute("alt")
    # The rejected file shows the API's own error text.
    refusal = api.post("/classify/image", files={"file": not_an_image.read_bytes()}, headers=headers).json()["error"]
    bad = by_file["notes.txt"]
    assert bad.get_attribute("data-state") == "error"
    assert bad.find_element(By.CLASS_NAME, "error").text == refusal["message"]
    # The key stays in this tab: sessionStorage, never localStorage or a cookie.
    assert browser.execute_script("return sessionStorage.getItem('cifar10.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0 and browser.get_cookies() == []
    # The whole page, the rejected file included (UI_SCREENSHOT=path keeps it: the README's docs/demo.png).
    shot = Path(os.environ.get("UI_SCREENSHOT", tmp_path / "demo.png"))
    browser.set_window_size(1200, browser.execute_script("return document.documentElement.scrollHeight") + 140)
    try:
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.set_window_size(1200, 900)


def test_without_the_key_the_page_shows_the_api_refusal(keyed_server, browser):
    browser.get(f"{keyed_server.url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""
    browser.find_element(By.ID, "files").send_keys(str(IMAGES / "dog_0000.jpg"))
    wait_until_settled(browser, 1, overlays=0)
    refusal = keyed_server.client.post("/classify/image", files={"file": b"x"}).json()["error"]["message"]
    assert browser.find_element(By.ID, "status").text == refusal
    assert cards(browser)[0].find_element(By.CLASS_NAME, "error").text == refusal


# Hands the page a real file the way the browser does on a paste or a drop (a DataTransfer holding it).
HAND_OVER = """
const [kind, name, b64] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], name, {type: "image/jpeg"}));
if (kind === "paste") document.body.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
else document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
"""


def test_pasted_and_dropped_images_are_classified(keyed_server, browser):
    browser.get(f"{keyed_server.url}/")
    enter_key(browser)
    handed = {"paste": "frog_0001.jpg", "drop": "deer_0000.jpg"}
    for kind, name in handed.items():
        browser.execute_script(HAND_OVER, kind, name, base64.b64encode((IMAGES / name).read_bytes()).decode())
        wait_until_settled(browser, list(handed).index(kind) + 1, overlays=list(handed).index(kind) + 1)
    shown = {c.find_element(By.CLASS_NAME, "file").text: c.find_element(By.CLASS_NAME, "label").text for c in cards(browser)}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert shown == {name: keyed_server.client.post("/classify/image", files={"file": (IMAGES / name).read_bytes()},
                                                    headers=headers).json()["predicted_class"] for name in handed.values()}


def test_page_is_keyboard_reachable_and_fits_a_phone(keyed_server, browser):
    browser.get(f"{keyed_server.url}/")
    # Tab by Tab from the top: the file chooser (a real, focusable file input), the camera, the key, Clear.
    order = []
    for _ in range(4):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        order.append(browser.switch_to.active_element.get_attribute("id"))
    assert order == ["files", "camera", "api-key", "clear"]
    camera = browser.find_element(By.ID, "camera")
    assert camera.get_attribute("capture") and camera.get_attribute("accept") == "image/*"
    try:
        browser.set_window_size(390, 844)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.set_window_size(1200, 900)


BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def test_page_and_assets_are_served_with_a_strict_policy(keyed_server):
    client = keyed_server.client
    page = client.get("/", headers=BROWSER)  # the page itself needs no key; the API calls it makes do
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Any other caller (KServe's v1 client checking liveness) gets KServe's JSON there.
    assert client.get("/").json() == {"status": "alive"} and client.get("/").headers["vary"] == "Accept"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<meta name="model-name" content="cifar10-resnet18">' in page.text
    for asset, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        response = client.get(asset)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert_error(client.get("/ui/missing.js"), 404, "not_found")


def test_ui_false_turns_the_page_off():
    srv = Server("--ui", "false")
    try:
        assert_error(srv.client.get("/", headers=BROWSER), 404, "not_found")
        assert srv.client.get("/").json() == {"status": "alive"}
        assert_error(srv.client.get("/ui/app.js"), 404)
    finally:
        srv.stop()
