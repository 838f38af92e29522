"""What a run cost: the cost ledger (one row per step partition and model) and the project file's prices. No Dagster."""
