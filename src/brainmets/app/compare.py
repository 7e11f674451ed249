"""The Compare view: the shipped models' test metrics (from the API) and the report `brainmets compare`
writes into docs/ (results.md with its training curves, per-patient Dice and example overlays)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import streamlit as st

from brainmets.app.client import ApiError, Client
from brainmets.report import LESION_WISE_NOTE, METRICS, metric_columns

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
TABLE = re.compile(r"(^\|.*\|[ \t]*(\n|$))+", re.MULTILINE)  # a Markdown table: consecutive |...| lines


@st.cache_data(ttl=60, show_spinner=False)
def models_info(api: str) -> list[dict]:
    """GET /v1/models: each installed model's name, input size, threshold and test metrics."""
    return Client(api).models()


def metrics_row(label: str, metrics: dict, columns: list[tuple[str, str]] = METRICS) -> dict:
    return {"model": label, "test patients": metrics.get("patients"),
            **{title: metrics.get(key) for key, title in columns}}


def render(api: str, docs: Path) -> None:
    st.subheader("Test metrics")
    shown = []  # (label, metrics)
    try:
        shown = [(m["name"], m["metrics"]) for m in models_info(api) if m.get("metrics")]
    except ApiError as e:
        st.error(str(e))
    seed = docs / "seed-recipe" / "metrics.json"
    if seed.exists():  # the seed's recipe (Adam, BCE, 50 epochs, whole slices), trained for comparison
        shown.append(("seed recipe", json.loads(seed.read_text())))
    # the lesion-wise columns only where a model's metrics carry them (shipped before: evaluate again to add them)
    columns = metric_columns([m for _, m in shown])
    rows = [metrics_row(label, m, columns) for label, m in shown]
    if rows:
        st.dataframe(rows, hide_index=True, key="metrics-table",
                     column_config={title: st.column_config.NumberColumn(format="%.3f") for _, title in columns})
        caption = "Each model on the test patients of its own split. The About view explains the metrics."
        if len(columns) > len(METRICS):
            caption += " " + LESION_WISE_NOTE + " A model whose metrics.json predates them shows none."
        st.caption(caption)
    else:
        st.info("No model metrics yet: a shipped model carries them in models/<name>/metrics.json.")
    show_report(docs)


def show_report(docs: Path) -> None:
    """docs/results.md as written, its figures drawn where the Markdown names them."""
    results = docs / "results.md"
    if not results.exists():
        st.info("No comparison report yet: `brainmets compare` writes docs/results.md with the training "
                "curves, the per-patient Dice distribution and example overlays.")
        for png in sorted(docs.glob("results-*.png")):
            st.image(str(png), caption=png.stem)
        return
    # Its metrics table is the one shown above, with the models' numbers from the API: once is enough.
    text, start = TABLE.sub("", results.read_text(), count=1), 0
    for match in IMAGE.finditer(text):
        st.markdown(text[start:match.start()])
        figure = docs / match.group(2)
        if figure.exists():
            st.image(str(figure), caption=match.group(1))
        else:
            st.warning(f"{results} names {match.group(2)}, which is missing: rerun `brainmets compare`.")
        start = match.end()
    st.markdown(text[start:])
