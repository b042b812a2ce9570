"""What the service process itself costs with `cluster.engine = "ray"`: the seconds
`Service.start()` takes (a local Ray instance, its actors loading their model, the service's own
start-up), the CPU seconds the service process itself spent in it, and its resident memory
after it (the actors and Ray's daemons are other processes, not counted). The figures of
docs/scale.md, "What the service process loads".

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/ray_footprint.py [--workers 2] [--precision auto]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from service.app import Service
from service.config import load_settings


def _status_kib(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="model.precision (auto: int8 on CPU)")
    args = parser.parse_args()

    before = _status_kib("VmRSS")
    settings = load_settings(
        None,
        {
            "ingest": {"endpoint": "tcp://127.0.0.1:*"},
            "publish": {"endpoint": "tcp://127.0.0.1:*"},
            "metrics": {"port": 0},
            "worker": {"device": "cpu"},
            "model": {"precision": args.precision},
            "cluster": {"engine": "ray", "workers": args.workers},
        },
    )
    service = Service(settings)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        service.start()
        started, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rss, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
        model = service.denoiser.name if service.denoiser else "none"
    finally:
        service.stop()
    print(f"workers {args.workers}, model {model}, precision {args.precision}")
    print(f"Service.start(): {started:.2f} s, {cpu:.2f} s CPU in the service process")
    print(
        f"service process RSS: {before / 1024:.0f} MiB before start, {rss / 1024:.0f} MiB "
        f"after (+{(rss - before) / 1024:.0f} MiB), peak {peak / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
