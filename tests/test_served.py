"""Measured = served: on real slices, the shipped models give the same probabilities and masks through
`brainmets evaluate` (cached preprocessing), the engine on raw files (`brainmets predict`) and the API."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from brainmets.cache import preprocessed
from brainmets.data import open_dataset
from brainmets.evaluation import engine_probabilities, evaluate
from brainmets.inference import Predictor
from brainmets.postprocessing import mask_slice
from brainmets.registry import models_dir
from conftest import MAKE_DATA_ZIP, api_client

MODELS = models_dir()


@pytest.fixture(scope="module")
def two_test_patients(real_data, tmp_path_factory):
    """A Data.zip of two of the shipped models' test patients, the smallest ones (fast)."""
    test = json.loads((MODELS / "unetpp" / "split.json").read_text())["test"]
    sizes = {p: len(list((real_data / p).glob("*_mask.png"))) for p in test if (real_data / p).is_dir()}
    if len(sizes) < 2:
        pytest.skip(f"the shipped models' test patients are not in {real_data}")
    patients = sorted(sizes, key=sizes.get)[:2]
    out = tmp_path_factory.mktemp("served") / "Data.zip"
    subprocess.run([sys.executable, str(MAKE_DATA_ZIP), str(out), *patients], check=True, capture_output=True)
    return out, patients


@pytest.fixture(scope="module")
def client():
    yield from api_client(MODELS, threads=1)


@pytest.mark.parametrize("name", ["unetpp", "attention-unet", "ensemble"])
def test_evaluate_predict_and_the_api_agree_exactly(two_test_patients, client, name):
    data, patients = two_test_patients
    dataset = open_dataset(data)
    predictor = Predictor.load(name)
    arrays = preprocessed(dataset, predictor.preprocess_cfg, progress=False)
    measured = engine_probabilities(predictor, arrays, patients)  # what `evaluate` scores
    raw = [dataset.read_image(s) for p in patients for s in dataset.patients[p]]
    served = np.stack(predictor.probabilities(raw))  # what `predict` and the API compute from files
    np.testing.assert_array_equal(measured, served)
    # a patient's stack: evaluate's masks are the engine's predict_stack masks
    first = len(dataset.patients[patients[0]])
    stack = predictor.predict_stack(raw[:first])
    np.testing.assert_array_equal(predictor.mask_stack(measured[:first]), stack.mask)
    report = evaluate(predictor, arrays, patients[:1])
    truth = np.stack([dataset.read_mask(s) for s in dataset.patients[patients[0]]]).astype(bool)
    assert report["per_patient"][0]["dice"] == pytest.approx(
        2 * (stack.mask & truth).sum() / max(stack.mask.sum() + truth.sum(), 1) if truth.any() or stack.mask.any() else 1.0)
    # lone slices through the API: the mask the engine's 2-D rule makes of evaluate's probabilities
    lesion = max(range(len(raw)), key=lambda i: (measured[i] >= predictor.post.threshold).sum())
    for i in (lesion, 0):
        ok, tiff = cv2.imencode(".tif", np.ascontiguousarray(raw[i][..., ::-1]))
        r = client.post("/v1/segment", params={"model": name}, files={"file": ("s.tif", tiff.tobytes(), "image/tiff")})
        assert r.status_code == 200, r.text
        mask = cv2.imdecode(np.frombuffer(base64.b64decode(r.json()["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED) > 0
        np.testing.assert_array_equal(mask, mask_slice(measured[i], predictor.post))
    assert mask_slice(measured[lesion], predictor.post).any()


def test_bf16_masks_agree_with_float32(two_test_patients):
    """OpenVINO bf16 (what `auto` serves where it measures faster) against f32 on real slices: Dice ≥ 0.99."""
    data, patients = two_test_patients
    dataset = open_dataset(data)
    bf16, f32 = Predictor.load("unetpp", "openvino", precision="bf16"), Predictor.load("unetpp", "openvino", precision="f32")
    arrays = preprocessed(dataset, f32.preprocess_cfg, progress=False)
    a, b = (p.mask_stack(engine_probabilities(p, arrays, patients[:1])) for p in (bf16, f32))
    assert (bf16.networks[0].precision, f32.networks[0].precision) == ("bf16", "f32")
    overlap = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    assert overlap >= 0.99 or not (a.any() or b.any())
