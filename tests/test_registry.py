"""One registry of model names: the command line, the API's schema, the page and the networks all derive from it."""

from __future__ import annotations

from typer.testing import CliRunner

from brainmets.api.main import create_app
from brainmets.api.settings import Settings
from brainmets.app.segment import MODES
from brainmets.cli import app
from brainmets.config import MODEL_NAMES, NETWORKS, make_config
from brainmets.models import BUILDERS, count_parameters
from brainmets.registry import CHOICES, SHIPPED, title


def test_names_in_one_place():
    assert MODEL_NAMES == SHIPPED == ("unetpp", "attention-unet")  # the ensemble's order: U-Net++ first
    assert CHOICES == ("best", "unetpp", "attention-unet", "ensemble")
    assert set(BUILDERS) == set(NETWORKS)


def test_every_registered_network_builds_with_its_default_widths():
    for name in MODEL_NAMES:
        cfg = make_config(name)
        assert cfg.model.widths == NETWORKS[name].widths
        assert count_parameters(BUILDERS[name](cfg.model)) > 0


def test_api_schema_offers_exactly_the_registry_choices():
    schema = create_app(Settings(preload=False)).openapi()
    params = schema["paths"]["/v1/segment"]["post"]["parameters"]
    model = next(p for p in params if p["name"] == "model")
    enum = schema["components"]["schemas"][model["schema"]["$ref"].split("/")[-1]]["enum"]
    assert enum == list(CHOICES)


def test_cli_offers_the_registry_names():
    bad = CliRunner().invoke(app, ["train", "--model", "unet", "--data", ".", "--out", "x"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "'unet' is not one of 'unetpp', 'attention-unet'" in bad.output
    predict_help = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    assert "best, unetpp, attention-unet, ensemble, a .pt checkpoint" in predict_help


def test_page_choices_and_titles_derive_from_the_registry():
    assert MODES == {"best": ("best",), "U-Net++": ("unetpp",), "Attention U-Net": ("attention-unet",),
                     "both side by side": SHIPPED, "ensemble": ("ensemble",)}
    assert title("ensemble") == "Ensemble (mean of U-Net++ and Attention U-Net)"
    assert title("/some/run/best.pt") == "/some/run/best.pt"
