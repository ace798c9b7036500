"""CellVTA as a MONAI Deploy application: load tiles or slide regions, segment and classify nuclei, write them.

Modules: :mod:`.bundle` (the network and its pre/post-processing, from the bundle's inference config and a model
folder), :mod:`.inputs` (what the input path holds and how each item is read), :mod:`.settings` (the app's own
section of ``app.yaml``), :mod:`.outputs` (GeoJSON, instance/type maps, overlays), :mod:`.operators` (the three
operators of the graph) and :mod:`.app` (the application that wires them).
"""
