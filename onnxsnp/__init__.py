"""onnxsnp: SNP (Structured Neuron-level Pruning) for exported ONNX transformers."""
from .errors import SnpError
from .pipeline import prune

__all__ = ["prune", "SnpError"]
__version__ = "0.1.0"
