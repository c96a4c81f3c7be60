"""raylearn.data."""
