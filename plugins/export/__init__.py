"""Exports of a baked model: sparse kernels where its zeros make it faster, and ONNX.

- :func:`sparse_export`: each Linear-like layer takes the fastest of dense, CSR and BSR, timed on
  its own input; the outputs are checked against the baked model.
- :func:`export_onnx`: an ONNX file with a dynamic batch, checked in onnxruntime.
"""

from plugins.export.onnx import OnnxMismatch, export_onnx
from plugins.export.save import save_sparse_export, write_sparse_export
from plugins.export.sparse import SparseExportMismatch, sparse_export

__all__ = [
    "OnnxMismatch",
    "SparseExportMismatch",
    "export_onnx",
    "save_sparse_export",
    "sparse_export",
    "write_sparse_export",
]
