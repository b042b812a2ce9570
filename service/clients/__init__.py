"""Viewer-side programs: `tomocast view` (files, PNG) and the web viewer."""
