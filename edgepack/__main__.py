import sys
from pathlib import Path

# `python -m edgepack` puts the working directory first on sys.path. Run from a source checkout, that makes the
# checkout's root folders importable as top-level packages, and `kernels/` then shadows the Hugging Face `kernels`
# distribution that transformers >= 5.25 imports ("cannot import name 'CUDAProperties' from 'kernels'"). edgepack
# itself is already imported, and its subpackages resolve through the installed package-dir mapping, so the
# checkout's root is dropped from the path before anything else is imported.
_checkout = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _checkout]

from edgepack.cli import main  # noqa: E402

main()
