"""Runnable examples of cetnet's extension points (docs/EXTENDING.md).

A package so that ``--plugin examples.custom_member`` imports from the repository root.
"""
