"""Download and unpack a Medical Segmentation Decathlon task with MONAI's download utilities.

Only :func:`fetch_msd` touches the network, and only when called (``raylearn data fetch msd TASK DIR``);
nothing in raylearn downloads data at import or run time. The archive is checked against MONAI's
published md5 when it comes from the official bucket, extracted into a temporary folder next to
``dest`` and renamed into place, so an interrupted fetch never leaves a half-unpacked task behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = ["MSD_BASE_URL", "MSD_MD5", "MSD_TASKS", "FetchError", "fetch_msd", "msd_task_name", "msd_url"]

from raylearn.data.readers import DatasetError

logger = logging.getLogger(__name__)

MSD_BASE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
#: md5 of each task archive, as published by MONAI (``monai.apps.DecathlonDataset.md5``).
MSD_MD5: dict[str, str] = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task04_Hippocampus": "9d24dba78a72977dbd1d2e110310f31b",
    "Task05_Prostate": "35138f08b1efaef89d7424d2bcc928db",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "Task08_HepaticVessel": "641d79e80ec66453921d997fbf12a29c",
    "Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
    "Task10_Colon": "bad7a188931dc2f6acf72b08eb6202d0",
}
MSD_TASKS: tuple[str, ...] = tuple(MSD_MD5)


class FetchError(DatasetError):
    """Unknown task, or a download or extraction failed; the message names the URL or file and the problem.

    A :class:`~raylearn.data.readers.DatasetError` (hence a ``ValueError``), so CLI handlers of bad
    datasets report it as one line.
    """


def msd_task_name(task: str) -> str:
    """Canonical task name (``"Task04_Hippocampus"``, ``"task04_hippocampus"`` and ``"Task04"`` all map to the first).

    Raises:
        FetchError: not one of the ten MSD tasks.
    """
    key = task.strip().lower()
    for name in MSD_TASKS:
        if key in (name.lower(), name.split("_")[0].lower()):
            return name
    raise FetchError(f"unknown MSD task {task!r}; expected one of: {', '.join(MSD_TASKS)}")


def msd_url(task: str, base_url: str = MSD_BASE_URL) -> str:
    """URL of a task archive: ``{base_url}/{task}.tar``."""
    return f"{base_url.rstrip('/')}/{msd_task_name(task)}.tar"


def fetch_msd(
    task: str,
    dest: str | Path,
    base_url: str | None = MSD_BASE_URL,
    md5: str | None = None,
    progress: bool = True,
    keep_archive: bool = False,
) -> Path:
    """Download ``{base_url}/{task}.tar`` and unpack it to ``dest/{task}`` (MSD layout).

    Args:
        task: MSD task name (``Task01_BrainTumour`` ... ``Task10_Colon``; ``Task04`` also accepted).
        dest: parent folder; the task lands in ``dest/{task}``.
        base_url: where the archives live (a mirror, a local HTTP server or a ``file://`` folder URL);
            ``None`` means the official bucket ``MSD_BASE_URL``.
        md5: expected md5 of the archive. ``None``: MONAI's published md5 when ``base_url`` is the official
            bucket, no check otherwise.
        progress: show MONAI's download progress bar.
        keep_archive: keep ``dest/{task}.tar`` after unpacking.

    Returns:
        The task folder (holding ``dataset.json``). Nothing is downloaded when it already exists.

    Raises:
        FetchError: unknown task name; download, checksum or extraction failed; or the archive holds no
            ``{task}/dataset.json``.
    """
    name = msd_task_name(task)
    base_url = base_url or MSD_BASE_URL
    dest = Path(dest).expanduser().resolve()
    out = dest / name
    if (out / "dataset.json").is_file():
        logger.info("%s already present; nothing to fetch", out)
        return out
    if out.exists() and any(out.iterdir()):
        raise FetchError(f"{out}: exists without dataset.json (incomplete?); delete it and fetch again")
    try:
        from monai.apps.utils import download_and_extract, extractall
    except ImportError as err:  # pragma: no cover - monai is a core dependency
        raise ImportError("fetch_msd needs MONAI: pip install monai") from err
    url = msd_url(name, base_url)
    if md5 is None and base_url.rstrip("/") == MSD_BASE_URL:
        md5 = MSD_MD5[name]
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"{name}.tar"
    work = dest / f".{name}.extract-{uuid.uuid4().hex[:8]}"
    try:
        if url.startswith("file:"):  # MONAI's downloader speaks http(s) only: copy, then MONAI's extractall
            src = Path(url2pathname(urlparse(url).path))
            if not src.is_file():
                raise FetchError(f"{url}: file not found")
            shutil.copyfile(src, archive)
            extractall(archive, output_dir=work, hash_val=md5, hash_type="md5")
        else:
            download_and_extract(
                url, filepath=archive, output_dir=work, hash_val=md5, hash_type="md5", progress=progress
            )
        if not (work / name / "dataset.json").is_file():
            raise FetchError(f"{url}: archive does not contain {name}/dataset.json")
        if out.exists():
            out.rmdir()
        os.rename(work / name, out)
    except FetchError:
        raise
    except Exception as err:  # MONAI raises bare Exception / RuntimeError / URLError; report them uniformly
        detail = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise FetchError(f"{url}: fetch failed: {detail}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not keep_archive and archive.is_file():
            archive.unlink()  # also after a failure: MONAI would otherwise reuse an unchecked partial file
    logger.info("fetched %s into %s", name, out)
    return out
