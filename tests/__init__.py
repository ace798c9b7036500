"""Tests of the CellVTA bundle and its apps (a package, so ``tests.oracle`` is importable from the benchmarks)."""
