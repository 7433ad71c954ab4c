"""minivlm: a from-scratch PyTorch reference implementation of the LLaVA family of vision-language models.

The public surface is what this module exports; everything else is internal.
"""

from .checkpoint import CheckpointError
from .config import ConfigError
from .generation import GenerationError, generate, stream
from .load import load_model, load_processor
from .processing.processor import ProcessorError
from .training.loss import loss

__version__ = "0.1.0"
__all__ = [
    "load_model",
    "load_processor",
    "generate",
    "stream",
    "loss",
    "CheckpointError",
    "ConfigError",
    "ProcessorError",
    "GenerationError",
    "__version__",
]
