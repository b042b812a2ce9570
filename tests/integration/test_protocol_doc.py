"""The sender example in docs/protocol.md runs as written against a real service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.client import Subscriber
from service.events import ScanCompleted

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def sender_example() -> str:
    text = DOC.read_text()
    section = text.split("## A complete sender", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/protocol.md lost its sender example"
    return match.group(1)


def test_example_uses_only_pyzmq_msgpack_numpy() -> None:
    imports = set(re.findall(r"^(?:import|from) (\w+)", sender_example(), re.M))
    assert imports <= {"math", "os", "msgpack", "numpy", "zmq"}


def test_doc_sender_example_gets_every_slice_in_physical_units(
    start_service: Any, tmp_path: Path
) -> None:
    _, endpoints = start_service(publish={"recon": True})
    script = tmp_path / "sender.py"
    script.write_text(sender_example())
    with Subscriber(endpoints.publish, ("recon", "event")) as viewer:
        viewer.wait_ready()
        env = {**os.environ, "TOMOCAST_INGEST": endpoints.ingest, "SCAN_ID": "doc-example"}
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        slices: dict[int, np.ndarray] = {}
        while True:
            message = viewer.recv(timeout=60.0)
            assert message is not None
            if isinstance(message.event(), ScanCompleted):
                break
            if message.topic == "recon":
                assert message.data is not None
                slices[message.header["index"]] = message.data
    assert sorted(slices) == list(range(16))
    # The example's disk has attenuation 0.02 per pixel and radius 20 px around the axis.
    yy, xx = np.mgrid[:64, :64] - 31.5
    inside = xx**2 + yy**2 < 15**2
    outside = (xx**2 + yy**2 > 24**2) & (xx**2 + yy**2 < 30**2)
    volume = np.stack([slices[i] for i in range(16)])
    np.testing.assert_allclose(volume[:, inside].mean(), 0.02, rtol=0.05)
    assert abs(volume[:, outside].mean()) < 0.002
