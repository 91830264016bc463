"""Artifact writing: compile a handle into a folder, the manifest, atomic publish under a lock."""
