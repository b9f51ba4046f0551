"""The Celery worker: device pinning, the registry heartbeat, and the training task."""
