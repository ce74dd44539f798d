"""Thin layers that give users of the systems acceltrain grew from their documented names.

One module per system; each maps the documented classes and functions onto acceltrain's own
machinery (``BaseTrainer``, the hooks, recipes, ``sweep``, ``slurm``) and implements nothing twice.
Import the module for the system you come from, e.g. ``from acceltrain.compat import selgis``.
"""
