"""The core of gradstream: specs, training, store, queue. Imports nothing from api/ or worker/."""
