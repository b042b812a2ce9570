"""Detector data to clean line integrals, on the data's device, each step a function of tensors
or numpy arrays (numpy in, numpy out), batched, with its source paper in its module:

- `flatfield`: dark/flat correction and -log (`normalize` = `flat_field` + `minus_log`, for
  steps between the two), frame averaging;
- `zingers`: bright outliers against their 3 x 3 median, before -log (`remove_zingers`);
- `phase`: Paganin single-distance phase retrieval, before -log (`paganin_filter`);
- `stripes`: ring artifacts, in sinograms (`remove_stripes`: Vo 2018, Münch 2009);
- `center`: the rotation axis from the data (`find_center`: `find_center_vo` for a half-turn,
  `find_center_360` for a full one) and the
  TomoPy pixel-index convention (`from_tomopy_center`, `to_tomopy_center`);
- `halfacq`: 360-degree offset-axis scans stitched to 180 degrees;
- `cost`: each step's time per slice next to FBP's.

Order on a scan: zingers and phase on transmission (after dark/flat, before -log), then -log,
then stripes on the sinograms; the centre from the corrected sinograms (after stitching, for a
half-acquisition scan).
"""

from workers.conventions import from_tomopy_center, to_tomopy_center
from workers.preprocess.center import (
    find_center,
    find_center_360,
    find_center_pair,
    find_center_vo,
)
from workers.preprocess.flatfield import (
    TRANSMISSION_FLOOR,
    average_frames,
    flat_field,
    minus_log,
    normalize,
)
from workers.preprocess.halfacq import find_half_acquisition_center, stitch_half_acquisition
from workers.preprocess.phase import paganin_filter
from workers.preprocess.stripes import METHODS as STRIPE_METHODS
from workers.preprocess.stripes import remove_stripes
from workers.preprocess.zingers import remove_zingers

__all__ = [
    "STRIPE_METHODS",
    "TRANSMISSION_FLOOR",
    "average_frames",
    "find_center",
    "find_center_360",
    "find_center_pair",
    "find_center_vo",
    "find_half_acquisition_center",
    "flat_field",
    "from_tomopy_center",
    "minus_log",
    "normalize",
    "paganin_filter",
    "remove_stripes",
    "remove_zingers",
    "stitch_half_acquisition",
    "to_tomopy_center",
]
