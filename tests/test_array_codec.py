"""A tensor from the wire is read only when its bytes are one plain .npy of its declared dtype and shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from common.array_codec import decode_array


def _with_bytes(honest: Array, data: bytes, **changes) -> Array:
    fields = {"dtype": honest.dtype, "shape": tuple(honest.shape), "stype": honest.stype, "data": data, **changes}
    return Array(**fields)


def test_an_honest_tensor_round_trips_and_every_mismatch_is_refused_naming_the_tensor():
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    honest = Array(value)
    np.testing.assert_array_equal(decode_array(honest, "w"), value)
    archive = io.BytesIO()
    np.savez(archive, x=value)
    pickled = io.BytesIO()
    np.save(pickled, np.array([1, None], dtype=object), allow_pickle=True)
    cases = {
        "npz archive": (_with_bytes(honest, archive.getvalue()), "not one .npy array"),
        "other dtype declared": (_with_bytes(honest, honest.data, dtype="float64"), "not the declared float64"),
        "other shape declared": (_with_bytes(honest, honest.data, shape=(3, 2)), r"not the declared float32 \(3, 2\)"),
        "truncated": (_with_bytes(honest, honest.data[:20]), "unreadable .npy bytes"),
        "pickled objects": (_with_bytes(honest, pickled.getvalue(), dtype="object", shape=(2,)),
                            "unreadable .npy bytes"),
        "another serialisation": (_with_bytes(honest, honest.data, stype="torch"), "not a NumPy tensor"),
    }
    for label, (array, message) in cases.items():
        with pytest.raises(ValueError, match=f"^w: .*{message}") as info:
            decode_array(array, "w")
        assert info.type is ValueError, label
