"""Whole slides: readers, tissue detection, tiling, per-tile cells, streamed outputs, the cohort runner."""
