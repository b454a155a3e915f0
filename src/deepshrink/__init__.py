"""deepshrink: make trained PyTorch models small and fast, and say honestly what it cost."""

# The formats and families register their file loaders and edit replayers where they are
# defined; importing them here makes registration happen on `import deepshrink`.
from deepshrink import dsz as dsz
from deepshrink import pruning as pruning
from deepshrink import quantization as quantization
from deepshrink.checkpoint import load, read_metadata, save
from deepshrink.errors import ConfigError, DataError, DeepShrinkError, FormatError, ModelError
from deepshrink.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "DeepShrinkError",
    "FormatError",
    "ModelError",
    "__version__",
    "create_model",
    "list_models",
    "load",
    "read_metadata",
    "save",
]
