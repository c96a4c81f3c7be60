"""Dataset discovery and case reading (SimpleITK) for three on-disk layouts.

Accepted layouts (checked in this order by :func:`discover_dataset`):

``nnunet``
    nnU-Net v2 raw layout: ``DatasetXXX_Name/dataset.json`` with ``channel_names``, ``labels``
    (name -> integer) and ``file_ending``; images ``imagesTr/{case}_{XXXX}{file_ending}`` (one file per
    channel, ``_0000`` first), labels ``labelsTr/{case}{file_ending}``.
``msd``
    Medical Segmentation Decathlon layout: ``dataset.json`` with ``modality`` / ``labels`` (integer
    string -> name) and a ``training`` list of ``{"image": ..., "label": ...}``; images and labels in
    ``imagesTr/`` and ``labelsTr/``. Multi-modal cases stored as one 4D file are split into channels.
``folder``
    A plain folder of pairs, either ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``) with
    matching file names, or one flat folder of ``{case}_img.ext`` + ``{case}_seg.ext`` files
    (``_image``/``_label`` also accepted). Label names come from an optional ``dataset.json`` or
    ``labels.json`` holding ``{"labels": {"0": "background", ...}}``; without one, the label set is the
    union of values found in the label files (read once at discovery).

Formats: ``.nii``, ``.nii.gz``, ``.mha``, ``.nrrd`` (anything SimpleITK reads). Geometry (spacing,
origin, direction) is kept on the returned ``sitk.Image`` objects. Every problem raises
:class:`DatasetError` with a message naming the file and the problem.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from raylearn.data.imageio import DatasetError, check_geometry, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "CaseRecord",
    "DatasetError",
    "DatasetInfo",
    "check_geometry",
    "discover_dataset",
    "read_case",
    "read_image",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")
_PAIR_SUFFIXES = (("_img", "_seg"), ("_image", "_label"))


@dataclass(frozen=True)
class CaseRecord:
    """One case on disk.

    Attributes:
        case_id: unique identifier (file stem without channel suffix).
        image_paths: one path per channel file (a single 4D file counts once; it is split on read).
        label_path: expected label file, or ``None`` for unlabeled cases.
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None = None


@dataclass
class DatasetInfo:
    """What :func:`discover_dataset` found.

    Attributes:
        name: dataset name (from ``dataset.json`` or the folder name).
        layout: ``"msd"``, ``"nnunet"`` or ``"folder"``.
        labels: class index -> name, 0 is background, indices consecutive.
        channel_names: channel index -> name (e.g. modality).
        cases: case records sorted by case id.
        root: dataset folder.
        file_ending: image file suffix (nnU-Net layout) or ``""``.
    """

    name: str
    layout: str
    labels: dict[int, str]
    channel_names: dict[int, str]
    cases: list[CaseRecord]
    root: Path
    file_ending: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def _strip(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def _image_files(folder: Path) -> list[Path]:
    """Image files in ``folder`` (hidden files such as macOS ``._x`` skipped), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _suffix(p))


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    return data


def _index_map(raw: Mapping, path: Path, key: str) -> dict[int, str]:
    """``{"0": "bg", ...}`` -> ``{0: "bg", ...}`` with validation."""
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: {key}: key {k!r} is not an integer") from None
    return dict(sorted(out.items()))


def _check_labels(labels: dict[int, str], path: Path) -> dict[int, str]:
    if not labels:
        raise DatasetError(f"{path}: labels: empty label map")
    if sorted(labels) != list(range(len(labels))):
        raise DatasetError(f"{path}: labels: values must be consecutive integers from 0 (got {sorted(labels)})")
    if max(labels) > 255:
        raise DatasetError(f"{path}: labels: more than 256 classes are not supported")
    return labels


def _discover_nnunet(root: Path, meta: dict, js: Path) -> DatasetInfo:
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DatasetError(f"{js}: missing key {key!r} (nnU-Net v2 dataset.json)")
    channels = _index_map(meta["channel_names"], js, "channel_names")
    labels: dict[int, str] = {}
    for name, value in meta["labels"].items():
        if isinstance(value, list | tuple):
            raise DatasetError(f"{js}: labels.{name}: region-based labels are not supported")
        try:
            labels[int(value)] = str(name)
        except (TypeError, ValueError):
            raise DatasetError(f"{js}: labels.{name}: expected an integer, got {value!r}") from None
    labels = _check_labels(dict(sorted(labels.items())), js)
    ending = str(meta["file_ending"])
    img_dir, lbl_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir}: folder not found (nnU-Net layout)")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    groups: dict[str, dict[int, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if m is None:
            if p.name.endswith(ending):
                raise DatasetError(f"{p}: file name lacks the _XXXX channel suffix (nnU-Net layout)")
            continue
        groups.setdefault(m["case"], {})[int(m["ch"])] = p
    cases = []
    for cid, chans in sorted(groups.items()):
        missing = [c for c in channels if c not in chans]
        if missing:
            want = img_dir / f"{cid}_{missing[0]:04d}{ending}"
            raise DatasetError(f"{want}: missing channel {missing[0]} ({channels[missing[0]]}) of case {cid}")
        cases.append(CaseRecord(cid, tuple(chans[c] for c in sorted(channels)), lbl_dir / f"{cid}{ending}"))
    return DatasetInfo(str(meta.get("name", root.name)), "nnunet", labels, channels, cases, root, ending)


def _discover_msd(root: Path, meta: dict, js: Path) -> DatasetInfo:
    if "labels" not in meta:
        raise DatasetError(f"{js}: missing key 'labels'")
    labels = _check_labels(_index_map(meta["labels"], js, "labels"), js)
    channels = _index_map(meta.get("modality", {"0": "image"}), js, "modality")
    cases = []
    if "training" in meta:
        for i, entry in enumerate(meta["training"]):
            if not isinstance(entry, Mapping) or "image" not in entry:
                raise DatasetError(f"{js}: training[{i}]: expected an object with 'image' and 'label'")
            img = (root / entry["image"]).resolve()
            lbl = (root / entry["label"]).resolve() if entry.get("label") else None
            cases.append(CaseRecord(_strip(img.name), (img,), lbl))
    else:
        img_dir = root / "imagesTr"
        if not img_dir.is_dir():
            raise DatasetError(f"{js}: no 'training' list and no imagesTr/ folder")
        for p in _image_files(img_dir):
            cases.append(CaseRecord(_strip(p.name), (p,), root / "labelsTr" / p.name))
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DatasetError(f"{js}: duplicate case ids: {dup[:5]}")
    return DatasetInfo(str(meta.get("name", root.name)), "msd", labels, channels, sorted(cases, key=_key), root)


def _key(c: CaseRecord) -> str:
    return c.case_id


def _discover_folder(root: Path) -> DatasetInfo:
    cases: list[CaseRecord] = []
    for imgs, lbls in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / imgs).is_dir():
            lbl_dir = root / lbls
            for p in _image_files(root / imgs):
                cases.append(CaseRecord(_strip(p.name), (p,), (lbl_dir / p.name) if lbl_dir.is_dir() else None))
            break
    else:
        files = _image_files(root)
        for img_sfx, seg_sfx in _PAIR_SUFFIXES:
            for p in files:
                stem = _strip(p.name)
                if stem.endswith(img_sfx):
                    cid = stem[: -len(img_sfx)]
                    cases.append(CaseRecord(cid, (p,), p.with_name(cid + seg_sfx + _suffix(p))))
            if cases:
                break
    if not cases:
        raise DatasetError(
            f"{root}: no dataset found: expected dataset.json (MSD or nnU-Net layout), images/ + labels/ "
            "folders, or *_img / *_seg file pairs with suffix " + "/".join(IMAGE_SUFFIXES)
        )
    labels: dict[int, str] | None = None
    for name in ("labels.json", "dataset.json"):
        if (root / name).is_file():
            raw = _load_json(root / name)
            if "labels" in raw:
                labels = _check_labels(_index_map(raw["labels"], root / name, "labels"), root / name)
                break
    if labels is None:
        values: set[int] = {0}
        for c in cases:
            if c.label_path is not None and c.label_path.is_file():
                try:
                    lbl = read_image(c.label_path, "label")
                except DatasetError:
                    continue  # reported by read_case, so that skip_bad can leave the case out
                values.update(int(v) for v in np.unique(sitk.GetArrayViewFromImage(lbl)))
        labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}
        if sorted(labels) != list(range(len(labels))):
            raise DatasetError(f"{root}: label values {sorted(values)} are not consecutive from 0; add labels.json")
        logger.info("%s: no labels.json; inferred labels %s from the label files", root, sorted(labels))
    return DatasetInfo(root.name, "folder", labels, {0: "image"}, sorted(cases, key=_key), root)


def discover_dataset(path: str | Path) -> DatasetInfo:
    """Find the layout, labels, channels and cases of a dataset folder.

    Args:
        path: dataset root (see the module docstring for the accepted layouts).

    Returns:
        A :class:`DatasetInfo`. Missing files of individual cases are not errors here; they are
        reported by :func:`read_case`, so that ``skip_bad`` ingestion can go on.

    Raises:
        DatasetError: the folder is missing, has no recognisable layout, or its ``dataset.json`` is invalid.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    js = root / "dataset.json"
    if js.is_file():
        meta = _load_json(js)
        if "channel_names" in meta or "file_ending" in meta:
            return _discover_nnunet(root, meta, js)
        if "training" in meta or "modality" in meta:
            return _discover_msd(root, meta, js)
    return _discover_folder(root)


def _split_channels(img: sitk.Image, path: Path) -> list[sitk.Image]:
    if img.GetNumberOfComponentsPerPixel() > 1:
        return [sitk.VectorIndexSelectionCast(img, i) for i in range(img.GetNumberOfComponentsPerPixel())]
    if img.GetDimension() == 3:
        return [img]
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        n = size[3]
        size[3] = 0
        return [sitk.Extract(img, size, [0, 0, 0, i]) for i in range(n)]
    raise DatasetError(f"{path}: expected a 3D image (or 4D multi-channel), got {img.GetDimension()}D")


def read_case(
    record: CaseRecord, labels: Mapping[int, str] | None = None, num_channels: int | None = None
) -> tuple[list[sitk.Image], sitk.Image | None]:
    """Read and validate one case.

    Args:
        record: the case to read.
        labels: allowed label values (class index -> name); when given, any other value is an error.
        num_channels: expected number of channels; when given, any other count is an error.

    Returns:
        ``(images, label)``: one 3D ``sitk.Image`` per channel (geometry kept) and the 3D label image
        (``None`` when ``record.label_path`` is ``None``).

    Raises:
        DatasetError: a file is missing, unreadable or corrupt; channel or label geometry differs from the
            first channel; the label holds a value not in ``labels``; the channel count is wrong.
    """
    pairs: list[tuple[Path, sitk.Image]] = []
    for p in record.image_paths:
        pairs.extend((p, ch) for ch in _split_channels(read_image(p, "image"), p))
    images = [img for _, img in pairs]
    first = record.image_paths[0]
    if num_channels is not None and len(images) != num_channels:
        raise DatasetError(f"{first}: case {record.case_id} has {len(images)} channels, expected {num_channels}")
    for p, img in pairs[1:]:
        check_geometry(images[0], img, p, "channel", first)
    if record.label_path is None:
        return images, None
    label = read_image(record.label_path, "label")
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{record.label_path}: expected a 3D scalar label image, got {label.GetDimension()}D")
    check_geometry(images[0], label, record.label_path, "label", first)
    arr = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DatasetError(f"{record.label_path}: label holds non-integer values")
    if labels is not None:
        values = np.unique(arr)
        bad = [v.item() for v in values if int(v) not in labels or v != int(v)]
        if bad:
            raise DatasetError(
                f"{record.label_path}: label values {bad[:10]} not in dataset.json labels {sorted(labels)}"
            )
    return images, label
