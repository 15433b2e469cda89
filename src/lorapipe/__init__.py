"""lorapipe: Stable Diffusion LoRA training as a Kubeflow pipeline."""

from lorapipe.errors import LorapipeError

__version__ = "0.1.0"
__all__ = ["LorapipeError", "__version__"]
