"""Test-wide settings: hypothesis draws the same examples on every run, so CI is reproducible."""
from hypothesis import settings

settings.register_profile("qcompiler", derandomize=True, deadline=None)
settings.load_profile("qcompiler")
