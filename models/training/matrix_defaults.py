"""The evaluation matrix's defaults, importable without torch (the CLI builds its flags from
them when `tomocast --help` runs)."""

from __future__ import annotations

DEFAULT_BASELINES = ("gaussian", "tv", "nlm")  # bm3d is much slower per slice: ask for it
DEFAULT_ATTENUATIONS = (0.3, 1.0, 3.0)
VALIDATION_OFFSET = 500_000  # validation phantom = scored seed + this: still evaluation-only
MARGIN_DB = 1.0  # "beats the best classical" by at least this much PSNR
