"""Tasks: the task schema, loaders and the synthetic-environment pipeline."""
