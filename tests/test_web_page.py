"""The gateway's page at `/`, driven in real headless Chromium (Debian's chromium + chromium-driver) with selenium:
register a voice, speak a text, whole and streamed, and check that the audio element got a playable wav
that is what Triton returns for the same request.

F5_SCREENSHOT=docs/gateway-page.png saves a screenshot of the page after a synthesis.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

pytestmark = pytest.mark.server

REF_TEXT = "Some call me nature, others call me mother nature."
TEXT = "The page speaks. It says two sentences."
QUANTUM = 1 / 32767  # 16-bit wav
WAIT_S = 240  # a synthesis on a busy 2-core CI machine
EXAMPLE_REFERENCE = Path(__file__).resolve().parents[1] / "examples" / "basic_ref_en.flac"  # shipped with the repo


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("F5_REQUIRE_TEST_TOOLS"):  # CI installs them: missing there is a failure
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=900,1250",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(streaming_server, run_gateway, tmp_path_factory):
    """The gateway with an empty voices folder."""
    from f5_triton.gateway import GatewayConfig

    config = GatewayConfig(triton_url=streaming_server.urls.grpc, voices_dir=tmp_path_factory.mktemp("voices"),
                           timeout=120)
    with run_gateway(config) as url:
        yield url


def audio_bytes(browser) -> bytes:
    """The bytes behind the audio element's src (a blob: URL), read inside the page."""
    encoded = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById("result").src).then((r) => r.arrayBuffer()).then((buffer) => {
          let text = ""; new Uint8Array(buffer).forEach((b) => { text += String.fromCharCode(b); });
          done(btoa(text));
        });""")
    return base64.b64decode(encoded)


def speak(browser, wait, previous_latency: str | None) -> dict:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "speak").click()
    wait.until(lambda b: b.find_element(By.ID, "result").get_attribute("data-latency-ms") not in (None, previous_latency)
               or "error" in b.find_element(By.ID, "status").get_attribute("class"))
    status = browser.find_element(By.ID, "status")
    assert "error" not in status.get_attribute("class"), status.text
    # the browser decoded it: metadata loaded, a duration, no media error
    wait.until(lambda b: b.execute_script("return document.getElementById('result').readyState") >= 1)
    return browser.execute_script("""const a = document.getElementById("result");
        return {duration: a.duration, error: a.error && a.error.code, latency: a.dataset.latencyMs,
                status: document.getElementById("status").textContent};""")


def register_voice(browser, wait, audio_path) -> None:
    """Fill the page's voice form ("nature", `audio_path`, REF_TEXT), send it and wait for the page's answer."""
    from selenium.webdriver.common.by import By

    find = browser.find_element
    find(By.ID, "voice-name").send_keys("nature")
    find(By.ID, "voice-audio").send_keys(str(audio_path))
    find(By.ID, "voice-transcript").send_keys(REF_TEXT)
    find(By.ID, "upload").click()
    wait.until(lambda b: "registered" in find(By.ID, "status").text or "error" in find(By.ID, "status").get_attribute("class"))


def test_register_a_voice_and_hear_it(browser, page, streaming_server, ref_en, ref_wave):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from f5_triton.client import stream_synthesize, synthesize

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(page + "/")
    find = browser.find_element
    wait.until(lambda b: "none yet" in find(By.ID, "voice").text)  # an empty folder invites an upload
    # the tiny random checkpoint is announced (from the health answer, which may land after the voice list)
    wait.until(lambda b: find(By.ID, "random-warning").is_displayed())

    register_voice(browser, wait, ref_en)
    assert find(By.ID, "status").text.startswith('Voice "nature" registered'), find(By.ID, "status").text
    assert find(By.ID, "voice").get_attribute("value") == "nature"

    text = find(By.ID, "text")
    text.clear()
    text.send_keys(TEXT)
    find(By.ID, "seed").send_keys("3")
    whole = speak(browser, wait, None)
    assert whole["error"] is None and whole["duration"] > 0.5 and "RTF" in whole["status"], whole
    wave, rate = sf.read(io.BytesIO(audio_bytes(browser)), dtype="float32")
    expected = synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, TEXT, seed=3)
    assert rate == 24000 and wave.shape == expected.shape
    assert np.abs(wave - np.clip(expected, -1, 1)).max() <= QUANTUM
    assert find(By.ID, "download").get_attribute("href") == find(By.ID, "result").get_attribute("src")
    if os.environ.get("F5_SCREENSHOT"):
        browser.save_screenshot(os.environ["F5_SCREENSHOT"])

    find(By.ID, "stream").click()
    streamed = speak(browser, wait, whole["latency"])
    assert streamed["error"] is None and "first audio after" in streamed["status"], streamed
    wave, rate = sf.read(io.BytesIO(audio_bytes(browser)), dtype="float32")
    expected = np.concatenate(list(stream_synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, TEXT, seed=3,
                                                     timeout=120)))
    assert rate == 24000 and wave.shape == expected.shape
    assert np.abs(wave - np.clip(expected, -1, 1)).max() <= QUANTUM


def test_page_shows_the_servers_error(browser, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page + "/")
    wait = WebDriverWait(browser, WAIT_S)
    voice = lambda: browser.find_element(By.ID, "voice")  # noqa: E731
    wait.until(lambda b: voice().get_attribute("value") or "none yet" in voice().text)
    if not voice().get_attribute("value"):  # the test above did not run (it reads ../shared/data): a voice of our own
        register_voice(browser, wait, EXAMPLE_REFERENCE)
        wait.until(lambda b: voice().get_attribute("value"))
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(" ")
    browser.find_element(By.ID, "speak").click()
    wait.until(lambda b: "error" in b.find_element(By.ID, "status").get_attribute("class"))
    assert browser.find_element(By.ID, "status").text.startswith("input: is empty")
