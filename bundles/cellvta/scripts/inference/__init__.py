"""Tile inference: the upscale protocol and the writers of maps, overlays and GeoJSON."""
