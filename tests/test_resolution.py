"""Resolution marching counted in measured pixels (geometry/resolution.py, issue 13 item 7)."""

from __future__ import annotations

import numpy as np
import pytest

from spinifel.geometry import detector as det
from spinifel.geometry.resolution import matching_cutoff, matching_fraction


def _s(n: int = 64, pixel: float = 2e-3, energy: float = 4600.0) -> np.ndarray:
    pos = det.flat_detector_positions(n, pixel, 0.2, det.photon_energy_to_wavelength(energy))
    return np.linalg.norm(pos[0], axis=-1).ravel()


def test_fraction_is_todays_ramp():
    """Catches a changed ramp: 0.4 at generation 1, linear to 1 at generation `ramp`."""
    assert matching_fraction(1, 0.4, 6) == pytest.approx(0.4)
    assert matching_fraction(3, 0.4, 6) == pytest.approx(0.4 + 0.6 * 2 / 5)
    assert matching_fraction(6, 0.4, 6) == 1.0 and matching_fraction(9, 0.4, 6) == 1.0
    assert matching_fraction(1, 0.4, 1) == 1.0


def test_no_mask_selects_exactly_todays_pixels():
    """Catches a rule that changes today's selection on an unmasked detector (e.g. starting
    from min|s| + fraction (max - min), which shifts every cutoff by about a pixel)."""
    s = _s()
    for g in range(1, 8):
        today = s <= matching_fraction(g, 0.4, 6) * s.max()
        new = s <= matching_cutoff(g, s, s, start=0.4, ramp=6)
        assert np.array_equal(today, new), g


def test_large_beamstop_keeps_the_pixel_count():
    """Catches the thin ring: with a beamstop of radius 14 pixels, generation 1 must match on
    as many pixels as an unmasked detector (896 of 4096), the innermost good ones; today's
    rule gives 280."""
    s = _s()
    good = det.beamstop_mask(64, 14.0)[0].ravel().astype(bool)
    sg = s[good]
    n_unmasked = int(np.count_nonzero(s <= 0.4 * s.max()))
    cut = matching_cutoff(1, sg, s, start=0.4, ramp=6)
    sel = sg <= cut
    assert sel.sum() == n_unmasked == 896
    # The innermost good pixels: everything selected lies below everything left out.
    assert sg[sel].max() < sg[~sel].min()
    # Control: today's rule on the same mask.
    assert np.count_nonzero(sg <= 0.4 * sg.max()) == 280
    # Later generations grow (until every good pixel is in) and end with every good pixel.
    cuts = [matching_cutoff(g, sg, s, start=0.4, ramp=6) for g in range(1, 7)]
    assert cuts[0] < cuts[1] < cuts[2] < cuts[3] <= cuts[4] <= cuts[5] == sg.max()


def test_gap_pushes_the_cutoff_out():
    """Catches counting only the good pixels of the disk: a 4-row gap through the centre
    removes pixels from the inner disk, and the cutoff must grow to make up for them."""
    s = _s()
    good = np.ones((64, 64), dtype=bool)
    good[30:34] = False
    sg = s[good.ravel()]
    cut = matching_cutoff(1, sg, s, start=0.4, ramp=6)
    # 896 pixels, plus those tied with the last one (symmetric pixels share |s|).
    assert 896 <= np.count_nonzero(sg <= cut) < 896 + 8 and cut > 0.4 * s.max()
    with pytest.raises(ValueError, match="no good pixels"):
        matching_cutoff(1, np.array([]), s, start=0.4, ramp=6)
