"""Datasets in the bundle's layout, their converters, transforms and samplers."""
