"""Exporting models to ONNX, TorchScript and bioimage.io packages (``biosam export``).

The submodules import onnx / onnxruntime only inside their functions; :func:`export` is the entry point.
"""

from biosam.export.api import FORMATS, export

__all__ = ["FORMATS", "export"]
