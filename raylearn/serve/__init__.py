"""raylearn.serve."""
