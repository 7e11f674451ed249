"""One shared tester for both networks: shapes, deep supervision, width checks, learning, every width used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmets.config import ModelConfig
from brainmets.models import UNetPlusPlus, build_model, check_input, count_parameters
from conftest import synthetic_slice

TINY = {"attention-unet": (4, 8, 16), "unetpp": (4, 4, 8, 8, 16, 4)}
# Five levels as shipped (four poolings), still small enough to run in a blink.
FIVE_LEVELS = {"attention-unet": (4, 4, 8, 8, 16), "unetpp": (4, 4, 8, 8, 16, 4)}
NAMES = list(TINY)


def tiny(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, widths=kw.pop("widths", TINY[name]), **kw)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("widths", ["tiny", "five"])
def test_shape_in_and_out(name, widths):
    model = build_model(tiny(name, widths=(TINY if widths == "tiny" else FIVE_LEVELS)[name]))
    for mode in (model.train, model.eval):
        mode()
        out = model(torch.rand(2, 3, 64, 64))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    model.eval()
    assert model(torch.rand(1, 3, 32, 48)).shape == (1, 1, 32, 48)  # fully convolutional


def test_deep_supervision_list_only_in_training():
    model = build_model(tiny("unetpp", deep_supervision=True))
    assert isinstance(model, UNetPlusPlus)
    model.train()
    outs = model(torch.rand(2, 3, 64, 64))
    assert isinstance(outs, list) and len(outs) == 4
    assert all(o.shape == (2, 1, 64, 64) for o in outs)
    model.eval()
    with torch.no_grad():
        final = model(torch.rand(2, 3, 64, 64))
    assert isinstance(final, torch.Tensor) and final.shape == (2, 1, 64, 64)
    # eval returns the finest output, the last of the training list
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model.train()
        last = model(x)[-1]
        model.eval()
        torch.testing.assert_close(model(x), last)


def test_deep_supervision_is_unetpp_only():
    with pytest.raises(ValueError, match="deep supervision.*unetpp"):
        ModelConfig(name="attention-unet", widths=TINY["attention-unet"], deep_supervision=True)


@pytest.mark.parametrize("name, widths", [("unetpp", (4, 8, 16, 32, 64)), ("unetpp", (4,) * 7), ("unetpp", ()),
                                          ("attention-unet", (8,)), ("attention-unet", ())])
def test_wrong_widths_raise(name, widths):
    with pytest.raises(ValueError, match=f"{name} needs"):
        build_model(ModelConfig(name=name, widths=widths))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="expected one of unetpp, attention-unet"):
        ModelConfig(name="unet")


def synthetic_batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    pairs = [synthetic_slice(rng, 64) for _ in range(n)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.float32) / 255)
    return x, y


@pytest.mark.parametrize("name, deep_supervision", [("attention-unet", False), ("unetpp", False),
                                                    ("unetpp", True)])
def test_each_network_learns_a_synthetic_batch(name, deep_supervision):
    model = build_model(tiny(name, deep_supervision=deep_supervision)).train()
    x, y = synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def loss_of(out):
        outs = out if isinstance(out, list) else [out]
        return sum(loss_fn(o, y) for o in outs) / len(outs)

    losses = []
    for _ in range(15):
        loss = loss_of(model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        pred = torch.sigmoid(model(x)) > 0.5
    # the bright ellipses are found: far better overlap than predicting nothing
    tp = (pred & (y > 0)).sum().item()
    assert 2 * tp / (pred.sum().item() + (y > 0).sum().item()) > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_every_width_changes_the_network(name):
    """A width that is stored but unused would leave the parameter count unchanged."""
    base = FIVE_LEVELS[name]
    n = count_parameters(build_model(ModelConfig(name=name, widths=base)))
    for i in range(len(base)):
        widths = tuple(w + 4 if j == i else w for j, w in enumerate(base))
        assert count_parameters(build_model(ModelConfig(name=name, widths=widths))) != n, f"width {i} unused"


def test_more_levels_add_parameters():
    counts = [count_parameters(build_model(ModelConfig(name="attention-unet", widths=(4, 8, 16, 32)[:k])))
              for k in (2, 3, 4)]
    assert counts == sorted(counts) and len(set(counts)) == 3


def test_check_input():
    check_input(torch.zeros(1, 3, 64, 48))
    for bad in (torch.zeros(1, 3, 60, 64), torch.zeros(3, 64, 64), torch.zeros(1, 3, 64, 72)):
        with pytest.raises(ValueError, match="multiples of 16"):
            check_input(bad)
