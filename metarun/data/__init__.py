"""Data sources and episode sampling for metarun."""
