"""Simulated detectors and scan sources: phantom scans, file replay, the demo."""
