"""Active learning: train, run uncertainty-stopped MD, select frames, label them with a reference
calculator, repeat (``e2ip active-learn``).
"""
