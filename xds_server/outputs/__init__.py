"""Outputs that act on the world after committed decisions (traffic sinks that do I/O):
the `istio` output mode applies Istio objects to each region's cluster. Pure renderers
of the same state live in `render/`."""
