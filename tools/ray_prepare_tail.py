"""A scan's tail on Ray actors with its FBP geometry prepared at scan_start, and without: two
actors with the gridding FBP (denoiser off, so the geometry is what differs), one scan of a
new geometry each time, its rows through `service.cluster.Spread` as the service sends them.
"prepared": `Spread.prepare` (what the geometry preparer calls at scan_start) before the scan;
"built by the units": each actor builds it in its first unit. The figures of docs/scale.md,
"Geometry ahead of the data".

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/ray_prepare_tail.py [--cols 512] [--repeat 2]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch

from service.cluster import build_ray_spread
from service.config import Settings
from service.metrics import Metrics
from service.protocol import ScanStart
from service.sinogram import CompletedScan
from workers.rows import theta_tensor


def builds_so_far(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tomocast_cluster_unit_geometry_builds_total")
    return value or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--angles", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    settings = Settings.model_validate(
        {
            "worker": {"device": "cpu", "fbp_method": "gridding", "batch_rows": 4},
            "model": {"enabled": False},
            "cluster": {"engine": "ray", "workers": 2, "unit_rows": 4},
        }
    )
    metrics = Metrics()
    spread, _ = build_ray_spread(settings, metrics)
    rng = np.random.default_rng(0)
    sinogram = torch.from_numpy(rng.random((args.rows, args.angles, args.cols), dtype=np.float32))
    theta = np.linspace(0, np.pi, args.angles, endpoint=False)
    never = threading.Event()
    print(f"2 Ray actors, gridding FBP, {args.rows} rows x {args.cols} cols x {args.angles} angles")
    try:
        for attempt in range(args.repeat):
            for prepared in (False, True):
                # a centre no earlier scan used: a geometry nobody holds yet
                center = args.cols / 2 + 0.125 * (1 + 2 * attempt + int(prepared))
                start = ScanStart("tail", 0, args.rows, args.cols, args.angles, "float32")
                scan = CompletedScan(start, sinogram, theta, center, 0, 0, 0, 0.0, 0.0)
                t_prepare = 0.0
                if prepared:
                    t0 = time.perf_counter()
                    spread.prepare(theta_tensor(theta), center, args.cols)
                    t_prepare = time.perf_counter() - t0
                builds = builds_so_far(metrics)
                t0 = time.perf_counter()
                spread.reconstruct(scan, lambda batch: None, never)
                tail = time.perf_counter() - t0
                units = builds_so_far(metrics) - builds
                what = "prepared at scan_start" if prepared else "built by the units    "
                print(
                    f"{what}: scan tail {tail:.2f} s (units that built it: {units:.0f}; "
                    f"prepare beforehand {t_prepare:.2f} s)"
                )
    finally:
        spread.close()


if __name__ == "__main__":
    main()
