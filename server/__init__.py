"""OpenAI-compatible HTTP server for Canary models."""

from model.blas import preload_openblas

preload_openblas()
