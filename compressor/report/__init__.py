"""Reporting: one HTML page from manifests and benchmark JSON."""
