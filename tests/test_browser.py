"""The page in a real browser: Playwright drives Debian's Chromium against `brainmets app` and the real API
(`brainmets serve`), each a subprocess on a free loopback port. Screenshots go to the test's tmp folder."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainmets.app.client import Client
from brainmets.app.launch import free_port, running
from samples import brain, encode

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UPLOAD = '[data-testid="stFileUploaderDropzoneInput"]'
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium`")]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """A report as `brainmets compare` lays it out: results.md naming a figure, and the seed-recipe run."""
    docs = tmp_path_factory.mktemp("docs")
    (docs / "seed-recipe").mkdir()
    (docs / "seed-recipe" / "metrics.json").write_text('{"dice_per_patient_mean": 0.42, "patients": 2}\n')
    figure = np.full((120, 360, 3), 255, np.uint8)
    cv2.putText(figure, "training curves", (20, 70), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (40, 40, 200), 2)
    cv2.imwrite(str(docs / "results-training-curves.png"), figure)
    (docs / "results.md").write_text("# Results\n\n![training curves](results-training-curves.png)\n")
    return docs


@pytest.fixture(scope="module")
def page_url(api_server, docs, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "brainmets", "app", "--port", str(port), "--api", api_server, "--docs", str(docs)]
    with running(command, f"{url}/_stcore/health", "page", tmp_path_factory.mktemp("page") / "page.log",
                 timeout_s=60):
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def settle(page) -> None:
    page.locator(IDLE).wait_for(timeout=TIMEOUT_MS)


def test_upload_see_the_lesions_compare_and_a_bad_file(browser, page_url, api_server, tmp_path):
    slice_png = tmp_path / "slice.png"
    slice_png.write_bytes(encode(".png", brain(64, seed=3)[0]))
    answer = Client(api_server).segment(slice_png.read_bytes(), "slice.png")
    assert answer["lesions"]

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(page_url)
    segment_tab = page.get_by_role("tabpanel", name="Segment")
    segment_tab.locator(UPLOAD).wait_for(state="attached")
    settle(page)
    assert "Connected" in page.get_by_test_id("stSidebar").inner_text()

    # Segment: the overlay, the heat map and the lesion table, with the API's lesion count
    segment_tab.locator(UPLOAD).set_input_files(str(slice_png))
    overlay = page.get_by_test_id("stImage").filter(has_text="lesions outlined").locator("img")
    overlay.wait_for()
    result = page.locator(".st-key-result-best")
    result.get_by_test_id("stDataFrame").wait_for()
    settle(page)
    count = result.get_by_test_id("stMetric").filter(has_text="Lesions").get_by_test_id("stMetricValue")
    assert int(count.inner_text()) == len(answer["lesions"])
    figures = page.get_by_role("tabpanel", name="Segment").locator('[data-testid="stImage"] img')
    assert figures.count() == 4  # input, CLAHE view, overlay, heat map
    assert all(figures.nth(i).evaluate("img => img.complete && img.naturalWidth") == 64 for i in range(4))
    page.screenshot(path=tmp_path / "segment.png", full_page=True)

    # Compare: the metrics table with the seed-recipe row, and the report's figure
    page.get_by_role("tab", name="Compare").click()
    panel = page.get_by_role("tabpanel", name="Compare")
    panel.locator('[data-testid="stImage"] img').wait_for()
    assert panel.get_by_test_id("stDataFrame").count() == 1
    assert "training curves" in panel.get_by_test_id("stImage").inner_text()
    page.screenshot(path=tmp_path / "compare.png", full_page=True)

    page.get_by_role("tab", name="About").click()
    assert "not a medical device" in page.get_by_role("tabpanel", name="About").inner_text()
    page.screenshot(path=tmp_path / "about.png", full_page=True)

    # A file that is no image: the API's reason on the page, and no traceback
    page.get_by_role("tab", name="Segment").click()
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels")
    segment_tab.locator(UPLOAD).set_input_files(str(notes))
    alert = page.get_by_test_id("stAlertContentError").filter(has_text="notes.txt")
    alert.wait_for()
    settle(page)
    assert "unsupported file type" in alert.inner_text()
    assert page.get_by_test_id("stException").count() == 0
    assert result.count() == 0 and overlay.count() == 0
    page.screenshot(path=tmp_path / "error.png", full_page=True)
    page.close()


def test_a_zipped_study_scrubbed_to_a_lesion_and_its_seg_downloaded(browser, page_url, api_server, tmp_path):
    import highdicom as hd
    from dicom_studies import mr_study, to_files, zip_bytes

    from brainmets.app.study_view import largest_slice
    from brainmets.inputs.study import study_from_upload

    study = mr_study([brain(64, seed=s)[0] for s in range(5)])
    archive = tmp_path / "study.zip"
    archive.write_bytes(zip_bytes(to_files(study.datasets)))
    result = Client(api_server).segment_study(archive.read_bytes(), "study.zip")
    lesion = result.answer["lesions"][0]
    target = largest_slice(study_from_upload(archive.read_bytes()).mask_slices(result.nifti), lesion)

    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(page_url)
    page.get_by_role("tab", name="Study").click()
    panel = page.get_by_role("tabpanel", name="Study")
    panel.locator(UPLOAD).set_input_files(str(archive))
    panel.get_by_role("button", name="Segment the study (5 slices)").click()
    panel.get_by_role("button", name="DICOM SEG").wait_for()
    settle(page)
    count = panel.get_by_test_id("stMetric").filter(has_text="Lesions (3-D)").get_by_test_id("stMetricValue")
    assert int(count.inner_text()) == len(result.answer["lesions"])

    thumb = panel.get_by_test_id("stSliderThumbValue").last  # the slice scrubber, under the opacity slider
    panel.get_by_test_id("stSlider").last.get_by_role("slider").press("Home")
    settle(page)
    assert thumb.inner_text() == "0"
    panel.get_by_role("button", name=f"Lesion {lesion['id']}").click()
    settle(page)
    assert thumb.inner_text() == str(target)
    assert f"Slice {target}:" in panel.get_by_test_id("stImage").first.inner_text()
    page.screenshot(path=tmp_path / "study.png", full_page=True)

    with page.expect_download() as download:
        panel.get_by_role("button", name="DICOM SEG").click()
    seg = hd.seg.segread(download.value.path())
    flair = [d.SOPInstanceUID for d in study.series["AX T2 FLAIR"]]
    mask = seg.get_pixels_by_source_instance(flair, segment_numbers=[1])[..., 0] > 0
    assert mask.sum(axis=(1, 2)).tolist() == result.answer["slice_lesion_px"]
    page.close()


def test_api_docs_render_with_no_network_but_the_api(browser, api_server):
    """/docs and /redoc as on an offline hospital network: any request to another host is refused, and both
    render. The only outside request left is ReDoc's attribution logo, an image that is simply missing offline."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    elsewhere = []

    def only_the_api(route):
        if route.request.url.startswith(api_server):
            route.continue_()
        else:
            elsewhere.append((route.request.resource_type, route.request.url))
            route.abort()

    page.route("**/*", only_the_api)
    page.goto(f"{api_server}/docs")
    page.locator(".opblock-summary-path").filter(has_text="/v1/segment/volume").wait_for()
    assert "Segment one slice" in page.locator("#swagger-ui").inner_text()
    page.goto(f"{api_server}/redoc")
    page.get_by_role("heading", name="Segment a NIfTI volume").wait_for()
    assert all(kind == "image" for kind, _ in elsewhere), elsewhere  # no script, style or font
    page.close()
