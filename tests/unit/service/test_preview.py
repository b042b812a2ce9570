"""Previews and the live centre in parts: the rows previewed, the preview header, the preview
queue's drop-oldest policy, the centre policy and the control endpoint's refusals."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from service.config import PreviewSettings, Settings, WorkerSettings
from service.errors import ConfigError
from service.events import PreviewHeader
from service.live import CenterControl, CenterRefused, LiveScans
from service.metrics import Metrics
from service.preview import Previewer, Rerender, Snapshot, preview_rows
from service.protocol import ScanStart
from service.publish import Publisher


def test_rows_previewed_default_to_the_middle_and_the_quarters() -> None:
    assert preview_rows(PreviewSettings(), 48) == (12, 24, 36)
    assert preview_rows(PreviewSettings(), 1) == (0,)
    assert preview_rows(PreviewSettings(rows=(40, 3, 3, 100)), 48) == (3, 40)


def test_preview_rows_setting_takes_a_comma_list_and_refuses_negative_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.config import load_settings

    assert load_settings(None, {"preview": {"rows": "10, 2"}}).preview.rows == (2, 10)
    for text in ("10,20", "[20, 10]"):
        monkeypatch.setenv("TOMOCAST_PREVIEW__ROWS", text)
        assert load_settings().preview.rows == (10, 20)
    monkeypatch.setenv("TOMOCAST_PREVIEW__ROWS", "middle")
    with pytest.raises(ConfigError, match="row numbers"):
        load_settings()
    monkeypatch.delenv("TOMOCAST_PREVIEW__ROWS")
    with pytest.raises(ConfigError, match="rows"):
        load_settings(None, {"preview": {"rows": [-1]}})
    assert Settings().preview.enabled and Settings().preview.rate_hz == 2.0


def test_preview_header_round_trips_and_says_it_is_a_preview() -> None:
    header = PreviewHeader("s", 8, 4, 30, 120, 31.5, "declared", 1.5e9, t_published=1.6e9)
    encoded = header.encode()
    assert encoded["preview"] is True and encoded["fraction"] == 0.25
    assert PreviewHeader.decode(encoded) == header
    with pytest.raises(ValueError, match="preview"):
        PreviewHeader.decode({**encoded, "preview": False})
    with pytest.raises(ValueError, match="center"):
        PreviewHeader.decode({**encoded, "center": "middle"})
    assert encoded["plane"] == "xy"
    vertical = replace(header, index=32, plane="xz")
    assert PreviewHeader.decode(vertical.encode()) == vertical
    older = {k: v for k, v in encoded.items() if k != "plane"}  # the first senders' previews
    assert PreviewHeader.decode(older).plane == "xy"
    with pytest.raises(ValueError, match="plane"):
        PreviewHeader.decode({**encoded, "plane": "yz"})


def _start(scan_id: str, center: float | None = None) -> ScanStart:
    return ScanStart(scan_id, 0, 4, 64, 16, "float32", center=center, normalized=True)


def test_centre_policy_declared_config_previous_default() -> None:
    live = LiveScans(Metrics(), lambda s: s.center if s.center is not None else None)
    assert (live.open(_start("a", 30.0)).source, live.get("a").center) == ("declared", 30.0)  # type: ignore[union-attr]
    assert live.open(_start("b")).source == "default"
    assert live.get("b").center == 32.0  # type: ignore[union-attr]
    live.learn(64, 33.25)
    scan = live.open(_start("c"))
    assert (scan.center, scan.source) == (33.25, "previous")
    configured = LiveScans(Metrics(), lambda s: 20.0)
    assert configured.open(_start("d")).source == "config"


def test_set_center_validates_and_tells_listeners() -> None:
    metrics = Metrics()
    live, heard = LiveScans(metrics), []
    live.on_change(heard.append)
    live.open(_start("a", 30.0))
    for bad in (float("nan"), float("inf"), 10**400, -1.0, 64.5, True, "31", None):
        with pytest.raises(CenterRefused) as refused:
            live.set_center("a", bad)
        assert refused.value.status.startswith("400")
    with pytest.raises(CenterRefused) as missing:
        live.set_center("b", 30.0)
    assert missing.value.status.startswith("404")
    assert live.set_center("a", 31) == (30.0, 31.0) and heard == ["a"]
    state = live.close("a")
    assert state is not None and state.operator and state.source == "operator"
    assert (
        metrics.registry.get_sample_value("tomocast_center_changes_total", {"outcome": "rejected"})
        == 9
    )


def _call(control: CenterControl, environ: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    answer: list[str] = []
    body = b"".join(control(environ, lambda status, headers: answer.append(status)))
    return answer[0], json.loads(body)


def test_control_endpoint_answers_loopback_peers_only() -> None:
    live = LiveScans(Metrics())
    live.open(_start("a", 30.0))
    control = CenterControl(live)
    body = b'{"center": 31}'
    environ = {
        "PATH_INFO": "/scans/a/center",
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "10.1.2.3",
        "wsgi.input": io.BytesIO(body),
    }
    status, answer = _call(control, environ)
    assert status.startswith("403") and "loopback" in answer["error"]
    assert live.get("a").center == 30.0  # type: ignore[union-attr]
    status, answer = _call(
        control, {**environ, "REMOTE_ADDR": "::1", "wsgi.input": io.BytesIO(body)}
    )
    assert status.startswith("200") and answer["center"] == 31.0
    status, _ = _call(control, {**environ, "REMOTE_ADDR": "127.0.0.1", "CONTENT_LENGTH": "99999"})
    assert status.startswith("413")
    status, _ = _call(control, {**environ, "PATH_INFO": "/scans/a/b/center"})
    assert status.startswith("404")


def test_a_full_preview_queue_drops_the_oldest_snapshot_and_counts_it() -> None:
    metrics, context = Metrics(), zmq.Context()
    publisher = Publisher(Settings().publish, context, metrics, {})
    try:
        settings = PreviewSettings(queue_items=2)
        previewer = Previewer(
            settings, WorkerSettings(), torch.device("cpu"), publisher, LiveScans(metrics), metrics
        )  # not started: the queue fills
        snapshots = [
            Snapshot("s", 4, (2,), torch.zeros((1, n, 8)), np.zeros(n), n, 16, 0.0, 4.0, "default")
            for n in (2, 3, 4)
        ]
        for snapshot in snapshots:
            previewer.submit(snapshot)
        previewer.rerender("s")
        dropped = metrics.registry.get_sample_value(
            "tomocast_previews_dropped_total", {"reason": "queue_full"}
        )
        assert dropped == 2
        waiting = [previewer._queue.get_nowait() for _ in range(2)]
        assert waiting == [snapshots[2], Rerender("s")]
    finally:
        publisher.stop()
        context.term()


def test_previews_wait_while_the_loop_works_and_end_when_final_slices_begin() -> None:
    from service.client import Subscriber
    from service.events import ScanFailed
    from service.sinks import ScanDescription

    metrics, context = Metrics(), zmq.Context()
    publisher = Publisher(
        Settings().publish.model_copy(update={"endpoint": "tcp://127.0.0.1:*"}),
        context,
        metrics,
        {},
    )
    publisher.start()
    live = LiveScans(metrics)
    previewer = Previewer(
        PreviewSettings(), WorkerSettings(), torch.device("cpu"), publisher, live, metrics
    )
    previewer.start()
    theta = np.linspace(0, np.pi, 16, endpoint=False)
    sinograms = torch.rand((2, 16, 8), generator=torch.Generator().manual_seed(0))

    def snapshot(scan_id: str) -> Snapshot:
        return Snapshot(scan_id, 4, (1, 2), sinograms, theta, 16, 16, 0.0, 4.0, "default")

    def description(scan_id: str) -> ScanDescription:
        return ScanDescription(scan_id, 4, 8, theta, 4.0, "none", 0.0)

    try:
        with Subscriber(publisher.endpoint, ("preview",), context=context) as viewer:
            viewer.wait_ready()
            previewer.final_queued("other")  # another scan goes to the loop
            # the end of a scan never counted in (a continuous scan's window) frees nothing
            previewer.end(ScanFailed("continuous.w0", "test"))
            assert previewer.loop_busy
            previewer.begin(description("other"))
            previewer.submit(snapshot("a"))
            assert viewer.recv(timeout=0.3) is None, "a preview while the loop was busy"
            previewer.end(ScanFailed("other", "test"))
            got = [viewer.recv(timeout=10) for _ in range(2)]
            assert all(m is not None and m.topic == "preview" for m in got)
            assert [m.header["index"] for m in got if m is not None] == [1, 2]
            previewer.final_queued("a")
            previewer.begin(description("a"))  # the final slices of "a" begin
            previewer.submit(snapshot("a"))
            previewer.end(ScanFailed("a", "test"))
            assert viewer.recv(timeout=0.3) is None, "a preview after the final slices began"
        assert (
            metrics.registry.get_sample_value(
                "tomocast_previews_dropped_total", {"reason": "final_begun"}
            )
            == 1
        )
    finally:
        previewer.stop()
        assert previewer.join(10)
        publisher.stop()
        publisher.join()
        context.term()


def test_view_prints_one_line_per_preview(capsys: pytest.CaptureFixture[str]) -> None:
    from service.client import Published
    from service.clients.view import _preview

    header = PreviewHeader("s", 8, 4, 30, 120, 31.5, "operator", 100.0, t_published=100.25)
    _preview(Published("preview", header.encode(), np.zeros((4, 4), np.float32)))
    _preview(Published("preview", {"preview": True}, np.zeros((4, 4), np.float32)))
    line = capsys.readouterr().err
    assert line == (
        "preview s row 4: 25% of 120 angles, centre 31.5 (operator), 0.25 s behind the detector\n"
    )
