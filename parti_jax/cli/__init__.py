"""Thin entry points: parse flags and gin, then call library code."""
