"""Benchmarks of agentchassis against its peers (never part of the test run).

``python -m bench``: see bench/README.md.
"""
