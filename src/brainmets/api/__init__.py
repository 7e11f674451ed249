"""The HTTP API: `brainmets serve`, or `uvicorn brainmets.api.main:app`. See main.py for the layout."""
