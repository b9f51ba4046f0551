"""The core of gradstream: specs, training, the Redis store and the queue. Imports nothing from api/ or worker/."""
