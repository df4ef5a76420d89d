"""/docs in a real headless Chromium with no network but the server's own address (an air-gapped
cluster), and the server's log free of Python warnings, against a real `python -m predictor`; and the
start-up check of the patch that keeps it so (predictor.serving.kserve_compat.use_orjson_response)."""

import base64
import re

import pytest
from fastapi.responses import JSONResponse
from kserve import model_server
from kserve.protocol.rest import v1_endpoints
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from predictor.serving import kserve_compat

from .conftest import IMAGES, MODEL_NAME, Server, free_port
from .test_ui import chromium

CDN_FILE = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"  # what FastAPI's page loads


@pytest.fixture(scope="module")
def docs_server():
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline_browser():
    """Chromium that reaches 127.0.0.1 only: every other name resolves to nothing, and every other
    address goes through a proxy that refuses (a port nothing listens on); loopback bypasses it."""
    driver = chromium("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                      f"--proxy-server=http://127.0.0.1:{free_port()}")
    yield driver
    driver.quit()


@pytest.mark.slow  # real server processes (and Chromium)
def test_docs_render_the_api_with_no_network_and_a_self_only_policy(docs_server, offline_browser):
    browser = offline_browser
    # The network is off in this browser: the CDN's file is out of reach from a page with no policy.
    browser.get(f"{docs_server.url}/openapi.json")
    reached = browser.execute_async_script(
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => arguments[1](true), () => arguments[1](false))", CDN_FILE)
    assert reached is False
    browser.get_log("browser")  # that refusal's console line is not the page's

    browser.get(f"{docs_server.url}/docs")
    WebDriverWait(browser, 60, poll_frequency=0.2).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock .opblock-summary-path"))
    operations = {(op.find_element(By.CLASS_NAME, "opblock-summary-method").text,
                   op.find_element(By.CLASS_NAME, "opblock-summary-path").get_attribute("data-path"))
                  for op in browser.find_elements(By.CSS_SELECTOR, ".opblock")}
    paths = {path for _, path in operations}
    assert {("POST", "/classify/image"), ("POST", "/classify/batch"), ("GET", "/health")} <= operations, operations
    assert {"/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer"} <= paths, paths
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock-tag-section")) >= 3  # the tags' sections

    # "Try it out" on GET /health: the call goes to this server and its answer is shown.
    health = next(op for op in browser.find_elements(By.CSS_SELECTOR, ".opblock")
                  if op.find_element(By.CLASS_NAME, "opblock-summary-path").get_attribute("data-path") == "/health")
    health.find_element(By.CLASS_NAME, "opblock-summary-control").click()
    WebDriverWait(browser, 20).until(lambda d: health.find_elements(By.CLASS_NAME, "try-out__btn")).pop().click()
    WebDriverWait(browser, 20).until(lambda d: health.find_elements(By.CSS_SELECTOR, "button.execute")).pop().click()
    status = WebDriverWait(browser, 30).until(
        lambda d: health.find_elements(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"))
    assert status[0].text.strip() == "200"

    # Everything the page loaded came from the server; nothing was refused or failed (the console is clean).
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(docs_server.url + "/") for url in loaded), loaded
    assert {f"{docs_server.url}/docs/swagger-ui-bundle.js", f"{docs_server.url}/openapi.json"} <= set(loaded)
    problems = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert problems == [], problems


@pytest.mark.slow  # real server processes (and Chromium)
def test_docs_page_and_files_are_served_with_a_self_only_policy(docs_server):
    client = docs_server.client
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "cdn." not in page.text and "<script>" not in page.text  # its scripts are files, none inline
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["img-src"] == "'self' data:"  # data: = the stylesheet's icons
    assert all(source in ("'self'", "'none'", "data:") for sources in policy.values() for source in sources.split())
    for name, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"),
                       ("start.js", "text/javascript"), ("favicon.png", "image/png")):
        response = client.get(f"/docs/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), name
        assert response.headers["x-content-type-options"] == "nosniff"
        again = client.get(f"/docs/{name}", headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    missing = client.get("/docs/missing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", missing.text
    # The page sits where FastAPI's did, once: not in the API's own description.
    assert not any(path.startswith("/docs") for path in client.get("/openapi.json").json()["paths"])


@pytest.mark.slow  # real server processes (and Chromium)
def test_docs_off_serves_neither_page_nor_files():
    srv = Server("--enable_docs_url", "false")
    try:
        assert srv.client.get("/docs").status_code == 404
        assert srv.client.get("/docs/swagger-ui-bundle.js").status_code == 404
    finally:
        srv.stop()


# Python's own warning line: "<file>:<line>: <Category>: <message>".
PYTHON_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ", re.MULTILINE)


@pytest.mark.slow  # real server processes (and Chromium)
def test_the_log_has_no_python_warning_after_every_kind_of_answer():
    """FastAPI 0.165 deprecates ORJSONResponse, KServe's JSON answer class: each server process warned
    at its first JSON answers (KServe's, and ours, which take the app's default class)."""
    # The warnings Python shows by default, whatever PYTHONWARNINGS the tests run with.
    srv = Server(env={"PYTHONWARNINGS": ""})
    try:
        client = srv.client
        image = (IMAGES / "cat_0000.jpg").read_bytes()
        classified = client.post("/classify/image", files={"file": image})
        assert classified.status_code == 200 and classified.json()["predicted_class"] == "cat"
        v1 = client.post(f"/v1/models/{MODEL_NAME}:predict",
                         json={"instances": [{"image": {"b64": base64.b64encode(image).decode()}}]})
        assert v1.status_code == 200 and v1.json()["predictions"][0]["predicted_class"] == "cat", v1.text
        assert client.get(f"/v1/models/{MODEL_NAME}").json() == {"name": MODEL_NAME, "ready": True}
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get(f"/v2/models/{MODEL_NAME}/ready").json()["ready"] is True
        assert client.get("/health").status_code == 200 and client.get("/docs").status_code == 200
        log = srv.log()
    finally:
        srv.stop()
    assert "Uvicorn running on" in log and not PYTHON_WARNING.search(log), log
    assert "ORJSONResponse" not in log and "DeprecationWarning" not in log


@pytest.mark.parametrize("break_it, reported", [
    (lambda mp: mp.setattr(model_server.app.router, "default_response_class", JSONResponse), "by default"),
    (lambda mp: mp.delattr(v1_endpoints, "ORJSONResponse"), "v1_endpoints"),
], ids=["app-default", "v1-handlers"])
def test_a_kserve_that_answers_json_otherwise_is_named(monkeypatch, break_it, reported):
    break_it(monkeypatch)
    found = kserve_compat.problems()
    assert len(found) == 1 and reported in found[0] and "use_orjson_response" in found[0], found
