"""onnxsnp: SNP (Structured Neuron-level Pruning) for exported ONNX transformers."""
from .errors import SnpError

__all__ = ["prune", "SnpError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `prune` pulls in onnx and onnxruntime; loading them lazily lets `python -m onnxsnp`
    # install its signal handling before the heavy imports
    if name == "prune":
        from .pipeline import prune

        return prune
    raise AttributeError(f"module 'onnxsnp' has no attribute {name!r}")
