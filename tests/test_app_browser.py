"""The web app end to end in a real headless browser (Debian's Chromium driven by Playwright): generate,
watch the result arrive, load it into the editor, paint a mask by dragging the mouse, inpaint several
fills, see a refused field's message, upload images (one the model cannot edit as it is, with a notice),
outpaint with the default extension, stop a long run, and switch to another model.

Needs ``scripts/install_browser.sh`` (CI runs it); without Chromium or Playwright this test fails
with that instruction rather than skipping. A screenshot is left at ``tests/artifacts/app.png``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sundae.app import BackgroundServer, create_app
from sundae.pipeline import SundaePipeline
from test_app_server import build_other_pipeline_dir, build_tiny_pipeline_dir

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).parent / "artifacts" / "app.png"
INSTALL_HINT = "run `bash scripts/install_browser.sh` (Debian's chromium + the playwright Python package)"

# Pixels of an <img> or <canvas>, as grey levels (the tiny model's images are grey).
READ_PIXELS = """(element) => {
    const canvas = document.createElement("canvas");
    canvas.width = element.naturalWidth || element.width;
    canvas.height = element.naturalHeight || element.height;
    const context = canvas.getContext("2d");
    context.drawImage(element, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    return {width: canvas.width, grey: Array.from(data.filter((_, index) => index % 4 === 0))};
}"""


def pixels(handle) -> np.ndarray:
    result = handle.evaluate(READ_PIXELS)
    return np.array(result["grey"], dtype=np.uint8).reshape(-1, result["width"])


def launch_chromium(playwright):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL_HINT}")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    pipeline = SundaePipeline.from_pretrained(build_tiny_pipeline_dir(root / "model"), device="cpu")
    app = create_app(pipeline, output_dir=root / "outputs", models={"other": build_other_pipeline_dir(root / "other")})
    with BackgroundServer(app) as server:
        yield server.url, app, root


def png_upload(name: str, side: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(buffer, format="PNG")
    return {"name": name, "mimeType": "image/png", "buffer": buffer.getvalue()}


def fill_fields(page, form: str, values: dict[str, str]) -> None:
    for name, value in values.items():
        page.fill(f"#{form}-fields [name={name}]", value)


def test_generate_paint_a_mask_and_inpaint_in_a_browser(app_url):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL_HINT}")
    url, app, _ = app_url
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            missing = []
            page.on("response", lambda response: missing.append(response.url) if response.status == 404 else None)
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", timeout=10_000)
            expect(page.locator("#model-info")).to_contain_text("tokenizer pixels (f=1, codebook 256) · 8×8 px")

            # a refused field is reported by name
            fill_fields(page, "generate", {"steps": "0"})
            page.click("#generate-button")
            expect(page.locator("#generate-status")).to_contain_text("error: steps: must be in [1, 1000]")

            # generate: the final images and their stop steps arrive
            fill_fields(page, "generate", {"num_images": "2", "steps": "12", "seed": "5"})
            page.click("#generate-button")
            expect(page.locator("#generate-status")).to_contain_text("done: 2 image(s)", timeout=20_000)
            results = page.locator("#generate-results img")
            expect(results).to_have_count(2)
            expect(page.locator("#generate-results figcaption").first).to_contain_text("seed 5 · stopped at step")
            assert results.first.get_attribute("src").startswith("data:image/png;base64,")
            download = page.locator("#generate-results a[download]").first
            assert download.get_attribute("download").endswith("-0.png")

            # load the first result into the editor, and paint a mask by dragging across the canvas
            blank = page.evaluate("state.editor.source")
            page.click("#generate-results figure:first-child button.use")
            page.wait_for_function("(blank) => state.editor.source !== blank", arg=blank)
            source = pixels(results.first)
            assert np.array_equal(pixels(page.locator("#image-canvas")), source)
            box = page.locator("#mask-canvas").bounding_box()
            page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.3 * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.75 * box["width"], box["y"] + 0.6 * box["height"], steps=6)
            page.mouse.up()
            mask = np.array(page.evaluate("Array.from(state.editor.mask)"), dtype=bool).reshape(8, 8)
            assert 4 <= mask.sum() < 64, f"the drag painted {mask.sum()} of 64 pixels"

            # inpaint three fills: they keep every unpainted pixel and differ inside the mask
            fill_fields(page, "edit", {"num_images": "3", "steps": "12", "seed": "1"})
            page.click("#edit-button")
            expect(page.locator("#edit-status")).to_contain_text("done: 3 image(s)", timeout=20_000)
            fills = [pixels(handle) for handle in page.locator("#edit-results img").element_handles()]
            assert len(fills) == 3
            for fill in fills:
                assert np.array_equal(fill[~mask], source[~mask])
            assert len({fill[mask].tobytes() for fill in fills}) == 3
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # an upload over the canvas limit (4 × 8x8) is fitted to the model's size, and the status says so
            page.set_input_files("#upload", files=[png_upload("big.png", 40)])
            expect(page.locator("#edit-status")).to_contain_text("big.png is 40×40 px, which this model cannot edit")
            expect(page.locator("#edit-status")).to_contain_text("centre-cropped and resized to 8×8 px")
            assert page.evaluate("[state.editor.width, state.editor.height]") == [8, 8]
            # one it can edit is used as it is, and replaces the last status line
            page.set_input_files("#upload", files=[png_upload("small.png", 16)])
            expect(page.locator("#edit-status")).to_have_text("loaded small.png (16×16 px)")
            assert page.evaluate("[state.editor.width, state.editor.height]") == [16, 16]
            # outpainting extends the right side by default, so a first Run does something
            page.select_option("#edit-mode", "outpaint")
            expect(page.locator("#edit-fields [name=right]")).to_have_value("4")
            fill_fields(page, "edit", {"num_images": "1", "steps": "4"})
            page.click("#edit-button")
            expect(page.locator("#edit-status")).to_contain_text("done: 1 image(s)", timeout=20_000)
            assert pixels(page.locator("#edit-results img").first).shape == (16, 20)

            # Stop aborts the stream, which cancels the job on the server
            fill_fields(page, "generate", {"steps": "1000"})
            page.uncheck("#generate-fields [name=early_stop]")
            page.click("#generate-button")
            expect(page.locator("#generate-status")).to_contain_text("sampling… step", timeout=20_000)
            page.click("#generate-stop")
            expect(page.locator("#generate-status")).to_have_text("stopped")
            page.wait_for_function("async () => (await (await fetch('/api/info')).json()).unfinished_jobs === 0",
                                   timeout=10_000)
            assert not missing, f"the page asked for missing files: {missing}"
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 1000


def test_switching_models_rebuilds_the_forms_and_generates_with_the_chosen_model(app_url):
    from playwright.sync_api import expect, sync_playwright

    url, _, root = app_url
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", timeout=10_000)
            options = page.locator("#model-select option")
            expect(options).to_have_count(2)
            assert [options.nth(i).text_content() for i in range(2)] == ["model", "other"]
            expect(page.locator("#model-select")).to_have_value("model")
            class_options = "#generate-fields [name=class_label] option"
            expect(page.locator(class_options, has_text="rings")).to_have_count(1)

            page.select_option("#model-select", "other")
            expect(page.locator("#model-info")).to_contain_text("12×12 px · 2 classes")
            page.wait_for_selector("body[data-ready=true]", timeout=10_000)
            expect(page.locator(class_options, has_text="rings")).to_have_count(0)
            expect(page.locator(class_options, has_text="right")).to_have_count(1)
            assert page.evaluate("[state.editor.width, state.editor.height]") == [12, 12]

            page.select_option("#generate-fields [name=class_label]", "right")
            fill_fields(page, "generate", {"num_images": "1", "steps": "8", "seed": "4"})
            page.click("#generate-button")
            expect(page.locator("#generate-status")).to_contain_text("done: 1 image(s)", timeout=20_000)
            image = pixels(page.locator("#generate-results img").first)
            expected = SundaePipeline.from_pretrained(root / "other", device="cpu")(1, seed=4, class_labels="right",
                                                                                    steps=8).images[0]
            assert np.array_equal(image, np.asarray(expected))

            # the model's editing example: its image and mask in the editor, its class chosen, fills that keep
            # the unmasked half
            expect(page.locator("#examples")).to_be_visible()
            page.select_option("#example-select", label="ramp: redo the right half")
            expect(page.locator("#edit-status")).to_contain_text("example: ramp: redo the right half")
            mask = np.array(page.evaluate("Array.from(state.editor.mask)"), dtype=bool).reshape(12, 12)
            assert mask[:, 6:].all() and not mask[:, :6].any()
            expect(page.locator("#edit-fields [name=class_label]")).to_have_value("1")
            fill_fields(page, "edit", {"num_images": "2", "steps": "8", "seed": "0"})
            page.click("#edit-button")
            expect(page.locator("#edit-status")).to_contain_text("done: 2 image(s)", timeout=20_000)
            ramp = np.tile(np.arange(0, 240, 20, dtype=np.uint8), (12, 1))
            for fill in page.locator("#edit-results img").element_handles():
                assert np.array_equal(pixels(fill)[:, :6], ramp[:, :6])
        finally:
            browser.close()
