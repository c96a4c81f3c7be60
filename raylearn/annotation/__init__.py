"""Annotation: the versioned label store, label validation, leases, users and roles, and label-driven rounds."""

from raylearn.annotation.labels import LabelledStore, LabelRecord, LabelStore, LabelStoreError

__all__ = ["LabelRecord", "LabelStore", "LabelStoreError", "LabelledStore"]
