"""A run's life: validate, submit, reconcile and budgets, status, watch and resume, cancel, logs, export."""
