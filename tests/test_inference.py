from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import threading
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.special import expit, logit

from brainmets.config import PostprocessConfig
from brainmets.inference import InputError, Network, Predictor, find_lesions
from brainmets.inputs.readers import read_volume
from brainmets.inputs.study import study_from_volume
from brainmets.study_results import segment_study
from conftest import tiny_config
from samples import brain, nifti


def fake(forward, threshold: float = 0.5, size: int = 64, batch: int | None = None) -> Network:
    """A network whose logits are any function of the preprocessed batch (B, 3, S, S)."""
    cfg = dataclasses.replace(tiny_config(), threshold=threshold)
    cfg = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, image_size=size))
    return Network(cfg, Path("fake.pt"), forward, "fake", batch=batch and (batch, "test"))


def bright(x: np.ndarray) -> np.ndarray:
    """'Lesion' wherever the middle channel is bright: a pixelwise stand-in for a network."""
    return (x[:, 1:2] - 0.5) * 40


def test_lesions_of_a_hand_made_probability_map():
    prob = np.zeros((20, 30), np.float32)
    prob[2:6, 3:8] = 0.9  # 4 x 5 = 20 px
    prob[2:4, 3:5] = 0.7
    prob[10:13, 20:30] = 0.6  # 3 x 10 = 30 px
    mask = prob >= 0.5
    big, small = find_lesions(prob, mask, spacing=(0.5, 2.0))
    assert (big.area_px, big.bbox, big.centroid) == (30, (20, 10, 10, 3), (24.5, 11.0))
    assert big.area_mm2 == pytest.approx(30.0) and big.mean_probability == pytest.approx(0.6)
    assert (small.area_px, small.bbox, small.centroid) == (20, (3, 2, 5, 4), (5.0, 3.5))
    assert small.mean_probability == pytest.approx((16 * 0.9 + 4 * 0.7) / 20)
    assert find_lesions(prob, mask)[0].area_mm2 is None
    assert find_lesions(prob, np.zeros_like(mask)) == []


def test_diagonal_pixels_are_one_lesion():
    mask = np.eye(5, dtype=bool)
    (lesion,) = find_lesions(mask.astype(np.float32), mask)
    assert lesion.area_px == 5


@pytest.mark.parametrize("shape, dtype", [((64, 64, 3), np.uint8), ((48, 80), np.uint8),
                                          ((130, 100, 3), np.uint8), ((90, 70), np.uint16), ((40, 50), np.float32)])
def test_mask_has_the_input_size(shape, dtype, tiny_run):
    predictor = Predictor.load(tiny_run)
    image = (np.random.default_rng(0).random(shape) * (255 if dtype == np.uint8 else 4000)).astype(dtype)
    p = predictor.predict(image)
    assert p.mask.shape == p.probability.shape == shape[:2]
    assert p.mask.dtype == bool and 0 <= p.probability.min() <= p.probability.max() <= 1


def test_mask_is_the_probability_at_the_models_threshold():
    image, _ = brain()
    rng = np.random.default_rng(1)
    ramp = rng.random((1, 1, 64, 64)).astype(np.float32)
    for threshold in (0.3, 0.7):
        p = Predictor([fake(lambda x: np.repeat(logit(ramp), len(x), 0), threshold)], "fake").predict(image)
        np.testing.assert_allclose(p.probability, ramp[0, 0], atol=1e-6)
        np.testing.assert_array_equal(p.mask, ramp[0, 0] >= threshold)
        assert p.lesion_area_px == int((ramp >= threshold).sum()) == sum(les.area_px for les in p.lesions)


def test_spacing_gives_areas_in_mm2():
    image, truth = brain(seed=3)
    p = Predictor([fake(bright)], "fake").predict(image, spacing=(0.5, 0.5))
    assert p.lesion_area_px > 0 and p.lesion_area_mm2 == pytest.approx(p.lesion_area_px * 0.25)
    assert (p.mask & (truth > 0)).sum() / (truth > 0).sum() > 0.8


def test_flip_tta_averages_the_flipped_predictions():
    image, _ = brain()
    ramp = np.linspace(-3, 3, 64, dtype=np.float32)[None, None, None, :].repeat(64, 2)  # rises left to right
    net = fake(lambda x: np.repeat(ramp, len(x), 0))
    plain, tta = (Predictor([net], "fake").predict(image, tta=t).probability for t in (False, True))
    p = expit(ramp[0, 0])
    np.testing.assert_allclose(plain, p, atol=1e-6)
    np.testing.assert_allclose(tta, (2 * p + p[:, ::-1]) / 3, atol=1e-6)  # the vertical flip leaves it as is
    pixelwise = Predictor([fake(bright)], "fake")
    np.testing.assert_allclose(pixelwise.predict(image, tta=True).probability, pixelwise.predict(image).probability,
                               atol=1e-6)


def test_ensemble_averages_probabilities_and_thresholds():
    image, _ = brain()
    low, high = fake(lambda x: np.full((len(x), 1, 64, 64), logit(0.2), np.float32), 0.4), \
        fake(lambda x: np.full((len(x), 1, 64, 64), logit(0.6), np.float32), 0.6)
    ensemble = Predictor([low, high], "ensemble")
    p = ensemble.predict(image)
    assert ensemble.post.threshold == pytest.approx(0.5)
    np.testing.assert_allclose(p.probability, 0.4, atol=1e-6)
    assert not p.mask.any()


@pytest.mark.parametrize("image, message", [
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.zeros((1, 1), np.uint8), "at least 16x16"),
    (np.zeros((8, 300, 3), np.uint8), "at least 16x16"),
    (np.zeros((64, 64, 2), np.uint8), "expected an image of shape"),
])
def test_unusable_images_raise_input_error(image, message):
    with pytest.raises(InputError, match=message):
        Predictor([fake(bright)], "fake").predict(image)


@pytest.mark.parametrize("runtime, precision, atol", [("onnxruntime", "auto", 1e-4), ("openvino", "f32", 1e-4),
                                                      ("openvino", "auto", 0.05)])
def test_exported_runtimes_match_pytorch(models_root, runtime, precision, atol):
    checkpoint = models_root / "attention-unet" / "model.pt"
    served, eager = Network.load(checkpoint, runtime, precision=precision), Network.load(checkpoint, "torch")
    assert (served.runtime, eager.runtime, Network.load(checkpoint).runtime) == (runtime, "torch", "openvino")
    assert served.precision in (("f32",) if precision == "f32" or runtime == "onnxruntime" else ("bf16", "f32"))
    images = [brain(64, seed)[0] for seed in range(3)] + [brain(96, 5)[0]]
    a, b = Predictor([served], "a").probabilities(images, tta=True), Predictor([eager], "b").probabilities(images, tta=True)
    for pa, pb in zip(a, b):
        np.testing.assert_allclose(pa, pb, atol=atol)


def test_openvino_requests_run_from_several_threads_at_once(models_root):
    """The API runs requests in a pool: each thread gets its own infer request, and answers stay right."""
    from concurrent.futures import ThreadPoolExecutor

    net = Network.load(models_root / "attention-unet" / "model.pt", "openvino", precision="f32")
    x = [np.random.default_rng(i).random((2, 3, 64, 64), dtype=np.float32) for i in range(8)]
    alone = [net.forward(v) for v in x]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(net.forward, x))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_stale_onnx_is_never_paired_with_another_checkpoint(models_root, tmp_path):
    for name in ("model.pt", "model.onnx"):
        shutil.copy(models_root / "attention-unet" / name, tmp_path / name)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    ckpt["epoch"] += 1  # retrained: other bytes, same name
    torch.save(ckpt, tmp_path / "model.pt")
    assert Network.load(tmp_path / "model.pt").runtime == "torch"
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ValueError, match="not exported from"):
            Network.load(tmp_path / "model.pt", runtime)
        with pytest.raises(FileNotFoundError, match="brainmets export"):
            Network.load(models_root / "unetpp" / "model.pt", runtime)
    with pytest.raises(ValueError, match="unknown precision"):
        Network.load(tmp_path / "model.pt", precision="fp8")


def test_shipped_names_and_ensemble_resolve_through_the_registry(models_root, monkeypatch):
    monkeypatch.setenv("BRAINMETS_MODELS", str(models_root))
    assert [n.runtime for n in Predictor.load("ensemble").networks] == ["torch", "openvino"]  # unetpp first
    # best: the higher validation Dice (attention-unet), though unetpp has the higher test Dice
    assert Predictor.load("best").networks[0].checkpoint == models_root / "attention-unet" / "model.pt"
    with pytest.raises(FileNotFoundError, match="unknown model"):
        Predictor.load("no-such-model")


def predict_volume(predictor: Predictor, volume):
    """A NIfTI volume through the study path, as every entry point segments one: its mask on the input's grid."""
    return segment_study(predictor, study_from_volume(volume)).on_grid()


@pytest.mark.parametrize("axes", ["RAS", "LPS", "SRA", "PIL"])
def test_volume_mask_lands_on_the_input_grid(axes):
    """A bright off-centre box in a volume stored in any voxel order comes back where it was."""
    ras = np.zeros((64, 64, 6), np.int16)
    ras[10:22, 30:50, 2:4] = 1000
    canonical = nib.Nifti1Image(ras, np.diag([0.9, 0.8, 3.0, 1.0]))
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(axes))
    image = canonical.as_reoriented(ornt)
    assert nib.aff2axcodes(image.affine) == tuple(axes)
    volume = np.asanyarray(image.dataobj)
    truth = (volume > 0).astype(np.uint8)
    result = predict_volume(Predictor([fake(bright)], "fake"), read_volume(nifti(volume, image.affine)))
    np.testing.assert_array_equal(result.mask, truth)
    assert result.lesion_voxels == 12 * 20 * 2
    assert result.lesion_volume_mm3 == pytest.approx(12 * 20 * 2 * 0.9 * 0.8 * 3.0)
    saved = nib.Nifti1Image.from_bytes(gzip.decompress(result.nifti_gz()))
    np.testing.assert_allclose(saved.affine, image.affine)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), truth)
    assert saved.get_data_dtype() == np.uint8


def test_volume_slices_are_shown_as_in_radiology():
    """Anterior up, patient's right on the image's left, as in the training data."""
    volume = np.zeros((64, 64, 1), np.int16)
    volume[-8:, -8:, 0] = 1000  # towards the right (x high) and anterior (y high) in RAS
    seen = []
    net = fake(lambda x: seen.append(x[0, 1]) or bright(x))
    predict_volume(Predictor([net], "fake"), read_volume(nifti(volume, np.eye(4))))
    rows, cols = np.nonzero(seen[0] > 0.5)
    assert rows.max() < 16 and cols.max() < 16  # top-left corner


def test_predict_command_writes_one_mask_per_input_in_kind(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from brainmets.cli import app
    from samples import dicom, encode

    image, _ = brain(80, seed=7)
    volume = np.stack([image[..., 1].T] * 4, axis=2).astype(np.int16)
    files = {"a.png": encode(".png", image), "b.dcm": dicom(image[..., 1].astype(np.uint16)),
             "c.nii.gz": nifti(volume, np.diag([0.9, 0.9, 3.0, 1.0])), "d.txt": b"not an image"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", *(str(tmp_path / n) for n in files), "-m", str(tiny_run),
                                      "--out", str(out), "--tta"])
    assert result.exit_code == 2 and "d.txt: unsupported file type" in result.output  # the others still ran
    for name in ("a.png", "b.png"):
        mask = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (80, 80) and set(np.unique(mask)) <= {0, 255}
    saved = nib.load(out / "c_mask.nii.gz")
    assert saved.shape == volume.shape and np.allclose(saved.affine, np.diag([0.9, 0.9, 3.0, 1.0]))
    assert "mm³" in result.output


def test_three_channel_uint8_volume_gives_a_3d_mask():
    volume = np.zeros((64, 48, 5, 3), np.uint8)
    volume[20:30, 10:20, 1:3, :] = 200
    result = predict_volume(Predictor([fake(bright)], "fake"), read_volume(nifti(volume, np.eye(4))))
    np.testing.assert_array_equal(result.mask, volume[..., 0] > 0)


def test_a_stack_is_segmented_in_one_pass_with_the_3d_rule():
    """Two bright boxes across slices; `single` keeps the bigger 3-D lesion, a lone slice keeps both."""
    slices = []
    for z in range(5):
        image = np.full((64, 64, 3), 40, np.uint8)
        if z < 4:
            image[10:30, 10:30] = 220  # 4 slices x 400 px
        if z == 2:
            image[45:50, 45:50] = 220  # 25 px on one slice
        slices.append(image)
    calls = []
    net = fake(lambda x: calls.append(len(x)) or bright(x))
    net.cfg = net.cfg.with_post(PostprocessConfig(0.5, mode="single"))
    predictor = Predictor([net], "fake")
    stack = predictor.predict_stack(slices)
    assert calls == [5]  # one batch
    assert stack.probability.shape == stack.mask.shape == (5, 64, 64) and stack.mask.dtype == bool
    assert stack.mask.sum() == 1600 and not stack.mask[2, 45:50, 45:50].any()
    assert predictor.predict(slices[2]).mask.sum() == 425  # alone: no 3-D context, both kept
    with pytest.raises(InputError, match="differ in size"):
        predictor.predict_stack([slices[0], slices[1][:32]])
    with pytest.raises(InputError, match="no slices"):
        predictor.predict_stack([])


@pytest.mark.parametrize("precision", ["f32", "auto"])
def test_a_stack_in_batches_gives_the_masks_of_batch_1(models_root, monkeypatch, precision):
    """The tiny exported attention-unet on OpenVINO at the precision served here: every batch size, with and
    without TTA (3x the images, split into the network's batches), gives the masks of one slice at a time."""
    checkpoint = models_root / "attention-unet" / "model.pt"
    slices = [brain(64, seed)[0] for seed in range(11)]
    stacks = {}
    for batch in (1, 4, 16):
        monkeypatch.setenv("BRAINMETS_BATCH", str(batch))
        predictor = Predictor([Network.load(checkpoint, "openvino", precision=precision)], "a")
        assert predictor.chunk == batch
        stacks[batch] = [predictor.predict_stack(slices, tta) for tta in (False, True)]
    for batch in (4, 16):
        for alone, batched in zip(stacks[1], stacks[batch]):
            np.testing.assert_array_equal(batched.mask, alone.mask)
            np.testing.assert_allclose(batched.probability, alone.probability, atol=1e-5 if precision == "f32" else 0.02)
    assert stacks[1][0].mask.any()


def test_preprocessing_overlaps_inference_without_changing_results():
    """Chunks of the ensemble's largest batch (3); each network splits them into its own batches (2 and 3); the
    next chunk is preprocessed in another thread while this one infers; same probabilities as preprocessing
    everything first."""
    slices = [brain(64, seed)[0] for seed in range(8)]
    seen = {"small": [], "large": []}

    def network(name, batch):
        return fake(lambda x: seen[name].append(len(x)) or bright(x), batch=batch)

    predictor = Predictor([network("small", 2), network("large", 3)], "ensemble")
    threads = []
    preprocess = predictor.preprocess
    predictor.preprocess = lambda images: threads.append(threading.current_thread().name) or preprocess(images)
    piped = predictor.probabilities(slices)
    assert seen == {"small": [2, 1, 2, 1, 2], "large": [3, 3, 2]}
    assert len(threads) == 3 and threads[0] == threading.current_thread().name
    assert all(name.startswith("preprocess") for name in threads[1:])
    first = predictor.model_probabilities(preprocess(slices))
    np.testing.assert_array_equal(np.stack(piped), first)


@pytest.mark.parametrize("bad", [0, 7])
def test_an_unusable_slice_in_any_chunk_raises_its_input_error(bad):
    slices = [brain(64, seed)[0] for seed in range(9)]
    slices[bad] = np.full((64, 64), np.nan, np.float32)
    calls = []
    predictor = Predictor([fake(lambda x: calls.append(len(x)) or bright(x), batch=2)], "fake")
    with pytest.raises(InputError, match="image holds NaN or infinite values"):
        predictor.predict_stack(slices)
    assert calls == ([] if bad == 0 else [2, 2, 2])  # the chunks before the bad one were inferred


def test_an_inference_error_surfaces_while_the_next_chunk_is_preprocessed():
    calls = []

    def failing(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("the runtime failed")
        return bright(x)

    with pytest.raises(RuntimeError, match="the runtime failed"):
        Predictor([fake(failing, batch=2)], "fake").predict_stack([brain(64, seed)[0] for seed in range(6)])
    assert calls == [2, 2]


def test_ensemble_uses_its_validation_tuned_rule_and_can_be_best(models_root, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(models_root, root)
    (root / "ensemble").mkdir()
    (root / "ensemble" / "postprocess.json").write_text('{"threshold": 0.35, "min_lesion_px": 0, '
                                                        '"mode": "single", "min_lesion_voxels": 20}')
    (root / "ensemble" / "metrics.json").write_text('{"validation": {"dice_per_patient_mean": 0.65}}')
    monkeypatch.setenv("BRAINMETS_MODELS", str(root))
    best = Predictor.load("best")
    assert best.name == "ensemble" and len(best.networks) == 2
    assert best.post == PostprocessConfig(0.35, 0, "single", 20)
    (root / "unetpp" / "model.pt").unlink()  # one network alone cannot make the ensemble
    assert Predictor.load("best").name == "attention-unet"


def test_lesion_mode_override_takes_the_settings_validation_chose_for_it(models_root, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(models_root, root)
    metrics = json.loads((root / "unetpp" / "metrics.json").read_text())
    metrics["validation_tuning"] = {"modes": {
        "single": {"post": {"threshold": 0.45, "min_lesion_px": 10, "mode": "single", "min_lesion_voxels": 0}},
        "multiple": {"post": {"threshold": 0.7, "min_lesion_px": 10, "mode": "multiple", "min_lesion_voxels": 300}}}}
    (root / "unetpp" / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setenv("BRAINMETS_MODELS", str(root))
    assert Predictor.load("unetpp").post.mode == "multiple"  # its config's
    assert Predictor.load("unetpp", lesion_mode="single").post == PostprocessConfig(0.45, 10, "single", 0)
    # a model never tuned per mode: only the mode changes
    assert Predictor.load("attention-unet", lesion_mode="single").post == PostprocessConfig(0.5, 0, "single", 0)
