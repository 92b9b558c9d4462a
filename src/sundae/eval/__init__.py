"""Evaluation: classifiers and feature extractors, FID, density/coverage (paper §4, Tables 1-2)."""
