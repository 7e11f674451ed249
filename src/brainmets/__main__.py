from brainmets.cli import app

app()
