"""Viewer-side slice sinks, progress bookkeeping and the comparison figure, on real files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from service.clients.writers import (
    HDF5SliceFile,
    PNGSliceFiles,
    ScanProgress,
    SliceWriter,
    save_comparison_png,
)
from service.events import SliceHeader
from service.nexus import find_slices


def _header(
    scan_id: str,
    index: int,
    rows: int = 4,
    shape: tuple[int, int] = (6, 5),
    latency: float = 0.05,
) -> SliceHeader:
    return SliceHeader.decode(
        {
            "v": 1,
            "scan_id": scan_id,
            "index": index,
            "rows": rows,
            "shape": list(shape),
            "dtype": "float32",
            "model": "tomogan-test",
            "t_last_projection": 1000.0,
            "t_published": 1000.0 + latency,
            "timing": {"fbp": 0.010, "denoise": 0.020},
        }
    )


def _slice(value: float, shape: tuple[int, int] = (6, 5)) -> np.ndarray:
    return np.full(shape, value, np.float32) + np.arange(shape[1], dtype=np.float32)


def test_sinks_satisfy_the_protocol(tmp_path: Path) -> None:
    hdf5 = HDF5SliceFile(tmp_path / "slices.h5")
    assert isinstance(hdf5, SliceWriter)
    assert isinstance(PNGSliceFiles(tmp_path / "png"), SliceWriter)
    hdf5.close()


def test_hdf5_sink_writes_scans_and_renames_on_close(tmp_path: Path) -> None:
    path = tmp_path / "out" / "slices.h5"
    sink = HDF5SliceFile(path)
    for index in (2, 0, 3):
        sink.write(_header("scan-a", index, latency=0.01 * (index + 1)), _slice(index))
    sink.write(_header("scan-a", 2), _slice(20))  # a duplicate: the newer slice wins
    sink.write(_header("scan-b", 0, rows=2, shape=(3, 3)), np.ones((3, 3), np.float32))
    sink.write(_header("scan-a", 1), _slice(-1), "recon")
    assert not path.exists() and sink.partial.exists()  # a crash now leaves only .partial
    sink.close()
    sink.close()  # idempotent
    assert path.exists() and not sink.partial.exists()
    with h5py.File(path, "r") as f:
        assert set(f) == {"scan-a", "scan-b"}
        a = f["scan-a"]
        # the archive's NeXus layout: an NXentry per scan, NXdata groups, an NXprocess
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "scan-a"
        assert a.attrs["NX_class"] == "NXentry" and a.attrs["default"] == "data"
        assert a["data"].attrs["NX_class"] == "NXdata" and a["data"].attrs["signal"] == "data"
        assert a["tomocast"].attrs["NX_class"] == "NXprocess"
        assert a["tomocast/program"][()] == b"tomocast"
        assert a["tomocast/model_name"][()] == b"tomogan-test"
        data = a["data/data"]
        assert data.shape == (4, 6, 5) and data.dtype == np.float32
        np.testing.assert_array_equal(data[0], _slice(0))
        np.testing.assert_array_equal(data[2], _slice(20))
        assert np.isnan(data[1]).all()
        np.testing.assert_array_equal(a["data/received"][()], [True, False, True, True])
        np.testing.assert_array_equal(a["recon/data"][1], _slice(-1))
        np.testing.assert_array_equal(a["recon/received"][()], [False, True, False, False])
        slices, received = find_slices(f, "scan-b")
        assert slices.shape == (2, 3, 3) and received.tolist() == [True, False]
        assert a.attrs["model"] == "tomogan-test"
        assert (a.attrs["slices_received"], a.attrs["missing"], a.attrs["duplicates"]) == (3, 1, 1)
        assert a.attrs["end_to_end_p50_ms"] == pytest.approx(30.0)
        summary = json.loads(a.attrs["timing_summary"])
        assert summary["stages_ms"]["denoise"]["p95"] == pytest.approx(20.0)
        assert f["scan-b/data/data"].shape == (2, 3, 3)
    with pytest.raises(ValueError, match="after close"):
        sink.write(_header("scan-a", 0), _slice(0))


def test_bad_slices_cost_one_slice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with HDF5SliceFile(tmp_path / "s.h5") as sink, caplog.at_level(logging.WARNING):
        sink.write(_header("ok", 0), _slice(1))
        sink.write(_header("ok", 4), _slice(1))  # index >= rows
        sink.write(_header("ok", 1), np.ones((6, 4), np.float32))  # data != header shape
        sink.write(_header("ok", 1, shape=(7, 5)), _slice(1, (7, 5)))  # scan's shape changed
        sink.write(_header("..", 0), _slice(1))  # would escape the PNG folder
        sink.write(_header("ok", 1), _slice(1), "event")
        sink.write(_header("ok", 1), _slice(5))
    assert caplog.text.count("dropped by the sink") == 4 and "differs" in caplog.text
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert list(f) == ["ok"]
        np.testing.assert_array_equal(f["ok/data/received"][()], [True, True, False, False])


def test_png_sink_writes_windowed_8bit_slices(tmp_path: Path) -> None:
    sink = PNGSliceFiles(tmp_path / "png")
    ramp = np.linspace(0, 1, 200 * 100, dtype=np.float32).reshape(200, 100)
    ramp[0, 0], ramp[-1, -1] = -50.0, 50.0  # outliers the robust window ignores
    ramp[5, 5] = np.nan
    sink.write(_header("scan-p", 12, rows=20, shape=(200, 100)), ramp)
    sink.write(_header("scan-p", 3, rows=20, shape=(200, 100)), ramp, "recon")
    sink.close()
    path = tmp_path / "png" / "scan-p" / "slice_00012.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["recon_00003.png", "slice_00012.png"]
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (100, 200)
        pixels = np.asarray(image)
    low, high = np.nanpercentile(ramp, (0.5, 99.5))
    expected = np.round(np.clip((ramp - low) / (high - low), 0, 1) * 255)
    inside = np.isfinite(ramp)
    np.testing.assert_allclose(pixels[inside], expected[inside], atol=1)
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255 and pixels[5, 5] == 0
    assert pixels[100, 50] == pytest.approx(128, abs=2)


def test_progress_summary() -> None:
    progress = ScanProgress("scan-s")
    assert progress.summary()["expected_rows"] is None
    for index, latency in ((0, 0.040), (1, 0.050), (3, 0.060), (1, 0.070)):
        progress.add(_header("scan-s", index, rows=5, latency=latency))
    assert not progress.complete and progress.missing_indices() == [2, 4]
    summary = progress.summary()
    assert (
        summary["slices"],
        summary["expected_rows"],
        summary["missing"],
        summary["duplicates"],
    ) == (3, 5, 2, 1)
    assert summary["end_to_end_ms"]["p50"] == pytest.approx(50.0)
    assert summary["end_to_end_ms"]["p95"] == pytest.approx(np.percentile([40, 50, 60], 95))
    assert summary["stages_ms"]["fbp"] == {
        "p50": pytest.approx(10.0),
        "p95": pytest.approx(10.0),
        "n": 3,
    }
    assert summary["model"] == "tomogan-test"
    text = progress.format_summary()
    assert text.startswith("scan scan-s: 3/5 slices, 2 missing, 1 duplicates")
    assert "end-to-end" in text and "denoise" in text and "fbp" in text
    progress.add(_header("scan-s", 2, rows=5), received_at=1000.08)
    assert progress.summary()["delivery_ms"]["p50"] == pytest.approx(30.0)


def test_comparison_png(tmp_path: Path) -> None:
    phantom = np.tile(np.linspace(0.0, 2.0, 40, dtype=np.float32), (30, 1))
    path = tmp_path / "demo-out" / "compare.png"
    save_comparison_png(
        path, [("phantom", phantom), ("FBP", phantom * 2 - 1), ("denoised", phantom[:20, :20])]
    )
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    height, width = pixels.shape
    assert width == 40 + 40 + 20 + 4 * 8 and height > 30
    title = pixels[: height - 30 - 8]
    assert (title < 128).any()  # titles are drawn
    first = pixels[height - 30 - 8 : height - 8, 8:48]
    assert first[:, 0].max() == 0 and first[:, -1].min() == 255
    second = pixels[height - 30 - 8 : height - 8, 56:96]
    assert second[:, :10].max() == 0  # below the phantom's range: clipped to black
    with pytest.raises(ValueError, match="expected"):
        save_comparison_png(path, [("volume", np.zeros((2, 3, 3)))])
