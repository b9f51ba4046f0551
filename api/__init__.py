"""The HTTP API (FastAPI). Never imports torch or the worker."""
