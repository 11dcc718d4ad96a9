"""Fixtures for the tests and the benchmarks: synthetic stores shaped like real ones, with no model run.
The product never imports this package (an import contract)."""
