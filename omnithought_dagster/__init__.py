"""omnithought-dagster: the OmniThoughtVis distillation recipe as Dagster assets."""

__version__ = "0.1.0"
