"""Scoring students with lmms-eval, which runs in its own environment as a process.

- tasks.py: a configured benchmark written as a local lmms-eval task (Parquet + YAML + utils);
- task_utils.py: the task's functions (copied beside the YAML; imports nothing of ours);
- lmms_plugin.py: our model class for lmms-eval, registered through the `lmms_eval.models`
  entry point (runs inside the lmms-eval environment);
- run.py: the command line, and parsing of what lmms-eval wrote (its exit code is not trusted).
No Dagster here.
"""
