"""The brainmets page, a Streamlit script: `brainmets app` runs it with `streamlit run`.

It reaches the backend only over HTTP (client.py), at $BRAINMETS_API; the Compare view reads the report
in $BRAINMETS_DOCS (default: the repository's docs/).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from brainmets.app import about, compare, pacs, segment, study_view
from brainmets.app.client import DEFAULT_API, ApiError, Client

API = os.environ.get("BRAINMETS_API", DEFAULT_API).rstrip("/")
DOCS = Path(os.environ.get("BRAINMETS_DOCS", Path(__file__).resolve().parents[3] / "docs"))

st.set_page_config(page_title="brainmets: brain lesion segmentation", layout="wide")
st.title("brainmets")
st.caption("Brain lesion segmentation in MRI slices with U-Net++ and Attention U-Net. "
           "Research use only: not a medical device.")

with st.sidebar:
    st.markdown(f"**API** `{API}`")
    try:
        st.success(f"Connected; models: {', '.join(Client(API).health()['models']) or 'none'}")
    except ApiError as e:
        st.error(str(e))

segment_tab, study_tab, compare_tab, pacs_tab, about_tab = st.tabs(["Segment", "Study", "Compare", "PACS", "About"])
with segment_tab:
    segment.render(API)
with study_tab:
    study_view.render(API)
with compare_tab:
    compare.render(API, DOCS)
with pacs_tab:
    pacs.render(API)
with about_tab:
    about.render(API)
