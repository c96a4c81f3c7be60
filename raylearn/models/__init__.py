"""raylearn.models."""
