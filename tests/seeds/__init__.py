"""Seed-compatibility tests: the documented examples of the seed systems, run on acceltrain."""
