"""Measurement: latency of artifacts and handles, and the baselines users deploy instead."""
