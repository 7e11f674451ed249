"""Regenerate the page's screenshots (segment.png, compare.png, about.png) beside this file.

    .venv/bin/python docs/screenshots/take.py [--slice FILE] [--data ../shared/data/lgg]

Starts the API (`brainmets serve`, models from $BRAINMETS_MODELS or models/) and the page on free loopback
ports, uploads a slice of the reference data (by default the one with the largest lesion among the test
patients of the best shipped model), and photographs each view with Debian's Chromium.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
from playwright.sync_api import sync_playwright

from brainmets.app.launch import free_port, page_command, page_env, running, serve_command
from brainmets.app.segment import SIDE_BY_SIDE
from brainmets.registry import SHIPPED, models_dir

HERE = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
UPLOAD = '[data-testid="stFileUploaderDropzoneInput"]'
DATA = Path(os.environ.get("BRAINMETS_DATA", HERE.parents[2] / "shared" / "data" / "lgg"))


def largest_lesion_slice(data: Path) -> Path:
    """The slice with the most lesion pixels among the shipped models' test patients (all patients if no
    split is shipped)."""
    splits = [models_dir() / n / "split.json" for n in SHIPPED if (models_dir() / n / "split.json").exists()]
    patients = json.loads(splits[0].read_text())["test"] if splits else [p.name for p in data.iterdir() if p.is_dir()]
    masks = [m for p in patients for m in (data / p).glob("*_mask.*")]
    best = max(masks, key=lambda m: int((cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 0).sum()))
    return next(best.parent.glob(best.name.replace("_mask", "").rsplit(".", 1)[0] + ".*"))


def as_tiff(image: Path, folder: Path) -> Path:
    """The original Data.zip hands out TIFFs; the shared copy stores lossless WebP."""
    out = folder / (image.stem + ".tif")
    cv2.imwrite(str(out), cv2.imread(str(image), cv2.IMREAD_UNCHANGED))
    return out


def shoot(page, path: Path) -> None:
    """The whole view: Streamlit scrolls inside its own container, so the window grows to fit it first."""
    page.locator(IDLE).wait_for()
    page.wait_for_timeout(500)  # images finish decoding
    height = page.evaluate("document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": min(height + 40, 6000)})
    page.wait_for_timeout(300)
    page.screenshot(path=path)


@contextlib.contextmanager
def api_and_page() -> Iterator[str]:
    """`brainmets serve` and the page on free loopback ports, stopped on exit: the page's URL."""
    api_port, page_port = free_port(), free_port()
    api, page_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{page_port}"
    with (running(serve_command("127.0.0.1", api_port), f"{api}/health", "API"),
          running(page_command("127.0.0.1", page_port), f"{page_url}/_stcore/health", "page", env=page_env(api)),
          tempfile.TemporaryDirectory() as tmp, sync_playwright() as p):
        upload = as_tiff(args.slice or largest_lesion_slice(args.data), Path(tmp))
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 1300})
        page.set_default_timeout(60_000)
        page.goto(page_url)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').wait_for(state="attached")
        page.locator(IDLE).wait_for()
        if page.get_by_test_id("stSelectbox").count():
            page.get_by_test_id("stSelectbox").click()
            options = page.get_by_role("option")
            labels = options.all_inner_texts()
            options.nth(labels.index(SIDE_BY_SIDE) if SIDE_BY_SIDE in labels else 0).click()
            page.locator(IDLE).wait_for()
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(upload))
        page.get_by_test_id("stDataFrame").first.wait_for()
        shoot(page, HERE / "segment.png")
        for view in ("Compare", "About"):
            page.get_by_role("tab", name=view).click()
            shoot(page, HERE / f"{view.lower()}.png")
        browser.close()
    print(f"uploaded {upload.name}; screenshots in {HERE}")


@contextlib.contextmanager
def chromium_page(url: str, width: int, height: int) -> Iterator:
    """Debian's Chromium on the page, loaded and idle."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator(UPLOAD).wait_for(state="attached")
            page.locator(IDLE).wait_for()
            yield page
        finally:
            browser.close()


def choose_model(page, label: str) -> None:
    """Pick `label` in the Model box (the first choice when the backend does not offer it)."""
    page.get_by_test_id("stSelectbox").click()
    options = page.get_by_role("option")
    labels = options.all_inner_texts()
    options.nth(labels.index(label) if label in labels else 0).click()
    page.locator(IDLE).wait_for()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", type=Path, help="Slice to upload (default: picked from --data).")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="Reference data (default: $BRAINMETS_DATA, else ../shared/data/lgg).")
    parser.add_argument("--width", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, api_and_page() as url, chromium_page(url, args.width, 1300) as page:
        upload = as_tiff(args.slice or largest_lesion_slice(args.data), Path(tmp))
        if page.get_by_test_id("stSelectbox").count():
            choose_model(page, "both side by side")
        page.locator(UPLOAD).set_input_files(str(upload))
        page.get_by_test_id("stDataFrame").first.wait_for()
        shoot(page, HERE / "segment.png")
        for view in ("Compare", "About"):
            page.get_by_role("tab", name=view).click()
            shoot(page, HERE / f"{view.lower()}.png")
    print(f"uploaded {upload.name}; screenshots in {HERE}")


if __name__ == "__main__":
    main()
