"""One module per scheduler backend: the submitting side and the in-job side together."""
