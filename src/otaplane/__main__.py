from otaplane.cli import app

app()
