"""What a run is: the config schema, YAML loading and --set, the QA data format, estimates, schema docs."""
