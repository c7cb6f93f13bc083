"""tinypalm: the PaLM architecture with every forward and backward pass written by hand on NumPy or CuPy."""

from .config import Config
from .errors import TinyPalmError
from .model import PaLM

__all__ = ["Config", "PaLM", "TinyPalmError"]
__version__ = "0.1.0"
