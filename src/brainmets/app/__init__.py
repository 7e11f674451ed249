"""The Streamlit page: page.py (the script), one module per view, client.py (its only link to the API)."""
