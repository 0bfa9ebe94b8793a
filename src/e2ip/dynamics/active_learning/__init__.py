"""Active learning: train, run uncertainty-stopped MD, select frames, label them with a reference
calculator, repeat (``e2ip active-learn``)."""

from e2ip.dynamics.active_learning.config import ALConfig, MDSettings, load_al_config
from e2ip.dynamics.active_learning.loop import run_active_learning
from e2ip.dynamics.active_learning.selection import distance_histogram, select_diverse

__all__ = ["ALConfig", "MDSettings", "distance_histogram", "load_al_config", "run_active_learning",
           "select_diverse"]
