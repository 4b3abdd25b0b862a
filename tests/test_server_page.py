"""The web page at `/` in a real headless Chromium (Selenium) against one real `python -m engine serve` process:
upload, preset, generate with a progress bar and a downloadable result; an oversized upload shows the 413's
message and leaves the page usable."""
import base64
import os
import shutil

import pytest
import torch

from ipadapter_instruct.engine.server.schemas import TASK_PRESETS
from server_utils import ServerProcess, tiny_args

MAX_UPLOAD_MB = 0.05   # 52 KB: the 64x64 condition image fits, a 256x256 noise PNG (~190 KB) does not
WAIT_S = 60
CHROMIUM = "/usr/bin/chromium"
MISSING = "the web page test needs Chromium and chromedriver (Debian: chromium, chromium-driver); " \
          "`make test` installs them (the Makefile's `browser` target)"


def browser_or_skip():
    chromedriver = shutil.which("chromedriver")
    chromium = next((p for p in (CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser")) if p and
                     os.path.exists(p)), None)
    if chromedriver is None or chromium is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING, pytrace=False)
        pytest.skip(MISSING)
    return chromium, chromedriver


@pytest.fixture(scope="module")
def server(request, browser):
    # after the browser check, so that a missing browser skips before the tiny weights are built
    tiny = request.getfixturevalue("tiny")
    with ServerProcess([*tiny_args(tiny), "--max-upload-mb", str(MAX_UPLOAD_MB)]) as srv:
        yield srv
        srv.terminate()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, server):
    browser.get(server.url + "/")
    return browser


def write_png(path, size, noise):
    from PIL import Image
    if noise:
        g = torch.Generator().manual_seed(0)
        image = Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
    else:
        from ipadapter_instruct.engine.demo import draw_condition_image
        image = draw_condition_image(size)
    image.save(path, format="PNG")
    return str(path)


def upload(driver, path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    with open(path, "rb") as fh:
        data_url = "data:image/png;base64," + base64.b64encode(fh.read()).decode()
    driver.find_element(By.ID, "image").send_keys(path)
    # the file is read client-side into a data URL, which the preview then shows (and the request sends)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "preview").is_displayed()
                                        and d.find_element(By.ID, "preview").get_attribute("src") == data_url)


def generate(driver, steps=2, preset="style"):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    Select(driver.find_element(By.ID, "preset")).select_by_value(TASK_PRESETS[preset])
    assert driver.find_element(By.ID, "instruct").get_attribute("value") == TASK_PRESETS[preset]
    driver.find_element(By.ID, "prompt").send_keys("a red house by a lake")
    steps_box = driver.find_element(By.ID, "steps")
    steps_box.clear()
    steps_box.send_keys(str(steps))
    driver.find_element(By.ID, "generate").click()
    # done when the button is enabled again: a result or an error has been shown
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "generate").is_enabled()
        and (d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text))


def test_page_offers_the_trained_tasks(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    values = [o.get_attribute("value") for o in Select(page.find_element(By.ID, "preset")).options]
    assert [v for v in values if v] == list(TASK_PRESETS.values())
    for element in ("image", "prompt", "instruct", "scale", "steps", "seed", "apikey", "generate", "progress",
                    "status", "error"):
        assert page.find_element(By.ID, element)


def test_generate_shows_progress_and_a_downloadable_result(page, tmp_path):
    from selenium.webdriver.common.by import By
    upload(page, write_png(tmp_path / "cond.png", 64, noise=False))
    generate(page, steps=2, preset="composition")
    error = page.find_element(By.ID, "error").text
    assert not error, error
    result = page.find_element(By.ID, "result")
    assert result.is_displayed() and result.get_attribute("src")
    assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", result)
    link = page.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("href") == result.get_attribute("src")
    assert link.get_attribute("download").endswith(".png")
    bar = page.find_element(By.ID, "progress")
    total = float(bar.get_attribute("max"))
    assert total >= 2 and float(bar.get_attribute("value")) == total   # fed by the SSE progress events
    if os.environ.get("PAGE_SCREENSHOT"):
        page.save_screenshot(os.environ["PAGE_SCREENSHOT"])


def test_oversized_upload_shows_the_limit_and_page_stays_usable(page, tmp_path):
    from selenium.webdriver.common.by import By
    big = write_png(tmp_path / "big.png", 256, noise=True)
    assert os.path.getsize(big) > MAX_UPLOAD_MB * 2**20
    upload(page, big)
    generate(page)
    error = page.find_element(By.ID, "error").text
    assert "413" in error and "limit" in error, error
    assert not page.find_element(By.ID, "result").is_displayed()
    # still usable: a small image now generates
    upload(page, write_png(tmp_path / "small.png", 64, noise=False))
    generate(page, preset="object")
    assert not page.find_element(By.ID, "error").text
    assert page.find_element(By.ID, "result").is_displayed()


def pixels(driver):
    """The shown result's pixels as a PNG data URL (the same image gives the same string)."""
    from selenium.webdriver.common.by import By
    return driver.execute_script("const i = arguments[0], c = document.createElement('canvas'); "
                                 "c.width = i.naturalWidth; c.height = i.naturalHeight; "
                                 "c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL();",
                                 driver.find_element(By.ID, "result"))


def test_a_blank_seed_is_random_and_the_seed_used_is_shown_and_reusable(page, tmp_path):
    from selenium.webdriver.common.by import By
    assert page.find_element(By.ID, "seed").get_attribute("value") == ""   # blank by default: random
    assert page.find_element(By.ID, "steps").get_attribute("value") == "30"  # the server's default
    assert not page.find_element(By.ID, "seedinfo").is_displayed()
    upload(page, write_png(tmp_path / "cond.png", 64, noise=False))
    generate(page)
    shown = page.find_element(By.ID, "usedseed").text
    assert page.find_element(By.ID, "seedinfo").is_displayed() and shown.isdigit(), shown
    assert f"seed{shown}-" in page.find_element(By.ID, "download").get_attribute("download")
    first = pixels(page)
    page.find_element(By.ID, "reuseseed").click()
    assert page.find_element(By.ID, "seed").get_attribute("value") == shown
    page.find_element(By.ID, "prompt").clear()
    generate(page)   # the same request with the seed sent back: the same image
    assert page.find_element(By.ID, "usedseed").text == shown and pixels(page) == first
    page.find_element(By.ID, "randomseed").click()
    assert page.find_element(By.ID, "seed").get_attribute("value") == ""
    page.find_element(By.ID, "prompt").clear()
    generate(page)
    assert page.find_element(By.ID, "usedseed").text not in ("", shown)


def test_an_error_clears_the_previous_result(page, tmp_path):
    from selenium.webdriver.common.by import By
    upload(page, write_png(tmp_path / "cond.png", 64, noise=False))
    generate(page)
    assert page.find_element(By.ID, "result").is_displayed() and page.find_element(By.ID, "seedinfo").is_displayed()
    page.find_element(By.ID, "seed").send_keys("12x")   # refused by the page itself
    page.find_element(By.ID, "generate").click()
    assert "seed" in page.find_element(By.ID, "error").text
    for element in ("result", "seedinfo", "download"):
        assert not page.find_element(By.ID, element).is_displayed(), element
    assert page.find_element(By.ID, "empty").is_displayed()
    page.find_element(By.ID, "seed").clear()
    generate(page)   # a result again, then a failure from the server's side
    assert page.find_element(By.ID, "result").is_displayed()
    page.execute_script('window.fetch = () => Promise.reject(new TypeError("Failed to fetch"));')
    generate(page)
    assert "Could not reach the server" in page.find_element(By.ID, "error").text
    for element in ("result", "seedinfo", "download"):
        assert not page.find_element(By.ID, element).is_displayed(), element


@pytest.mark.parametrize("fetch, shown", [
    ('() => Promise.resolve(new Response("event: queued\\ndata: {\\"queue_depth\\": 0}\\n\\nevent: error\\ndata: '
     '{\\"error\\": {\\"code\\": \\"internal\\", \\"message\\": \\"generation failed: boom\\"}, \\"status\\": 500}'
     '\\n\\n", {headers: {"content-type": "text/event-stream"}}))', "Error 500: generation failed: boom"),
    ('() => Promise.reject(new TypeError("Failed to fetch"))', "Could not reach the server"),
], ids=["sse-error", "network-failure"])
def test_stream_error_and_network_failure_are_shown(page, tmp_path, fetch, shown):
    """The SSE `error` event and a failed fetch, from a stubbed `fetch` (the server cannot be made to fail)."""
    from selenium.webdriver.common.by import By
    upload(page, write_png(tmp_path / "cond.png", 64, noise=False))
    page.execute_script(f"window.fetch = {fetch};")
    generate(page)
    assert shown in page.find_element(By.ID, "error").text
    assert not page.find_element(By.ID, "result").is_displayed()


# ----- an InstructPix2Pix server: the page edits a photo (POST /v1/edit) -----------------------------------------

@pytest.fixture(scope="module")
def edit_server(browser, tmp_path_factory):
    from ipadapter_instruct.engine.tiny import make_tiny
    edit = make_tiny(str(tmp_path_factory.mktemp("page-edit") / "weights"), edit=True)
    with ServerProcess(tiny_args(edit)) as srv:  # with the IPAdapter-Instruct adapter: a reference image too
        yield srv
        srv.terminate()


def test_the_page_edits_a_photo_on_an_instructpix2pix_server(browser, edit_server, tmp_path):
    """The form follows the model: photo, edit, reference image, instruction and both guidance scales; a missing
    reference is said before sending; the edit streams progress and shows a downloadable result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page = browser
    page.get(edit_server.url + "/")
    assert page.find_element(By.ID, "imagelabel").text == "Photo to edit"
    assert page.find_element(By.ID, "generate").text == "Edit"
    for element in ("reference", "guidance", "imageguidance", "preset", "instruct", "scale"):
        assert page.find_element(By.ID, element).is_displayed(), element
    # the form's numbers are the server's defaults for an edit (EditPipeline's: 100 steps), not the text-to-image ones
    assert [page.find_element(By.ID, i).get_attribute("value") for i in ("steps", "guidance", "imageguidance")] == [
        "100", "7.5", "1.5"]
    upload(page, write_png(tmp_path / "photo.png", 64, noise=True))
    page.find_element(By.ID, "prompt").send_keys("make it look like winter")
    steps_box = page.find_element(By.ID, "steps")
    steps_box.clear()
    steps_box.send_keys("2")
    page.find_element(By.ID, "generate").click()
    assert "Choose a reference image first" in page.find_element(By.ID, "error").text  # said before any request
    page.find_element(By.ID, "reference").send_keys(write_png(tmp_path / "ref.png", 64, noise=False))
    WebDriverWait(page, WAIT_S).until(lambda d: d.find_element(By.ID, "refpreview").is_displayed())
    Select(page.find_element(By.ID, "preset")).select_by_value(TASK_PRESETS["style"])
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT_S).until(
        lambda d: d.find_element(By.ID, "generate").is_enabled()
        and (d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text))
    error = page.find_element(By.ID, "error").text
    assert not error, error
    result = page.find_element(By.ID, "result")
    assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", result)
    assert page.find_element(By.ID, "download").get_attribute("download").startswith("edit-seed")
    bar = page.find_element(By.ID, "progress")
    assert float(bar.get_attribute("max")) >= 2 and float(bar.get_attribute("value")) == float(bar.get_attribute("max"))


def test_the_text_to_image_page_hides_the_edit_fields(page):
    from selenium.webdriver.common.by import By
    assert page.find_element(By.ID, "imagelabel").text == "Condition image"
    assert not page.find_element(By.ID, "guidance").is_displayed()
    assert not page.find_element(By.ID, "reference").is_displayed()


def test_a_server_without_an_adapter_offers_a_prompt_only_page(browser, tiny):
    """Text to image without an adapter: no condition image or instruction; the prompt is required (said before
    any request, as the server would answer 422), then the image and its seed are shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with ServerProcess(["--model", tiny["model"]]) as srv:
        page = browser
        page.get(srv.url + "/")
        for element in ("image", "preset", "instruct", "scale", "reference", "guidance"):
            assert not page.find_element(By.ID, element).is_displayed(), element
        page.find_element(By.ID, "generate").click()
        assert page.find_element(By.ID, "error").text == "Write a prompt first."
        page.find_element(By.ID, "prompt").send_keys("a red house by a lake")
        steps_box = page.find_element(By.ID, "steps")
        steps_box.clear()
        steps_box.send_keys("2")
        page.find_element(By.ID, "generate").click()
        WebDriverWait(page, WAIT_S).until(
            lambda d: d.find_element(By.ID, "generate").is_enabled()
            and (d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text))
        assert not page.find_element(By.ID, "error").text, page.find_element(By.ID, "error").text
        assert page.find_element(By.ID, "usedseed").text.isdigit()
        srv.terminate()


# ----- starting from a photo: img2img, and a mask painted in the browser (inpainting) -----------------------------

def record_requests(driver):
    """Each request body the page sends is kept in window.sent (the real fetch still runs)."""
    driver.execute_script("const real = window.fetch; window.sent = []; window.fetch = (url, options) => "
                          "{ window.sent.push(options.body); return real(url, options); };")


def choose_photo(driver, path, size):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element(By.ID, "initimage").send_keys(path)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "mask").is_displayed() and d.execute_script(
        "return [arguments[0].width, arguments[0].height]", d.find_element(By.ID, "mask")) == list(size))


def paint_stroke(driver):
    """A drag across the middle of the mask canvas, as a user's mouse makes it (pointer events)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    canvas = driver.find_element(By.ID, "mask")
    width = canvas.size["width"]
    ActionChains(driver).move_to_element_with_offset(canvas, -width // 4, 0).click_and_hold() \
        .move_by_offset(width // 4, 0).move_by_offset(width // 4, 0).release().perform()


def sent_mask(driver):
    """The last request's body, and its mask_image as a greyscale array (None without one)."""
    import io
    import json

    import numpy as np
    from PIL import Image
    body = json.loads(driver.execute_script("return window.sent[window.sent.length - 1]"))
    mask = body.get("mask_image")
    if mask is None:
        return body, None
    return body, np.asarray(Image.open(io.BytesIO(base64.b64decode(mask.split(",", 1)[1]))).convert("L"))


def result_size(driver):
    from selenium.webdriver.common.by import By
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                       driver.find_element(By.ID, "result")))


def write_photo(path, width, height):
    from PIL import Image
    g = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return str(path)


def test_the_page_paints_a_mask_on_a_photo_and_inpaints(page, tmp_path):
    """A photo, a brush stroke on the canvas over it: the request carries the photo, the strength and a mask of the
    photo's size, white where painted and black elsewhere; the server answers an image. Cleared, the mask is not
    sent: img2img, whose output is the photo's size."""
    from selenium.webdriver.common.by import By
    upload(page, write_png(tmp_path / "cond.png", 64, noise=False))
    choose_photo(page, write_photo(tmp_path / "photo.png", 48, 64), (48, 64))
    assert page.find_element(By.ID, "strength").get_attribute("value") == "0.8"   # diffusers' img2img default
    paint_stroke(page)
    record_requests(page)
    generate(page)
    assert not page.find_element(By.ID, "error").text, page.find_element(By.ID, "error").text
    assert page.find_element(By.ID, "result").is_displayed() and result_size(page) == (64, 64)  # inpainting: native
    body, mask = sent_mask(page)
    assert body["init_image"].startswith("data:image/png;base64,") and body["strength"] == 0.8
    assert mask.shape == (64, 48)
    assert (mask > 127).sum() > 40 and (mask < 128).sum() > 40   # painted (white) and kept (black) pixels
    assert (mask[:, 0] == 0).all() and (mask[0] == 0).all()       # the stroke crossed the middle, not the edges
    page.find_element(By.ID, "clearmask").click()
    page.find_element(By.ID, "prompt").clear()
    generate(page)
    body, mask = sent_mask(page)
    assert mask is None and "init_image" in body and not page.find_element(By.ID, "error").text
    assert result_size(page) == (48, 64)  # img2img: the photo's size


def test_an_inpainting_server_asks_for_a_photo_and_a_painted_mask(browser, tiny_inpaint, tmp_path):
    """On a 9-channel inpainting model the page says what is missing before sending; with a painted mask the
    server (which refuses a request without one) answers an image."""
    from selenium.webdriver.common.by import By

    with ServerProcess(tiny_args(tiny_inpaint)) as srv:
        page = browser
        page.get(srv.url + "/")
        assert page.find_element(By.ID, "strength").get_attribute("value") == "1"   # diffusers' inpainting default
        upload(page, write_png(tmp_path / "cond.png", 64, noise=False))
        page.find_element(By.ID, "generate").click()
        assert "Choose a photo to inpaint" in page.find_element(By.ID, "error").text
        choose_photo(page, write_photo(tmp_path / "photo.png", 64, 64), (64, 64))
        page.find_element(By.ID, "generate").click()
        assert "Paint on the photo" in page.find_element(By.ID, "error").text
        paint_stroke(page)
        generate(page)
        assert not page.find_element(By.ID, "error").text, page.find_element(By.ID, "error").text
        assert page.find_element(By.ID, "result").is_displayed()
        srv.terminate()
