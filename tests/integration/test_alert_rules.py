"""Alert rules whose firing is checked with `promtool test rules` on synthetic series: when they
fire, when they do not, and what they say.

(That every rule's expression finds the service's series: tests/integration/test_prometheus.py.)
Needs promtool (Debian package `prometheus`); skipped without it, except under
TOMOCAST_REQUIRE_SYSTEM_TOOLS=1 (CI), where it fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.integration.test_prometheus import PROMETHEUS_DIR, alert_rules, system_tool

ALERTS = PROMETHEUS_DIR / "alerts.yml"


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in {"job": "tomocast", **labels}.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    spec = tmp_path / "rules_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests})
    )
    done = subprocess.run(
        [system_tool("promtool"), "test", "rules", str(spec)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_guard_fallback_alert_fires_on_a_high_share_only(tmp_path: Path) -> None:
    """Instance `wrong`: 60 of 100 slices a minute fall back (60 %), for 30 minutes: pending
    at first, firing once the share has held for 10 minutes. `right`: 3 of 100 (a right
    model's few). `idle`: no slices at all. `broken`: every slice's score is not finite."""
    rule = next(r for r in alert_rules() if r["alert"] == "TomocastGuardFallbacksHigh")
    inputs = []
    for instance, inconsistent, not_finite, scored in (
        ("wrong", 60, 0, 100),
        ("right", 3, 0, 100),
        ("idle", 0, 0, 0),
        ("broken", 0, 50, 0),
    ):
        inputs += [
            series(
                "tomocast_guard_fallbacks_total",
                f"0+{inconsistent}x40",
                instance=instance,
                reason="inconsistent",
            ),
            series(
                "tomocast_guard_fallbacks_total",
                f"0+{not_finite}x40",
                instance=instance,
                reason="not_finite",
            ),
            series("tomocast_guard_consistency_count", f"0+{scored}x40", instance=instance),
        ]

    def expected(instance: str, share: str) -> dict[str, Any]:
        return {
            "exp_labels": {"severity": "warning", "instance": instance},
            "exp_annotations": {
                "summary": rule["annotations"]["summary"]
                .replace("{{ $labels.instance }}", instance)
                .replace("{{ $value | humanizePercentage }}", share),
                "description": rule["annotations"]["description"],
            },
        }

    name = "TomocastGuardFallbacksHigh"
    promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": name, "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": name,
                        "exp_alerts": [expected("wrong", "60%"), expected("broken", "100%")],
                    },
                ],
            }
        ],
    )
