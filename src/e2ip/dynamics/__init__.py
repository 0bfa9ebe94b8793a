"""Uncertainty in use: molecular dynamics that watches its uncertainty, reference calculators
(oracles), and active learning.
"""
