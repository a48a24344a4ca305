"""The Tuneloop trainer: the container entry point that fine-tunes a model from a FineTuneJob.

The same code runs inside the trainer pod and under ``tuneloop run`` on a laptop.
"""
