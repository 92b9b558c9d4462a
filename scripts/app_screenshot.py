"""The README's picture of the web app: the shipped models, the emoji one chosen, a batch generated and
one of its editing examples inpainted (needs `bash scripts/install_browser.sh`).

    python scripts/app_screenshot.py [--model emoji] [--out docs/app.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sundae.app import BackgroundServer, create_app
from sundae.app.server import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji", help="the model the page switches to")
    parser.add_argument("--class-label", default="Food & Drink", help="class of the generated batch")
    parser.add_argument("--out", default=str(ROOT / "docs/app.png"))
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    app = create_app(load_pipeline(None, device="cpu"))  # the default model first, as `sundae serve` starts
    with BackgroundServer(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            page.select_option("#model-select", args.model)
            page.wait_for_function(f"state.info.model.name === {args.model!r}", timeout=60_000)
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            page.select_option("#generate-fields [name=class_label]", label=args.class_label)
            page.fill("#generate-fields [name=num_images]", "8")
            page.fill("#generate-fields [name=seed]", "0")
            page.click("#generate-button")
            expect(page.locator("#generate-status")).to_contain_text("done", timeout=300_000)
            options = page.locator("#example-select option")
            if options.count() > 1:
                page.select_option("#example-select", index=1)
                expect(page.locator("#edit-status")).to_contain_text("example:")
                page.fill("#edit-fields [name=num_images]", "4")
                page.fill("#edit-fields [name=seed]", "0")
                page.click("#edit-button")
                expect(page.locator("#edit-status")).to_contain_text("done", timeout=300_000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            print(f"wrote {args.out}")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
