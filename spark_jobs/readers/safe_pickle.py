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
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
_SPARSE_MODULES = ("scipy.sparse._coo", "scipy.sparse._csr", "scipy.sparse._csc", "scipy.sparse.coo", "scipy.sparse.csr", "scipy.sparse.csc")
_SPARSE_CLASSES = {"coo_matrix", "csr_matrix", "csc_matrix", "coo_array", "csr_array", "csc_array"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module in _SPARSE_MODULES and name in _SPARSE_CLASSES):
            return super().find_class(module, name)
        raise PrepareError(
            f"{self.source}: refusing to unpickle {module}.{name}; only scipy sparse matrices and numpy arrays are accepted"
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
    if isinstance(obj, np.ndarray):
        if obj.ndim != 2:
            raise PrepareError(f"{path}: expected a 2-D users x items array, got shape {obj.shape}")
        obj = sp.coo_matrix(obj)
    if not sp.issparse(obj):
        raise PrepareError(f"{path}: expected a scipy sparse matrix or numpy array, got {type(obj).__name__}")
    return sp.coo_matrix(obj)
