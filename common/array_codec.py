"""Reading a tensor that arrived over the wire, whoever sent it.

Flower's ``Array.numpy()`` hands the bytes to ``np.load``, which also opens ``.npz`` archives (and returns an
archive object, not an array): a peer could then make the receiver fail on an attribute it expects. Here a
tensor is read only when its bytes are one plain ``.npy`` array whose dtype and shape are the ones the
``Array``'s metadata declares; anything else is a :class:`ValueError` naming the tensor.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file (an .npz archive starts "PK")
NUMPY_STYPE = "numpy.ndarray"  # Flower's SType.NUMPY


def decode_array(array: Any, name: str = "tensor") -> np.ndarray:
    """The ndarray a Flower ``Array`` carries, or a ValueError saying why it is not one plain ``.npy`` tensor
    of its declared dtype and shape (never pickled objects: ``allow_pickle`` stays off)."""
    stype, data = getattr(array, "stype", None), getattr(array, "data", None)
    if stype != NUMPY_STYPE or not isinstance(data, bytes):
        raise ValueError(f"{name}: not a NumPy tensor (serialisation {str(stype)[:40]!r})")
    if not data.startswith(NPY_MAGIC):
        raise ValueError(f"{name}: its bytes are not one .npy array")
    try:
        value = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any malformed header or body is the same refusal
        raise ValueError(f"{name}: unreadable .npy bytes ({type(exc).__name__})") from None
    declared_shape = tuple(int(d) for d in getattr(array, "shape", ()))
    if not isinstance(value, np.ndarray) or str(value.dtype) != str(getattr(array, "dtype", "")) \
            or tuple(value.shape) != declared_shape:
        raise ValueError(f"{name}: the bytes hold {getattr(value, 'dtype', '?')} {getattr(value, 'shape', '?')}, "
                         f"not the declared {str(getattr(array, 'dtype', ''))[:20]} {declared_shape}")
    return value
