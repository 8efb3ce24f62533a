"""User-level central DP: the clipped update never exceeds the sensitivity the accountant assumes."""

from __future__ import annotations

import numpy as np

from server.central_dp import clip_update


def test_no_clipped_update_exceeds_the_clip_even_by_float32_rounding():
    """Scaling float32 tensors by a factor computed for the exact norm overshoots the clip by about
    1e-7 of it in about half the cases; the accountant's sensitivity must hold exactly."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        update = [rng.normal(size=(96, 32)).astype(np.float32) * (1 + trial % 7),
                  rng.normal(size=1682).astype(np.float32)]
        for clip in (0.5, 1.0, 10.0):
            clipped, norm = clip_update(update, clip)
            exact = float(np.sqrt(sum(float(np.sum(np.square(c, dtype=np.float64))) for c in clipped)))
            assert exact <= clip and all(c.dtype == np.float32 for c in clipped)
            assert exact >= clip * (1 - 1e-5)  # clipped to the bound, not far below it
    small = [np.full(4, 0.1, dtype=np.float32)]
    assert clip_update(small, 1.0)[0][0].tolist() == small[0].tolist()  # within the bound: unchanged
