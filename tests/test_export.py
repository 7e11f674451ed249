from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch

from brainmets import export as export_module
from brainmets.checkpoints import file_sha256, load_checkpoint, model_from_checkpoint
from brainmets.config import TrainConfig
from brainmets.export import TOLERANCE, export_onnx, max_abs_diff
from brainmets.inference import ONNX_SHA_KEY, Network, onnx_session


def test_exported_graph_is_checked_tagged_and_shape_free(models_root):
    folder = models_root / "attention-unet"
    graph = onnx.load(folder / "model.onnx")
    assert dict((p.key, p.value) for p in graph.metadata_props)[ONNX_SHA_KEY] == file_sha256(folder / "model.pt")
    (image,), (logits,) = graph.graph.input, graph.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert TrainConfig.load(folder / "config.json") == model_from_checkpoint(load_checkpoint(folder / "model.pt"))[1]
    session = onnx_session(folder / "model.onnx")
    out = session.run(None, {"image": np.random.default_rng(0).random((3, 3, 32, 48), dtype=np.float32)})[0]
    assert out.shape == (3, 1, 32, 48)


@pytest.mark.slow
def test_unetpp_exports_and_matches_pytorch(models_root, tmp_path):
    shutil.copy(models_root / "unetpp" / "model.pt", tmp_path / "model.pt")
    result = export_onnx(tmp_path / "model.pt")
    assert result.onnx == tmp_path / "model.onnx" and result.config == tmp_path / "config.json"
    assert result.max_abs_diff <= TOLERANCE
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "model.pt"))
    assert max_abs_diff(model, result.onnx, [(8, 64, 64), (1, 128, 96)]) <= TOLERANCE


@pytest.mark.slow
def test_a_mismatch_leaves_no_file_behind(models_root, tmp_path, monkeypatch):
    shutil.copy(models_root / "attention-unet" / "model.pt", tmp_path / "best.pt")
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # any difference at all is now too much
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(tmp_path / "best.pt", tmp_path / "out" / "net.onnx")
    assert not list((tmp_path / "out").iterdir())


def test_eager_and_exported_agree_on_a_trained_model(models_root):
    model, _ = model_from_checkpoint(load_checkpoint(models_root / "attention-unet" / "model.pt"))
    with torch.inference_mode():
        assert max_abs_diff(model, models_root / "attention-unet" / "model.onnx", [(2, 64, 64)]) <= TOLERANCE


def test_openvino_answers_threads_at_once(models_root):
    """Threads inferring at once at different batch sizes (each one a reshape, where OpenVINO deadlocked without
    the process's inference lock) all finish, with the answers one thread gets."""
    net = Network.load(models_root / "attention-unet" / "model.pt", "openvino", threads=1)
    size = net.cfg.preprocess.image_size
    rng = np.random.default_rng(0)
    batches = [rng.random((b, 3, size, size), dtype=np.float32) for b in (1, 3, 2, 1, 3, 2)]
    expected = [net.forward(x) for x in batches]
    pool = ThreadPoolExecutor(len(batches))
    try:
        got = [f.result(timeout=120) for f in [pool.submit(net.forward, x) for x in batches]]
    finally:
        pool.shutdown(wait=False)
    for answer, alone in zip(got, expected):
        np.testing.assert_allclose(answer, alone, atol=1e-5)
