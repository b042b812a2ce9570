"""`tomocast view --web`: a live web viewer of the slices a service publishes.

One process subscribes to the publisher (`hub`), keeps the current scan's slices (`broadcast`),
and serves a page plus a WebSocket to any number of browsers (`server`). The page
(`static/`) windows and colours raw float32 slices itself, so contrast and colour map changes
cost no round trip; `frames` is the wire format and docs/viewer.md the reasons for it.
"""
