"""edgepack: fold, quantize and export Hugging Face decoder LLMs to small, fast ONNX artifacts."""

__version__ = "0.1.0"

from edgepack.errors import EdgepackError  # noqa: E402

__all__ = ["EdgepackError", "__version__"]
