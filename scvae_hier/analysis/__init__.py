"""Scores, figures, reports and experiments built on trained runs.

Layering: this subpackage imports the core (data, models, training, runs, outputs, bounds); the
core never imports it.
"""
