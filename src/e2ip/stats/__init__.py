"""Statistics of per-atom force predictions: predictive distributions, training losses, metrics,
and post-hoc calibration. Knows nothing of models: it works on tensors and distributions.
"""
