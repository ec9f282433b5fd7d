"""MLX implementation of NVIDIA Canary (EncDecMultiTaskModel)."""

from model.blas import preload_openblas

preload_openblas()
