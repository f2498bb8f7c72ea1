"""Load the community's `.pkl` interaction matrices without running arbitrary code.

A pickle can name any importable callable; this unpickler resolves only the
classes that make up scipy sparse matrices and numpy arrays and refuses the rest.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from spark_jobs.errors import PrepareError

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "matrix"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 (pickle.HIGHEST_PROTOCOL) rebuilds arrays from an out-of-band buffer.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    # Protocols 0 to 2: objects rebuilt by copyreg (its classes resolved here too), bytes written as text.
    ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"),
    ("builtins", "object"),
    ("__builtin__", "object"),
    ("builtins", "dict"),  # a dok_matrix is a dict
    ("__builtin__", "dict"),
    ("_codecs", "encode"),
}
_SPARSE_FORMATS = ("coo", "csr", "csc", "lil", "dok", "bsr", "dia")
_SPARSE_MODULES = {f"scipy.sparse{sep}{kind}" for kind in _SPARSE_FORMATS for sep in ("._", ".")}
_SPARSE_CLASSES = {f"{kind}_{shape}" for kind in _SPARSE_FORMATS for shape in ("matrix", "array")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module in _SPARSE_MODULES and name in _SPARSE_CLASSES):
            return super().find_class(module, name)
        raise PrepareError(
            f"{self.source}: refusing to unpickle {module}.{name}; only scipy sparse matrices and numpy arrays are accepted "
            "(a matrix saved otherwise: re-save it with pickle.dump(scipy.sparse.coo_matrix(m), file))"
        )


def load_matrix(path: str | Path) -> sp.coo_matrix:
    """A 2-D interaction matrix (users x items) from a pickle of a scipy sparse matrix or numpy array."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: file not found")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
    except PrepareError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise PrepareError(f"{path}: not a readable pickle of a sparse matrix ({type(err).__name__}: {err})") from err
    if not isinstance(obj, np.ndarray) and not sp.issparse(obj):
        raise PrepareError(f"{path}: expected a scipy sparse matrix or numpy array, got {type(obj).__name__}")
    if obj.dtype.kind not in "biuf":  # strings or objects: scipy would raise, or read them as something else
        raise PrepareError(f"{path}: expected a numeric users x items matrix, got dtype {obj.dtype}")
    if isinstance(obj, np.ndarray) and obj.ndim != 2:
        raise PrepareError(f"{path}: expected a 2-D users x items array, got shape {obj.shape}")
    matrix = sp.coo_matrix(obj)
    bad = ~np.isfinite(matrix.data) | (matrix.data < 0)
    if bad.any():  # a negative or missing value is no interaction, and every stored value but 0 would count as one
        first = np.flatnonzero(bad)[0]
        raise PrepareError(f"{path}: {int(bad.sum())} entries are negative or not finite (first: row {matrix.row[first]}, "
                           f"column {matrix.col[first]}, value {matrix.data[first]}); expected interactions as positive "
                           "values (any positive value is one interaction) and 0 or no entry elsewhere")
    return matrix
