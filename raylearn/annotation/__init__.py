"""Annotation: the versioned label store, label validation, leases, users and roles, and label-driven rounds."""

from raylearn.annotation.labelled import LabelledStore
from raylearn.annotation.labels import LabelRecord, LabelStore, LabelStoreError

__all__ = ["LabelRecord", "LabelStore", "LabelStoreError", "LabelledStore"]
