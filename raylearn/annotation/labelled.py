"""The training side of the label store: a pool store whose labels come from a
:class:`~raylearn.annotation.labels.LabelStore` (annotated, partial and pseudo-labels merged into what training reads).
"""

from __future__ import annotations

import numpy as np

from raylearn.annotation.labels import PSEUDO_TAG, LabelStore, LabelStoreError

__all__ = ["LabelledStore"]


class LabelledStore:
    """A pool store whose labels come from a :class:`LabelStore`: what training processes are handed.

    ``get(case_id)`` returns the pool store's image with the latest ``final`` label of the label store (None
    when the case has none), so every reader of training data (the persistent service's workers, nnU-Net's
    export) sees only labels the oracle delivered. Everything else is the pool store's. Pickles as both paths.
    """

    def __init__(self, store, labels: LabelStore) -> None:
        self.store, self.labels = store, labels

    def __reduce__(self):
        return (LabelledStore, (self.store, self.labels))

    def __getattr__(self, name: str):
        if name in ("store", "labels") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.store, name)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.store

    def __len__(self) -> int:
        return len(self.store)

    def get(self, case_id: str):
        from raylearn.data.store import StoredCase

        case = self.store.get(case_id)
        try:
            label = self.labels.read(case_id)
        except KeyError:
            label = None
        if label is not None and label.shape != tuple(case.image.shape[1:]):
            raise LabelStoreError(f"case {case_id!r}: stored label {label.shape} does not match the image grid "
                                  f"{case.image.shape[1:]}")
        return StoredCase(case.case_id, case.image, label, case.spacing, case.split)

    def label_version(self, case_id: str) -> int | None:
        """The latest version of a case's ``final`` or ``pseudo`` label (versions count per case across tags, so a
        correction, a new slice or a new round's pseudo-labels all change it and make training re-read the case)."""
        versions = [r.version for r in self.labels.history(case_id) if r.tag in ("final", PSEUDO_TAG)]
        return max(versions) if versions else None

    def training_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What training reads: ``(image float32 [C, D, H, W], label uint8 [D, H, W], mask bool [D, H, W] | None)``.

        The label is the annotated voxels' (``final``) with the latest pseudo-labels filled in where nobody
        annotated; the mask marks the voxels the loss may use (annotated or pseudo-labelled). ``mask`` is None for a
        whole-volume label without pseudo-labels (every voxel counts, as before slice units).

        Raises:
            ValueError: the case has neither an annotated nor a pseudo-label.
        """
        case = self.store.get(case_id)
        grid = tuple(case.image.shape[1:])
        has_final = bool(self.labels.history(case_id, "final"))
        has_pseudo = bool(self.labels.history(case_id, PSEUDO_TAG))
        if not has_final and not has_pseudo:
            raise ValueError(f"case {case_id!r} has no label in the label store; only labelled cases can be trained on")
        label, mask = (self.labels.read_masked(case_id) if has_final
                       else (np.zeros(grid, np.uint8), np.zeros(grid, bool)))
        if label.shape != grid:
            raise LabelStoreError(f"case {case_id!r}: stored label {label.shape} does not match the image grid {grid}")
        full = has_final and not self.labels.latest(case_id).partial
        if has_pseudo:
            pseudo, filled = self.labels.read_masked(case_id, tag=PSEUDO_TAG)
            if filled.any():
                filled = filled & ~mask  # annotations win (the store refuses overlaps; a later slice may add one)
                label = np.where(filled, pseudo, label).astype(np.uint8)
                mask = mask | filled
                full = False
        return case.image, label, (None if full else mask)
