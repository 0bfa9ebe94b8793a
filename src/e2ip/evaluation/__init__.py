"""Evaluation: run any model kind over a data set, every metric, plots, and model comparisons."""
