"""Measure the web viewer's wire format: bytes, server encode time, browser decode + draw time.

    .venv/bin/python tools/bench_web_wire.py [--sizes 256 512 1024 2048] [--repeat 15]

Candidates per slice: raw float32 (what the viewer sends; the page windows and colours),
float16, an 8-bit PNG windowed on the server (PIL, zlib level 6 and 1), and float32 through
WebSocket permessage-deflate (zlib level 6). Slices are real FBP reconstructions
(workers.recon) of simulated noisy foam scans at 256 and 512 px; 1024 and 2048 px tile
rotations and flips of the 512 px slice (`tiled`: nothing repeats within deflate's window).
The browser side runs the viewer page's own functions in Debian's headless chromium. Transfer
times are bytes over a 1 Gb/s and a 100 Mb/s link.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.clients.web.frames import encode_frame, frame_header
from service.clients.web.server import WebSettings, WebViewer
from service.clients.writers import robust_window, to_uint8
from service.sim.simulate import simulate_scan
from tests.support.headless import find_chromium, launch
from workers.recon import recon

LINKS = {"1 Gb/s": 1e9, "100 Mb/s": 1e8}
HEADER = {
    "scan_id": "bench",
    "index": 0,
    "rows": 1,
    "model": "bench",
    "t_published": 0.0,
    "t_last_projection": 0.0,
    "timing": {"end_to_end": 0.0},
}


def fbp_slice(n: int) -> np.ndarray:
    scan = simulate_scan(
        "bench", rows=1, cols=n, n_angles=n, photons=1000, n_dark=4, n_flat=4, seed=n
    )
    dark, flat = scan.darks.mean(0), scan.flats.mean(0)
    ratio = np.clip((scan.projections - dark) / (flat - dark), 1e-6, None)
    return recon((-np.log(ratio)).astype(np.float32), scan.theta)[0]


def slices(sizes: list[int]) -> dict[int, np.ndarray]:
    made = {n: fbp_slice(n) for n in sorted({min(n, 512) for n in sizes})}
    for n in sizes:
        if n not in made:
            made[n] = tiled(made[512], n // 512)
    return made


def tiled(tile: np.ndarray, k: int) -> np.ndarray:
    """k x k tiles, each a different rotation/flip of `tile` from its row neighbours: no byte
    sequence repeats within deflate's 32 KiB window, so PNG and deflate gain nothing from the
    tiling, and the noise statistics are those of a real FBP slice."""
    variants = [np.rot90(tile, r) for r in range(4)] + [np.rot90(tile.T, r) for r in range(4)]
    rows = [np.hstack([variants[(4 * (i % 2) + j) % 8] for j in range(k)]) for i in range(k)]
    return np.ascontiguousarray(np.vstack(rows))


def median_ms(work: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, result


def png(data: np.ndarray, level: int) -> bytes:
    image = Image.fromarray(to_uint8(data, *robust_window(data)))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=level)
    return out.getvalue()


def server_side(data: np.ndarray, repeat: int) -> dict[str, tuple[float, bytes]]:
    header = frame_header("slice", HEADER, data.shape, 1)
    float32 = encode_frame(header, data)
    return {
        "float32": median_ms(lambda: encode_frame(header, data), repeat),
        "float16": median_ms(lambda: data.astype("<f2").tobytes(), repeat),
        "png8 level 6": median_ms(lambda: png(data, 6), repeat),
        "png8 level 1": median_ms(lambda: png(data, 1), repeat),
        "float32 + deflate": median_ms(lambda: zlib.compress(float32, 6), repeat),
    }


BROWSER_BENCH = """async ([frame64, png64, repeat]) => {
    const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const frame = bytes(frame64).buffer, pngBytes = bytes(png64);
    const v = globalThis.tomocastViewer, lut = v.makeLut("gray");
    const canvas = document.createElement("canvas");
    const median = (xs) => xs.sort((a, b) => a - b)[xs.length >> 1];
    const float32 = [], png = [];
    for (let r = 0; r < repeat; r++) {
        let t = performance.now();
        const {header, pixels} = v.parseFrame(frame);
        [canvas.height, canvas.width] = header.shape;
        v.paint(canvas, pixels, v.percentiles(pixels, 0.5, 99.5), lut);
        canvas.getContext("2d").getImageData(0, 0, 1, 1);  // the draw has landed
        float32.push(performance.now() - t);
        t = performance.now();
        const bitmap = await createImageBitmap(new Blob([pngBytes], {type: "image/png"}));
        canvas.getContext("2d").drawImage(bitmap, 0, 0);
        canvas.getContext("2d").getImageData(0, 0, 1, 1);
        png.push(performance.now() - t);
    }
    return {float32: median(float32), png: median(png)};
}"""


def browser_side(data: dict[int, np.ndarray], repeat: int) -> dict[int, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        sys.exit("no chromium: apt-get install chromium chromium-driver")
    results = {}
    # No service is needed: the page only lends its functions.
    with (
        WebViewer(WebSettings(connect="tcp://127.0.0.1:9", port=0)) as viewer,
        tempfile.TemporaryDirectory() as profile,
        sync_playwright() as playwright,
    ):
        context = launch(playwright, executable, Path(profile))
        page = context.new_page()
        page.goto(viewer.url)
        page.wait_for_function("globalThis.tomocastViewer !== undefined")
        for n, image in data.items():
            frame = encode_frame(frame_header("slice", HEADER, image.shape, 1), image)
            results[n] = page.evaluate(
                BROWSER_BENCH,
                [
                    base64.b64encode(frame).decode(),
                    base64.b64encode(png(image, 6)).decode(),
                    repeat,
                ],
            )
        context.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    data = slices(args.sizes)
    browser = browser_side(data, args.repeat)
    print(
        f"{'size':>6} {'format':<18} {'bytes':>10} {'encode ms':>10} {'browser ms':>11} "
        + " ".join(f"{'@' + link:>12}" for link in LINKS)
        + "   (total ms at each link)"
    )
    for n, image in data.items():
        for name, (encode, payload) in server_side(image, args.repeat).items():
            decode = {"float32": browser[n]["float32"], "png8 level 6": browser[n]["png"]}.get(name)
            totals = []
            for rate in LINKS.values():
                wire = len(payload) * 8 / rate * 1e3
                totals.append(
                    f"{encode + wire + (decode or 0):>12.1f}"
                    if decode is not None
                    else f"{'wire ' + format(wire, '.1f'):>12}"
                )
            print(
                f"{n:>6} {name:<18} {len(payload):>10} {encode:>10.2f} "
                f"{decode if decode is not None else float('nan'):>11.2f} " + " ".join(totals)
            )


if __name__ == "__main__":
    main()
