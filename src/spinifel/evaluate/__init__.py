"""Compare a reconstruction with ground truth.

``orientations`` (global rotation, per-image errors), ``align`` (volume rotation, hand and
shift alignment, rotation search), ``fsc`` (FSC, resolution, correlations), ``plots``
(PNG figures) and ``report`` (:func:`evaluate_arrays`, :func:`evaluate_result`).
"""

from spinifel.evaluate.report import (
    GroundTruth,
    evaluate_arrays,
    evaluate_result,
    load_ground_truth,
)

__all__ = ["GroundTruth", "evaluate_arrays", "evaluate_result", "load_ground_truth"]
