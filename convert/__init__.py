"""Convert NeMo Canary `.nemo` checkpoints into MLX model directories, without PyTorch."""

from model.blas import preload_openblas

preload_openblas()
