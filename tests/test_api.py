from __future__ import annotations

import asyncio
import base64
import gzip
import re
import shutil
import threading
import time

import cv2
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainmets.api import service
from brainmets.api.main import DOCS_ASSETS, create_app
from brainmets.api.service import InferencePool, Overloaded
from brainmets.api.settings import Settings
from conftest import api_client
from samples import bomb_png, brain, dicom, encode, nifti, tiff_stack

IMAGE, TRUTH = brain(64, seed=2)
GRAY16 = (IMAGE[..., 1].astype(np.uint16) * 200 + 7)
AFFINE = np.array([[-0.9, 0, 0, 30], [0, 0.9, 0, -20], [0, 0, 3.0, -10], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def client(models_root):
    yield from api_client(models_root, max_upload_mb=1)


def post(client, data: bytes, name: str = "slice.png", field: str = "file", url: str = "/v1/segment", **params):
    return client.post(url, files={field: (name, data, "application/octet-stream")}, params=params)


def png_array(b64: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


def test_health_lists_the_installed_models(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": ["unetpp", "attention-unet"]}


def test_models_show_metrics_but_no_server_paths(client):
    for _ in range(300):  # the models load in the background after start-up; /v1/models says once they have
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        if all(m["runtime"] for m in models.values()):
            break
        time.sleep(0.1)
    assert set(models) == {"unetpp", "attention-unet", "ensemble"}
    best = models["attention-unet"]
    assert best["best"] and not models["unetpp"]["best"] and not models["ensemble"]["best"]
    assert best["metrics"] == {"dice_per_patient_mean": 0.1, "patients": 2}  # the checkpoint path is left out
    assert best["validation_dice"] == 0.6 and models["ensemble"]["validation_dice"] is None
    assert (best["image_size"], best["threshold"], best["min_lesion_px"], best["runtime"]) == (64, 0.5, 0, "openvino")
    assert (best["lesion_mode"], best["min_lesion_voxels"]) == ("multiple", 0) and best["precision"] in ("bf16", "f32")
    assert best["precision_reason"].startswith(("measured: ", "CPU has no bf16", "forced by"))
    assert models["unetpp"]["runtime"] == "torch"


@pytest.mark.parametrize("name, data, size", [
    ("png-8", encode(".png", IMAGE), (64, 64)),
    ("png-16", encode(".png", GRAY16), (64, 64)),
    ("tiff-8", encode(".tif", cv2.resize(IMAGE, (90, 70))), (90, 70)),
    ("tiff-16", encode(".tif", GRAY16), (64, 64)),
    ("jpeg", encode(".jpg", cv2.resize(IMAGE, (200, 150))), (200, 150)),
    ("webp", encode(".webp", IMAGE), (64, 64)),
    ("dicom", dicom(GRAY16, spacing=(0.5, 0.5)), (64, 64)),
])
def test_every_format_gives_a_mask_of_the_input_size(client, name, data, size):
    r = post(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["model"]) == (*size, "attention-unet")
    mask, prob = png_array(body["mask_png"]), png_array(body["probability_png"])
    assert mask.shape == prob.shape == size[::-1]
    assert set(np.unique(mask)) <= {0, 255}
    assert body["lesion_area_px"] == int((mask == 255).sum()) == sum(les["area_px"] for les in body["lesions"])
    assert body["inference_ms"] > 0
    if name == "dicom":
        assert body["lesion_area_mm2"] == pytest.approx(body["lesion_area_px"] * 0.25)
    else:
        assert body["lesion_area_mm2"] is None


def test_png_format_returns_the_mask_itself(client):
    r = post(client, encode(".png", IMAGE), format="png", model="unetpp", tta="true")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 64) and r.headers["x-model"] == "unetpp"
    assert int(r.headers["x-lesion-area-px"]) == int((mask == 255).sum())


def test_ensemble_averages_the_two_networks(client):
    data = encode(".png", IMAGE)
    probs = {m: png_array(post(client, data, model=m).json()["probability_png"]).astype(float)
             for m in ("unetpp", "attention-unet", "ensemble")}
    assert post(client, data, model="ensemble").json()["model"] == "ensemble"
    assert np.abs(probs["ensemble"] - (probs["unetpp"] + probs["attention-unet"]) / 2).max() <= 1


def test_a_slice_answer_names_the_model_version_tta_included(client):
    data = encode(".png", IMAGE)
    plain, tta = (post(client, data, model="unetpp", tta=t) for t in ("false", "true"))
    assert plain.json()["model_version"].startswith("unetpp-") and tta.json()["model_version"].startswith("unetpp-")
    assert plain.json()["model_version"] != tta.json()["model_version"]  # TTA changes masks: another version
    png = post(client, data, model="unetpp", format="png")
    assert png.headers["x-model-version"] == plain.json()["model_version"]


def test_volume_in_nifti_out(client):
    volume = np.stack([GRAY16.T] * 3 + [np.zeros_like(GRAY16)], axis=2).astype(np.int16)
    r = post(client, nifti(volume, AFFINE), "brain.nii.gz", url="/v1/segment/volume")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip" and "mask.nii.gz" in r.headers["content-disposition"]
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    np.testing.assert_allclose(mask.affine, AFFINE)
    data = np.asanyarray(mask.dataobj)
    assert data.shape == volume.shape and set(np.unique(data)) <= {0, 1}
    assert int(r.headers["x-lesion-voxels"]) == data.sum()
    assert float(r.headers["x-lesion-volume-mm3"]) == pytest.approx(data.sum() * 0.9 * 0.9 * 3.0, abs=0.01)
    assert r.headers["x-model"] == "attention-unet"


def test_lesion_mode_of_a_volume_can_be_chosen(client):
    """`single` keeps one 3-D lesion of the volume, never more voxels than `multiple`; anything else is a 422."""
    volume = np.stack([GRAY16.T] * 3 + [np.zeros_like(GRAY16)], axis=2).astype(np.int16)
    voxels = {}
    for mode in ("single", "multiple"):
        r = post(client, nifti(volume, AFFINE), "brain.nii.gz", url="/v1/segment/volume", lesion_mode=mode)
        assert r.status_code == 200, r.text
        voxels[mode] = int(r.headers["x-lesion-voxels"])
    assert voxels["single"] <= voxels["multiple"]
    r = post(client, nifti(volume, AFFINE), "brain.nii.gz", url="/v1/segment/volume", lesion_mode="some")
    assert r.status_code == 422 and "lesion_mode" in r.text


def test_models_keep_the_lesion_mode_override_per_request(models_root, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(models_root))
    models = service.Models()
    assert models.predictor("attention-unet", "single").post.mode == "single"
    assert models.predictor("attention-unet").post.mode == "multiple"  # the shared network is untouched


@pytest.mark.parametrize("data, status, message", [
    (b"", 422, "empty file"),
    (b"just some text\n", 415, "unsupported file type: expected PNG, JPEG, TIFF"),
    (b"<!DOCTYPE html><html><script>alert(1)</script></html>", 415, "unsupported file type"),
    (encode(".png", IMAGE)[:300], 422, "truncated PNG"),
    (encode(".jpg", IMAGE)[:500], 422, "truncated JPEG"),
    (encode(".tif", IMAGE)[:2000], 422, "truncated TIFF"),
    (dicom(GRAY16)[:3000], 422, "DICOM"),
    (encode(".png", np.zeros((1, 1), np.uint8)), 422, "at least 16x16"),
    (bomb_png(30000, 30000), 413, "the limit is 25,000,000"),
    (encode(".tif", np.full((32, 32), np.nan, np.float32)), 422, "NaN or infinite"),
    (encode(".tif", np.full((32, 32), np.inf, np.float32)), 422, "NaN or infinite"),
    (tiff_stack([IMAGE[..., 0]] * 4), 422, "4 pages"),
    (nifti(np.zeros((32, 32, 3), np.int16), AFFINE), 422, "segment it as a volume"),
], ids=["empty", "text", "html", "png-cut", "jpeg-cut", "tiff-cut", "dicom-cut", "1x1", "bomb", "nan", "inf",
        "tiff-stack", "nifti-to-slice"])
def test_bad_slices_get_4xx_saying_why(client, data, status, message):
    r = post(client, data)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize("data, status, message", [
    (encode(".png", IMAGE), 415, "expected a NIfTI volume"),
    (nifti(np.random.default_rng(0).integers(0, 999, (32, 32, 3)).astype(np.int16), AFFINE)[:3000], 422,
     "truncated NIfTI"),
    (nifti(np.zeros((8, 8, 3), np.int16), AFFINE), 422, "at least 16x16"),
])
def test_bad_volumes_get_4xx_saying_why(client, data, status, message):
    r = post(client, data, "v.nii.gz", url="/v1/segment/volume")
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize("model", ["../models/attention-unet", "/etc/passwd", "unet", "attention-unet/../unetpp",
                                   "models/unetpp/model.pt", "BEST"])
def test_only_the_fixed_model_names_are_accepted(client, model):
    r = post(client, encode(".png", IMAGE), model=model)
    assert r.status_code == 422
    assert "query parameter 'model'" in r.json()["detail"] and "'ensemble'" in r.json()["detail"]


def test_over_size_upload_is_refused_declared_or_streamed(client):
    big = bytes(1_100_000)
    r = post(client, big)
    assert r.status_code == 413 and "upload limit of 1 MB" in r.json()["detail"]
    # Without a Content-Length (chunked), the limit is counted as the body arrives.
    r = client.post("/v1/segment", content=iter([big[:600_000], big[600_000:]]),
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]


def test_wrong_field_and_no_multipart_say_what_is_expected(client):
    r = post(client, encode(".png", IMAGE), field="image")
    assert r.status_code == 422 and "multipart form field 'file' is missing" in r.json()["detail"]
    r = client.post("/v1/segment", content=encode(".png", IMAGE), headers={"content-type": "image/png"})
    assert 400 <= r.status_code < 500 and "file" in r.json()["detail"]
    r = client.post("/v1/segment", data={"file": "not a file"})
    assert r.status_code == 422 and "expected a file upload" in r.json()["detail"]


def test_hostile_file_names_are_never_used(client):
    for name in ("../../etc/passwd", "a\x00b\r\nX-Injected: 1.png", "..\\..\\boot.ini", "x" * 2000):
        r = post(client, encode(".png", IMAGE), name=name)
        assert r.status_code == 200 and "x-injected" not in r.headers


def test_missing_models_are_404_not_500(tmp_path, models_root, monkeypatch):
    shutil.copytree(models_root / "attention-unet", tmp_path / "attention-unet")
    monkeypatch.setenv("BRAINMETS_MODELS", str(tmp_path))
    with TestClient(create_app(Settings(preload=False))) as c:
        assert c.get("/health").json()["models"] == ["attention-unet"]
        for model in ("unetpp", "ensemble"):
            r = post(c, encode(".png", IMAGE), model=model)
            assert r.status_code == 404 and "'unetpp' is not installed" in r.json()["detail"]
        assert post(c, encode(".png", IMAGE)).status_code == 200
        (tmp_path / "attention-unet" / "metrics.json").unlink()
        r = post(c, encode(".png", IMAGE), model="best")
        assert r.status_code == 404 and "best" in r.json()["detail"]


def test_busy_server_answers_503_with_retry_after_and_health_stays_fast(models_root, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(models_root))
    release, started = threading.Event(), threading.Event()
    real = service.segment_json

    def slow(*args):
        started.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(service, "segment_json", slow)
    with TestClient(create_app(Settings(workers=1, queue=0, preload=False))) as c:
        first = threading.Thread(target=lambda: results.append(post(c, encode(".png", IMAGE))))
        results: list = []
        first.start()
        assert started.wait(10)
        r = post(c, encode(".png", IMAGE))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        t0 = time.perf_counter()
        assert c.get("/health").status_code == 200
        assert time.perf_counter() - t0 < 0.1
        release.set()
        first.join(10)
        assert results[0].status_code == 200
        assert post(c, encode(".png", IMAGE)).status_code == 200  # the slot came back


def test_pool_times_out_but_holds_the_slot_until_the_work_ends():
    pool = InferencePool(workers=1, queue=0)
    release = threading.Event()

    async def scenario():
        with pytest.raises(Overloaded, match="longer than the limit of 0.05 s"):
            await pool.run(0.05, release.wait, 5)
        with pytest.raises(Overloaded, match="busy"):  # the timed-out work still runs on the only core
            await pool.run(1, lambda: 1)
        release.set()
        await asyncio.sleep(0.05)
        return await pool.run(1, lambda: 42)

    assert asyncio.run(scenario()) == 42
    pool.shutdown()


def test_cors_allows_only_configured_origins(models_root, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(models_root))
    with TestClient(create_app(Settings(cors_origins=["http://localhost:8501"], preload=False))) as c:
        ok = c.get("/health", headers={"Origin": "http://localhost:8501"})
        assert ok.headers["access-control-allow-origin"] == "http://localhost:8501"
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "http://evil.test"}).headers
    with TestClient(create_app(Settings(preload=False))) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "http://localhost:8501"}).headers


def test_openapi_documents_errors_and_examples(client):
    spec = client.get("/openapi.json").json()
    segment = spec["paths"]["/v1/segment"]["post"]
    assert {"200", "404", "413", "415", "422", "503"} <= set(segment["responses"])
    assert "image/png" in segment["responses"]["200"]["content"]
    assert spec["components"]["schemas"]["SegmentResponse"]["properties"]["inference_ms"]["examples"] == [14.2]
    assert "/v1/segment/volume" in spec["paths"] and "/v1/models" in spec["paths"]


@pytest.mark.parametrize("page, assets", [("/docs", ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")),
                                          ("/redoc", ("redoc.standalone.js", "favicon.png"))])
def test_api_docs_load_everything_from_this_server(client, page, assets):
    """Offline networks (hospitals) reach no CDN: every script, style and icon of the docs is served here."""
    html = client.get(page).text
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(urls) == sorted(f"{DOCS_ASSETS}/{name}" for name in assets)
    assert "//" not in html.replace("window.location.origin", "")  # no absolute URL anywhere, fonts included
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 1000, url


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("BRAINMETS_MAX_UPLOAD_MB", "7")
    monkeypatch.setenv("BRAINMETS_CORS_ORIGINS", '["http://a.test"]')
    monkeypatch.setenv("BRAINMETS_THREADS", "1")
    s = Settings()
    assert (s.max_upload_bytes, s.cors_origins, s.threads, s.workers) == (7 * 2**20, ["http://a.test"], 1, 1)
    assert Settings().volume_timeout_s > Settings().request_timeout_s


def test_upload_limit_stops_reading_an_80_mb_body_at_the_limit(models_root, monkeypatch):
    """The ASGI receive side: of 80 chunks of 1 MB without a Content-Length, at most 51 are ever read."""
    monkeypatch.setenv("BRAINMETS_MODELS", str(models_root))
    app = create_app(Settings(preload=False))
    pulled, sent = 0, []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/segment", "raw_path": b"/v1/segment", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=xyz")], "server": ("test", 80),
             "client": ("test", 1)}

    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": (head if pulled == 1 else b"") + bytes(2**20), "more_body": pulled < 80}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and pulled <= 51


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 300), width=st.integers(1, 300), channels=st.sampled_from([0, 1, 3, 4]),
       dtype=st.sampled_from(["uint8", "uint16", "float32"]), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_odd_but_valid_images_get_200_or_4xx_never_5xx(client, height, width, channels, dtype, nan, seed):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels else (height, width)
    image = (rng.random(shape) * (255 if dtype == "uint8" else 60000)).astype(dtype)
    if nan and dtype == "float32":
        image.flat[rng.integers(image.size)] = np.nan
    r = post(client, encode(".tif" if dtype == "float32" else ".png", image))
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        assert (r.json()["height"], r.json()["width"]) == (height, width)
    else:
        assert r.json()["detail"]
