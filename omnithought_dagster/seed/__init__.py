"""The seed stage's domain code: read a source (`sources/`), check each record (`validate`, `answers`, `images`; in a pool
of processes: `parallel`), drop what earlier sources kept (`dedup`, `near_dup`) and stream the rows into sinks (`sinks`,
`ingest`). Plain Python: no Dagster."""
