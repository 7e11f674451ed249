"""The real thing: `brainmets serve` (uvicorn) in a subprocess on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest

from conftest import api_process
from samples import brain, dicom, encode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    with api_process(models_root, tmp_path_factory.mktemp("server"), BRAINMETS_MAX_UPLOAD_MB="2") as started:
        yield started


def test_segments_a_slice_over_http(server):
    server, _ = server
    image, _ = brain(96, seed=4)
    r = httpx.post(f"{server}/v1/segment", files={"file": ("slice.png", encode(".png", image))}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["model"]) == (96, 96, "attention-unet")
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 96)
    assert "server" not in r.headers  # nothing about the software behind it


def test_dicom_and_png_output_over_http(server):
    server, _ = server
    image, _ = brain(64, seed=5)
    r = httpx.post(f"{server}/v1/segment", params={"format": "png"},
                   files={"file": ("x.dcm", dicom(image[..., 1].astype(np.uint16) * 16))}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def peak_rss_mb(process: subprocess.Popen, reset: bool = False) -> float:
    """The process's peak resident memory so far; `reset` starts a new peak from the current size."""
    if reset:
        with open(f"/proc/{process.pid}/clear_refs", "w") as f:
            f.write("5")
    status = open(f"/proc/{process.pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's peak memory from /proc")
def test_oversize_upload_is_refused_without_holding_it_in_memory(server):
    """An 80 MB chunked body against a 2 MB limit: 413, and the server's peak memory barely moves."""
    url, process = server

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(80):
            yield bytes(2**20)

    before = peak_rss_mb(process, reset=True)
    try:
        r = httpx.post(f"{url}/v1/segment", content=body(), timeout=30,
                       headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "upload limit of 2 MB" in r.json()["detail"]
    except httpx.TransportError:
        pass  # the server may close the connection before the client has read its 413
    assert peak_rss_mb(process) - before < 20
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_sixteen_concurrent_clients_and_health_answers_meanwhile(server):
    server, _ = server
    data = encode(".png", brain(64, seed=6)[0])
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client.post, f"{server}/v1/segment", files={"file": ("s.png", data)}, params={"tta": "true"})
                   for _ in range(48)]
        health = []
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert client.get(f"{server}/health").status_code == 200
            health.append(time.perf_counter() - t0)
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * 48
    # Generous bound: these cores are shared with whatever else the test machine runs.
    assert health and max(health) < 1.0
