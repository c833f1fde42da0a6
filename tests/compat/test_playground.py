"""The playground at `/`, in headless Chromium driven by Selenium through chromedriver (Debian's
`chromium` and `chromium-driver`, which .ci/run installs): a person's path through the page —
type a prompt, move a reward slider, send, watch both answers stream in with their reports,
move the slider again and see the steered answer rerun, give it a KL budget, switch decoders.

Screenshots go to $TILT_ARTIFACTS (default target/artifacts).
"""

import os
import pathlib
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = os.environ.get("TILT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TILT_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = pathlib.Path(os.environ.get("TILT_ARTIFACTS", "target/artifacts"))


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), (
            f"{path} is missing: install Debian's chromium and chromium-driver (as .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="tilt-chromium-")
    # The background-networking flags keep Chromium from calling out of this closed machine.
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    yield driver
    driver.quit()


def wait_for(driver, what, seconds=60):
    try:
        return WebDriverWait(driver, seconds).until(lambda d: what(d))
    except Exception:
        screenshot(driver, "playground-failed.png")
        raise


def state(driver, column):
    return driver.find_element(By.ID, column).get_attribute("data-state")


def finished(driver, *columns):
    states = [state(driver, c) for c in columns]
    assert "error" not in states, driver.find_element(By.ID, "columns").text
    return all(s == "done" for s in states)


def screenshot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_steering_from_the_page(browser):
    d = browser
    d.get(os.environ["TILT_URL"] + "/")
    wait_for(d, lambda d: d.find_element(By.ID, "model").get_attribute("data-ready"), 30)
    assert Select(d.find_element(By.ID, "decoder")).first_selected_option.text == "genarm"

    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Write a short review of a rainy weekend.")
    # A slider per loaded reward model; eight steps of 0.25 to weight 2.
    slider = d.find_element(By.CSS_SELECTOR, "[data-reward=positive]")
    slider.send_keys(*[Keys.ARROW_RIGHT] * 8)
    assert slider.get_attribute("value") == "2"
    d.find_element(By.ID, "send").click()
    wait_for(d, lambda d: finished(d, "plain", "steered"))

    plain = d.find_element(By.CSS_SELECTOR, "#plain .text").text
    steered = d.find_element(By.CSS_SELECTOR, "#steered .text").text
    report = d.find_element(By.CSS_SELECTOR, "#steered .report").text
    assert plain and steered and plain != steered
    assert "kl_per_token" in report and "positive 2" in report, report
    assert "tokens" in d.find_element(By.CSS_SELECTOR, "#steered .stats").text
    screenshot(d, "playground-genarm.png")

    # Moving the slider reruns the steered answer alone, with the new weight.
    before = d.find_element(By.CSS_SELECTOR, "#plain .text").text
    slider.send_keys(*[Keys.ARROW_RIGHT] * 4)
    wait_for(
        d,
        lambda d: "positive 3" in d.find_element(By.CSS_SELECTOR, "#steered .report").text
        and finished(d, "steered"),
    )
    assert d.find_element(By.CSS_SELECTOR, "#plain .text").text == before

    # A KL budget reruns it under the budget; the report shows the scale the weights took.
    budget = d.find_element(By.CSS_SELECTOR, "[data-param=max_kl_per_token]")
    budget.send_keys("0.3", Keys.ENTER)
    wait_for(
        d,
        lambda d: "kl_scale" in d.find_element(By.CSS_SELECTOR, "#steered .report").text
        and finished(d, "steered"),
    )
    report = d.find_element(By.CSS_SELECTOR, "#steered .report").text
    assert "max_kl_per_token: 0.3" in report, report
    screenshot(d, "playground-kl-budget.png")

    # Another decoder, set up with live reruns off, then sent: best-of-N's candidates as a
    # table, the chosen one marked.
    d.find_element(By.ID, "live").click()
    Select(d.find_element(By.ID, "decoder")).select_by_visible_text("best_of_n")
    d.find_element(By.CSS_SELECTOR, "[data-reward=sentiment]").send_keys(Keys.ARROW_RIGHT)
    d.find_element(By.ID, "send").click()
    rows = wait_for(
        d,
        lambda d: finished(d, "plain", "steered")
        and d.find_elements(By.CSS_SELECTOR, "#steered .report tbody tr"),
    )
    assert len(rows) == 4
    assert len(d.find_elements(By.CSS_SELECTOR, "#steered .report tr.chosen")) == 1
    screenshot(d, "playground-best-of-n.png")

    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
