"""Rotation-centre conventions, without torch (the wire protocol's decoder uses them too).

tomocast's `center` (v1 protocol, ASTRA, TomoPy's `fbp`): cols/2 is the detector's middle.
TomoPy's pixel index (`find_center_vo`, `gridrec`): a centred axis is at (cols-1)/2. Hence
`from_tomopy_center(index) = index + 0.5` and `to_tomopy_center(center) = center - 0.5`.
"""

from __future__ import annotations

# "tomocast": cols/2 is the detector's middle; "tomopy": the axis' pixel index, center - 0.5.
CENTER_CONVENTIONS = ("tomocast", "tomopy")


def from_tomopy_center(index: float) -> float:
    """TomoPy's axis pixel index (find_center_vo, gridrec) -> tomocast's `center`."""
    return float(index) + 0.5


def to_tomopy_center(center: float) -> float:
    """tomocast's `center` -> TomoPy's axis pixel index (find_center_vo, gridrec)."""
    return float(center) - 0.5


def resolve_center(center: float | None, cols: int, convention: str = "tomocast") -> float:
    """tomocast's `center` for a `center` given in `convention` ("tomocast": cols/2 is the
    detector's middle; "tomopy": the axis' pixel index, (cols-1)/2 there); None is the middle
    in either. ValueError for another convention."""
    if convention not in CENTER_CONVENTIONS:
        raise ValueError(
            f"center_convention={convention!r}: choose one of {', '.join(CENTER_CONVENTIONS)}"
        )
    if center is None:
        return cols / 2
    return from_tomopy_center(center) if convention == "tomopy" else float(center)
