"""The run directory on disk: the run record (run.json) and the files the worker writes."""
