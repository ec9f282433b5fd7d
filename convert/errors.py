"""The one exception type the converter raises for bad or unsupported input."""


class ConversionError(ValueError):
    """A `.nemo` cannot be converted: unsafe, corrupt, or using a value the MLX model does not implement."""
