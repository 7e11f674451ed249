"""The page: its drawing helpers, its HTTP client, the Streamlit script under AppTest against the real API
(`api_server`), and `brainmets run` starting and stopping the API and the page together."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import streamlit as st
from streamlit.testing.v1 import AppTest

import brainmets.app
from brainmets.app import about, images
from brainmets.app.client import ApiError, Client
from brainmets.app.launch import free_port, running
from brainmets.app.segment import available_modes
from brainmets.inputs.readers import ACCEPTED, read_slice, read_volume
from brainmets.inputs.study import study_from_volume
from samples import brain, dicom, encode, nifti

PAGE = Path(brainmets.app.__file__).with_name("page.py")


# --- drawing ---------------------------------------------------------------------------------------------

def test_overlay_fills_at_the_opacity_and_outlines_the_lesion():
    rgb = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    out = images.overlay(rgb, mask, opacity=0.25)
    assert out[0, 0].tolist() == [100, 100, 100]  # background untouched
    expected = np.round(0.75 * 100 + 0.25 * np.array(images.LESION_RGB)).tolist()
    assert out[20, 20].tolist() == expected  # filled at 25 %
    assert out[10, 20].tolist() == list(images.LESION_RGB)  # the outline at full strength
    assert (images.overlay(rgb, np.zeros_like(mask), 1.0) == rgb).all()


def test_heatmap_leaves_unlikely_pixels_gray_and_colours_likely_ones():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 90  # gray is the channel mean: 30
    prob = np.zeros((8, 8), np.uint8)
    prob[4:, :] = 255
    out = images.heatmap(rgb, prob)
    assert out[0, 0].tolist() == [30, 30, 30]
    inferno_top = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_INFERNO)[0, 0, ::-1]
    assert np.abs(out[7, 7].astype(int) - (0.15 * 30 + 0.85 * inferno_top)).max() <= 1


def test_png_bytes_round_trip_in_rgb_order():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert (read_slice(images.png_bytes(rgb)).pixels == rgb).all()


def test_axial_slices_follow_the_affine():
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)  # voxel axes i, j, k
    ras = study_from_volume(read_volume(nifti(data, np.diag([2.0, 3.0, 4.0, 1.0]))))
    slices = [s[..., 1] for s in ras.slices]
    assert len(slices) == 3 and slices[0].shape == (5, 4)  # rows: anterior-posterior, columns: right-left
    assert ras.spacing == (4.0, 3.0, 2.0)
    np.testing.assert_array_equal(slices[0], data[::-1, ::-1, 0].T)  # anterior up, the patient's right on the left
    # the same grid stored left-right and posterior-anterior flipped (LPS, as DICOM) gives the same images
    lps = study_from_volume(read_volume(nifti(data[::-1, ::-1].copy(), np.diag([-2.0, -3.0, 4.0, 1.0]))))
    assert all((a[..., 1] == b).all() for a, b in zip(lps.slices, slices))


def test_available_modes_follow_the_installed_models():
    every = ["best", "U-Net++", "Attention U-Net", "both side by side", "ensemble"]
    assert available_modes(None) == every
    assert available_modes([{"name": "attention-unet", "best": True}]) == ["best", "Attention U-Net"]
    both = [{"name": "unetpp", "best": False}, {"name": "attention-unet", "best": True}]
    assert available_modes(both) == every
    no_metrics = [{"name": "unetpp", "best": False}, {"name": "attention-unet", "best": False}]
    assert available_modes(no_metrics) == every[1:]
    assert available_modes([]) == []


# --- the client --------------------------------------------------------------------------------------------

def test_client_names_the_address_of_a_backend_that_is_down():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ApiError, match=f"not reachable at {url}.*brainmets serve"):
        Client(url).health()


def test_client_passes_on_the_api_s_reason(api_server):
    with pytest.raises(ApiError, match=r"^unsupported file type: expected PNG.*\(the API answered 415\)$"):
        Client(api_server).segment(b"just some text", "notes.txt")
    with pytest.raises(ApiError, match=r"model.*no-such-model.*\(the API answered 422\)"):
        Client(api_server).segment(b"x", "a.png", model="no-such-model")


def test_volume_slices_through_the_api_match_the_volume_endpoint(api_server):
    """The page segments a volume slice by slice through /v1/segment; its masks must be the slices of the
    mask /v1/segment/volume returns, or the slider would show something the download does not hold."""
    data = np.stack([brain(48, seed=s)[0][..., 1] for s in range(3)], axis=2).astype(np.float32) * 1.5 + 10
    file = nifti(data, np.diag([-0.9, -0.9, 3.0, 1.0]) @ np.eye(4)[[1, 0, 2, 3]])  # LPS-like, axes swapped
    client = Client(api_server)
    volume = client.segment_volume(file, "v.nii.gz")
    study = study_from_volume(read_volume(file))  # the page's slices of a volume: the engine's
    mask_slices, slices = study.mask_slices(volume.nifti), study.slices
    total = 0
    for k, image in enumerate(slices):
        answer = client.segment(images.png_bytes(image), f"slice{k}.png")
        mask = images.decode_png(base64.b64decode(answer["mask_png"])) > 0
        assert (mask == (mask_slices[k] > 0)).all(), f"slice {k}"
        total += answer["lesion_area_px"]
    assert total == volume.lesion_voxels > 0
    assert volume.lesion_volume_mm3 == pytest.approx(total * 0.9 * 0.9 * 3.0, rel=1e-3)


# --- the page under AppTest --------------------------------------------------------------------------------

def start_page(api: str, docs: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("BRAINMETS_API", api)
    monkeypatch.setenv("BRAINMETS_DOCS", str(docs))
    st.cache_data.clear()  # the page's caches live in this process, across tests
    at = AppTest.from_file(str(PAGE), default_timeout=60)
    return at.run()


@pytest.fixture
def page(api_server, tmp_path, monkeypatch) -> AppTest:
    return start_page(api_server, tmp_path / "docs", monkeypatch)


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
    return at.run()


def metrics(at: AppTest, label: str) -> list[str]:
    return [m.value for m in at.metric if m.label == label]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_a_slice_shows_what_the_api_found(page, api_server):
    image = brain(64, seed=3)[0]
    png = encode(".png", image)
    answer = Client(api_server).segment(png, "slice.png")
    assert answer["lesions"]  # the tiny model finds something, so the count below means something
    upload(page, "slice.png", png)
    assert_clean(page)
    assert metrics(page, "Lesions") == [str(len(answer["lesions"]))]
    assert metrics(page, "Area (px)") == [str(answer["lesion_area_px"])]
    assert metrics(page, "Area (mm²)") == ["–"]  # a PNG carries no pixel spacing
    assert [s.value for s in page.tabs[0].subheader] == ["Attention U-Net"]  # `best` here is the tiny attention-unet
    captions = [c for im in page.tabs[0].image for c in im.captions]
    assert captions == ["Input (64x64 px)", "CLAHE-enhanced at 64x64, as the network sees it",
                        "Attention U-Net: lesions outlined", "Attention U-Net: probability (dark 0, yellow 1)"]
    table = page.dataframe[0].value
    assert len(table) == len(answer["lesions"])
    assert table["area (px)"].tolist() == [les["area_px"] for les in answer["lesions"]]
    assert [b.label for b in page.get("download_button")] == ["Mask PNG", "Overlay PNG"]


@pytest.mark.parametrize("name, file", [
    ("slice.tif", encode(".tif", brain(80, seed=6)[0].astype(np.uint16) * 257)),  # 16-bit TIFF
    ("slice.jpg", encode(".jpg", brain(72, seed=7)[0][..., 1])),  # 8-bit gray JPEG
])
def test_raster_slices_of_any_depth_are_shown(page, name, file):
    upload(page, name, file)
    assert_clean(page)
    size = read_slice(file).pixels.shape[0]
    assert page.tabs[0].image[0].captions == [f"Input ({size}x{size} px)"]
    assert len(metrics(page, "Lesions")) == 1


def test_both_models_side_by_side_and_the_ensemble(page):
    upload(page, "slice.png", encode(".png", brain(64, seed=4)[0]))
    page.selectbox[0].set_value("both side by side").run()
    assert_clean(page)
    assert [s.value for s in page.tabs[0].subheader] == ["U-Net++", "Attention U-Net"]
    assert len(metrics(page, "Lesions")) == 2 and len(page.tabs[0].image) == 6
    page.selectbox[0].set_value("ensemble").run()
    page.toggle[0].set_value(True).run()
    assert_clean(page)
    assert [s.value for s in page.tabs[0].subheader] == ["Ensemble (mean of U-Net++ and Attention U-Net)"]


def test_a_dicom_slice_gets_areas_in_mm2(page, api_server):
    pixels = (brain(64, seed=5)[0][..., 1].astype(np.uint16) * 10)
    file = dicom(pixels, spacing=(0.5, 0.8))
    answer = Client(api_server).segment(file, "slice.dcm")
    upload(page, "slice.dcm", file)
    assert_clean(page)
    assert metrics(page, "Area (mm²)") == [f"{answer['lesion_area_px'] * 0.4:.1f}"]


def test_a_volume_gets_a_slice_slider_and_a_nifti_mask(page):
    data = np.stack([brain(48, seed=s)[0][..., 1] for s in range(5)], axis=2).astype(np.int16)
    upload(page, "head.nii.gz", nifti(data, np.diag([0.9, 0.9, 3.0, 1.0])))
    assert_clean(page)
    slider = next(s for s in page.slider if s.label.startswith("Axial slice"))
    assert (slider.min, slider.max, slider.value) == (0, 4, 2)
    area = float(metrics(page, "Area (mm²)")[0])
    assert area == pytest.approx(int(metrics(page, "Area (px)")[0]) * 0.81, abs=0.06)
    slider.set_value(0).run()
    assert_clean(page)
    page.button[0].click().run()
    assert_clean(page)
    assert metrics(page, "Lesion volume, Attention U-Net")[0].endswith("mm³")
    assert "Mask NIfTI" in [b.label for b in page.get("download_button")]


def test_a_text_file_gets_the_api_s_message_not_a_traceback(page):
    upload(page, "notes.txt", b"these are not pixels")
    assert not page.exception
    assert len(page.error) == 1
    assert page.error[0].value.startswith("notes.txt: unsupported file type: expected PNG")
    assert not page.metric


def test_a_backend_that_is_down_is_named(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    at = start_page(url, tmp_path, monkeypatch)
    assert not at.exception
    assert f"not reachable at {url}" in at.sidebar.error[0].value
    upload(at, "slice.png", encode(".png", brain(64)[0]))
    assert not at.exception
    assert any(e.value.startswith(f"slice.png: The brainmets API is not reachable at {url}") for e in at.main.error)


def test_compare_shows_the_models_metrics_the_seed_row_and_the_report(api_server, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    (docs / "seed-recipe").mkdir(parents=True)
    (docs / "seed-recipe" / "metrics.json").write_text(json.dumps({"dice_per_patient_mean": 0.42, "patients": 2}))
    cv2.imwrite(str(docs / "results-training-curves.png"), np.zeros((20, 30, 3), np.uint8))
    (docs / "results.md").write_text("# Results\n\n| model |\n|---|\n| x |\n\n"
                                     "![training curves](results-training-curves.png)\n\n"
                                     "![overlays](results-overlays.png)\n\nThe end.\n")
    at = start_page(api_server, docs, monkeypatch)
    assert not at.exception
    table = at.dataframe[0].value
    assert table["model"].tolist() == ["unetpp", "attention-unet", "seed recipe"]
    assert table["Dice / patient (mean)"].tolist() == [0.7, 0.1, 0.42]
    assert [c for im in at.tabs[2].image for c in im.captions] == ["training curves"]
    assert not any("| model |" in m.value for m in at.markdown)  # the report's table: the one above already
    assert any("results-overlays.png, which is missing" in w.value for w in at.warning)
    assert any("The end." in m.value for m in at.markdown)


def test_compare_says_when_there_is_no_report_yet(page):
    assert any("No comparison report yet" in i.value for i in page.info)


def test_about_states_the_data_the_metrics_and_the_limits(page):
    text = " ".join(m.value for m in page.markdown)
    for words in ("Buda et al.", "FLAIR abnormality", "Dice per patient (3-D)", "not a medical device",
                  "configuration: U-Net++ threshold 0.5, a volume or study keeps every 3-D lesion; Attention U-Net "
                  "threshold 0.5, a volume or study keeps every 3-D lesion; Ensemble"):  # the served configs
        assert words in text


def test_about_reads_each_model_s_post_processing():
    models = [{"name": "unetpp", "threshold": 0.6, "min_lesion_px": 100, "image_size": 256, "lesion_mode": "single"},
              {"name": "attention-unet", "threshold": 0.8, "min_lesion_px": 0, "image_size": 256}]
    assert about.postprocessing(models) == ("U-Net++ threshold 0.6, a lone slice's lesions under 100 px of a 256² "
                                            "slice dropped, a volume or study keeps its one strongest 3-D lesion; "
                                            "Attention U-Net threshold 0.8")
    assert about.postprocessing(None) == about.postprocessing([]) == "shown here when the API answers"


def test_the_upload_names_every_accepted_format(page):
    assert page.info[0].value.startswith(f"Upload an MRI slice or volume ({ACCEPTED}).") and "WebP" in ACCEPTED


# --- brainmets run ------------------------------------------------------------------------------------------

def test_a_server_that_dies_at_start_is_reported_with_the_end_of_its_output(tmp_path):
    command = [sys.executable, "-c", "print('port already taken'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)API exited with code 3 .*the end of .*server.log:\nport already taken"):
        with running(command, f"http://127.0.0.1:{free_port()}/health", "API", tmp_path / "server.log"):
            pytest.fail("a server that never answered was taken as started")


def _as_background_job() -> None:
    """What a shell without job control (a script, CI) does to every `&` job: SIGINT and SIGQUIT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_run_starts_the_api_and_the_page_and_a_signal_stops_both(models_root, monkeypatch, signum):
    # Started as a background job: a suite started by a script with `&` hung here while `run` kept Python's
    # default SIGINT handling, which stays "ignored" for a process that started with SIGINT ignored.
    api_port, page_port = free_port(), free_port()
    monkeypatch.setenv("BRAINMETS_MODELS", str(models_root))
    process = subprocess.Popen([sys.executable, "-m", "brainmets", "run", "--api-port", str(api_port),
                                "--port", str(page_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_as_background_job)
    try:
        lines = []
        while not any(line.startswith("page:") for line in lines):
            line = process.stdout.readline()
            assert line, f"brainmets run ended early:\n{''.join(lines)}"
            lines.append(line)
        assert any(f"http://127.0.0.1:{api_port}" in line for line in lines)
        assert requests.get(f"http://127.0.0.1:{api_port}/health", timeout=5).json()["models"]
        assert requests.get(f"http://127.0.0.1:{page_port}/_stcore/health", timeout=5).ok
        process.send_signal(signum)  # to `brainmets run` alone: it must stop its children itself
        # communicate, not wait: the children write to the same pipe as they stop
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "stopping the API and the page" in output
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.2)
    for port in (api_port, page_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
