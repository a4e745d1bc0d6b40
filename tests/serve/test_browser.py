"""The page end to end in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed by .ci/run):
ask a question, wait for the streamed answer, click a citation chip, check the highlighted sentence; save a screenshot."""

from __future__ import annotations

import shutil

import pytest

from serve_helpers import sse_events, uvicorn_thread


def _browser_paths() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless browser test needs Chromium and its driver: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)")
    return browser, driver


@pytest.fixture()
def live_server(tiny_lm, small_corpus_dir, tmp_path):
    """The app over the tiny LM, served by uvicorn on a free 127.0.0.1 port in a thread."""
    from tessera.serve import ServeConfig, create_app

    app = create_app(ServeConfig(corpora=[str(small_corpus_dir)], encoder=None, upload_dir=str(tmp_path / "uploads"),
                                 max_new_tokens=24), lm=tiny_lm)
    with uvicorn_thread(app) as (url, *_):
        yield url


def test_page_streams_answer_and_highlights_cited_sentence(live_server, tmp_path):
    browser, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        wait = WebDriverWait(drv, 60)
        drv.get(live_server + "/")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#corpus option"))
        Select(drv.find_element(By.ID, "decode")).select_by_value("nest")
        k = drv.find_element(By.ID, "k")
        k.clear()
        k.send_keys("2")
        assert drv.find_element(By.ID, "cite").is_selected()
        drv.find_element(By.ID, "question").send_keys("At what temperature is green tea steeped?")
        drv.find_element(By.ID, "ask").click()
        # the streamed tokens appear before the final rendering replaces them
        wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
        assert drv.find_element(By.ID, "status").text == "done"
        assert "tea.md" in drv.find_element(By.ID, "sources").text
        chips = drv.find_elements(By.CSS_SELECTOR, "#answer .statement .chip[data-source]")
        assert chips, drv.find_element(By.ID, "answer").get_attribute("innerHTML")
        chip = chips[0]
        expected = __import__("json").loads(chip.get_attribute("data-sentences"))
        chip.click()
        wait.until(EC.visibility_of_element_located((By.ID, "viewer")))
        marks = drv.find_elements(By.CSS_SELECTOR, "#viewer-text mark.cited")
        assert [" ".join(m.text.split()) for m in marks] == expected
        assert f"[{chip.get_attribute('data-source')}]" in drv.find_element(By.ID, "viewer-title").text
        timings = drv.find_element(By.ID, "timings").text
        assert "retrieval" in timings and "generation" in timings and "citation scoring" in timings
        assert "copied" in drv.find_element(By.ID, "legend").text
        shot = tmp_path / "serve-page.png"
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        drv.quit()


def test_page_assets_and_stream_over_a_real_socket(live_server):
    """The same server over real HTTP (uvicorn): the page, its assets and the event stream."""
    import httpx

    with httpx.Client(base_url=live_server, timeout=30) as c:
        assert 'src="/static/app.js"' in c.get("/").text
        assert c.get("/static/app.css").headers["content-type"].startswith("text/css")
        with c.stream("POST", "/v1/ask/stream", json={"question": "green tea", "max_new_tokens": 3}) as r:
            assert r.status_code == 200
            body = "".join(r.iter_text())
        assert sse_events(body)[-1][0] == "result"
