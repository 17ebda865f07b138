"""Verified access to the real dataset files that the scenarios read.

Every file the scenarios read is listed in ``FILES`` with its SHA-256, size
and public download URLs. ``ensure_file`` returns the local path of a file
under the data root after checking its SHA-256. When the file is missing, it
downloads the file (or the archive that contains it), verifies it and stores
it under the data root. A file whose hash differs is never used: it raises
``ChecksumError``.

The data root comes from the caller's configuration, else from the
``FEDSEAL_DATA_DIR`` environment variable, else ``~/.cache/fedseal/datasets``.
Setting ``FEDSEAL_OFFLINE=1`` disables every download.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows has no fcntl, so concurrent downloads there are not coordinated.
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FEDSEAL_DATA_DIR"
OFFLINE_ENV = "FEDSEAL_OFFLINE"
DEFAULT_DATA_ROOT = Path("~/.cache/fedseal/datasets")

_CHUNK_BYTES = 1 << 20
_PROGRESS_INTERVAL_S = 5.0
_DOWNLOAD_TIMEOUT_S = 60.0
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)
_UTF8_BOM = b"\xef\xbb\xbf"


class DatasetError(RuntimeError):
    """Base class for errors about dataset files."""


class ChecksumError(DatasetError):
    """A file is present but its SHA-256 differs from the registered one (corrupt or truncated)."""


class DatasetUnavailableError(DatasetError):
    """A file is missing and cannot be downloaded, because downloads are disabled or failed."""


@dataclass(frozen=True)
class DatasetFile:
    """One registered dataset file.

    Parameters
    ----------
    key : str
        Registry key, such as ``"imaging/breastmnist"``.
    relpath : str
        Location under the data root, with ``/`` separators.
    sha256 : str
        Hex SHA-256 of the file as stored under the data root.
    size : int
        Size in bytes of the stored file.
    urls : tuple of str
        Download URLs, tried in order. Empty when no public URL serves the file.
    archive_member : str or None
        Path of the file inside the zip archive that ``urls`` serve, or None
        when the URLs serve the file itself.
    normalize_text : bool
        Strip a UTF-8 byte-order mark and convert CRLF line endings to LF
        after extraction, before the hash is checked.
    manual_source : str
        Extra advice for getting the file by hand, shown when it is missing.
    """

    key: str
    relpath: str
    sha256: str
    size: int
    urls: tuple[str, ...] = ()
    archive_member: str | None = None
    normalize_text: bool = False
    manual_source: str = ""


_FRAUD_URLS = (
    "https://zenodo.org/records/7395559/files/creditcard.csv?download=1",
    "https://storage.googleapis.com/download.tensorflow.org/data/creditcard.csv",
)
_AI4I_URLS = ("https://archive.ics.uci.edu/static/public/601/ai4i+2020+predictive+maintenance+dataset.zip",)
_MOVIELENS_URLS = ("https://files.grouplens.org/datasets/movielens/ml-100k.zip",)

_REGISTERED_FILES = (
    # ULB credit-card fraud, 284,807 rows. The same bytes are on Kaggle
    # (mlg-ulb/creditcardfraud), Zenodo record 7395559 and TensorFlow storage.
    DatasetFile(
        key="fraud/full",
        relpath="fraud/creditcard.csv",
        sha256="76274b691b16a6c49d3f159c883398e03ccd6d1ee12d9d8ee38f4b4b98551a89",
        size=150_828_752,
        urls=_FRAUD_URLS,
    ),
    # Every fraud row of fraud/full plus 49,508 non-fraud rows drawn with
    # numpy.random.default_rng(0), original lines byte for byte, gzip -n -9.
    DatasetFile(
        key="fraud/sub50k",
        relpath="fraud/creditcard_ulb_sub50k.csv.gz",
        sha256="c12f6903cf4749cb6e4acf3dc4a3aeb3daf83576cfd12a888d7b464b5be23328",
        size=12_081_597,
        manual_source=(
            "No public URL serves this 50,000-row subsample. Download the full file "
            f"(key 'fraud/full') from {_FRAUD_URLS[0]} instead, because it contains every row of the subsample."
        ),
    ),
    # AI4I 2020 Predictive Maintenance, UCI dataset 601, CC BY 4.0.
    DatasetFile(
        key="maintenance/ai4i2020",
        relpath="maintenance/ai4i2020.csv",
        sha256="ec4ed737b27c4e65730e3b875626ddb4db005d79733f0fc1f59d72db467cd670",
        size=508_146,
        urls=_AI4I_URLS,
        archive_member="ai4i2020.csv",
        normalize_text=True,
    ),
    # MedMNIST 28x28 files, Zenodo record 10519652, CC BY 4.0.
    DatasetFile(
        key="imaging/pneumoniamnist",
        relpath="imaging/pneumoniamnist.npz",
        sha256="e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8",
        size=4_170_669,
        urls=("https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",),
    ),
    DatasetFile(
        key="imaging/breastmnist",
        relpath="imaging/breastmnist.npz",
        sha256="3a22d2a4625e7dd8903f0f59030e81a3d0c222bece2e5e10927456cb50efdec1",
        size=559_580,
        urls=("https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",),
    ),
    # MovieLens 100K. The GroupLens licence allows research use only and
    # forbids redistribution without permission.
    DatasetFile(
        key="recommendations/u.data",
        relpath="recommendations/ml-100k/u.data",
        sha256="06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        size=1_979_173,
        urls=_MOVIELENS_URLS,
        archive_member="ml-100k/u.data",
    ),
    DatasetFile(
        key="recommendations/u.item",
        relpath="recommendations/ml-100k/u.item",
        sha256="553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        size=236_344,
        urls=_MOVIELENS_URLS,
        archive_member="ml-100k/u.item",
    ),
    DatasetFile(
        key="recommendations/u.user",
        relpath="recommendations/ml-100k/u.user",
        sha256="f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
        size=22_628,
        urls=_MOVIELENS_URLS,
        archive_member="ml-100k/u.user",
    ),
)

FILES: dict[str, DatasetFile] = {entry.key: entry for entry in _REGISTERED_FILES}

# SHA-256 per (path, size, mtime in ns), so each file is hashed at most once per
# process unless it changes on disk.
_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}


def resolve_data_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """Return the absolute data root.

    Parameters
    ----------
    configured : str or os.PathLike, optional
        Data root from the caller's configuration. It wins when given and not empty.

    Returns
    -------
    Path
        ``configured``, else ``$FEDSEAL_DATA_DIR`` when set and not empty,
        else ``~/.cache/fedseal/datasets``, with ``~`` expanded.
    """
    if configured is not None and str(configured) != "":
        root = Path(configured)
    elif os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV])
    else:
        root = DEFAULT_DATA_ROOT

    return root.expanduser().absolute()


def ensure_file(key: str, data_root: Path, allow_download: bool = True) -> Path:
    """Return the verified local path of a registered file, downloading it when missing.

    Parameters
    ----------
    key : str
        A key of ``FILES``.
    data_root : Path
        Folder that contains the dataset tree (see ``resolve_data_root``).
    allow_download : bool
        Whether a missing file may be downloaded. ``FEDSEAL_OFFLINE=1``
        disables downloads even when this is True.

    Returns
    -------
    Path
        ``data_root / FILES[key].relpath``, whose SHA-256 matches the registry.

    Raises
    ------
    ValueError
        If ``key`` is not registered.
    ChecksumError
        If the present file, or a downloaded one, has the wrong SHA-256.
    DatasetUnavailableError
        If the file is missing and downloads are disabled or failed.
    """
    entry = _lookup(key)
    path = _local_path(entry, data_root)

    if path.exists():
        _verify(path, entry)
        return path

    if not allow_download or _offline():
        raise DatasetUnavailableError(_missing_message(entry, path, _disabled_reason(allow_download)))

    return _download(entry, data_root)


def ensure_first_available(
    keys: Sequence[str], data_root: Path, allow_download: bool = True
) -> tuple[str, Path]:
    """Return the first of ``keys`` whose file is present and valid, downloading one when none is present.

    Parameters
    ----------
    keys : sequence of str
        Keys of ``FILES`` in order of preference, such as
        ``["fraud/sub50k", "fraud/full"]``.
    data_root : Path
        Folder that contains the dataset tree.
    allow_download : bool
        Whether the first key that has download URLs may be downloaded when
        no file is present.

    Returns
    -------
    tuple of (str, Path)
        The chosen key and its verified local path.

    Raises
    ------
    ChecksumError
        If no file is valid and at least one present file has the wrong
        SHA-256. A corrupt file is never skipped in favour of a download.
    DatasetUnavailableError
        If no file is present and none can be downloaded.
    """
    if not keys:
        raise ValueError("keys is empty. Pass at least one key of scenarios.datasets.FILES.")

    entries = [_lookup(key) for key in keys]
    checksum_errors: list[ChecksumError] = []

    for entry in entries:
        path = _local_path(entry, data_root)
        if not path.exists():
            continue
        try:
            _verify(path, entry)
        except ChecksumError as error:
            logger.warning("Skipping %s: %s", entry.key, error)
            checksum_errors.append(error)
            continue
        return entry.key, path

    if checksum_errors:
        raise checksum_errors[0]

    return _download_first(entries, data_root, allow_download)


def _download_first(
    entries: list[DatasetFile], data_root: Path, allow_download: bool
) -> tuple[str, Path]:
    """Download the first entry that has URLs, or raise an error whose message lists every path looked for."""
    looked_for = ", ".join(str(_local_path(entry, data_root)) for entry in entries)
    downloadable = [entry for entry in entries if entry.urls]

    if not downloadable:
        raise DatasetUnavailableError(
            f"None of the dataset files {looked_for} was found, and none has a download URL. "
            f"Set {DATA_DIR_ENV} to a folder that contains one of them."
        )

    entry = downloadable[0]
    path = _local_path(entry, data_root)

    if not allow_download or _offline():
        raise DatasetUnavailableError(
            f"None of the dataset files {looked_for} was found, and {_disabled_reason(allow_download)}. "
            f"Set {DATA_DIR_ENV} to a folder that contains one of them, "
            f"or download {entry.urls[0]} by hand and save it as {path}."
        )

    return entry.key, _download(entry, data_root)


def _lookup(key: str) -> DatasetFile:
    try:
        return FILES[key]
    except KeyError:
        raise ValueError(f"Unknown dataset key {key!r}. Registered keys: {', '.join(sorted(FILES))}.") from None


def _local_path(entry: DatasetFile, data_root: Path) -> Path:
    return Path(data_root).expanduser().absolute().joinpath(*entry.relpath.split("/"))


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}


def _disabled_reason(allow_download: bool) -> str:
    if not allow_download:
        return "downloads are disabled (allow_download=False)"
    return f"downloads are disabled ({OFFLINE_ENV}={os.environ.get(OFFLINE_ENV)})"


def _missing_message(entry: DatasetFile, path: Path, reason: str) -> str:
    """Build the error message for a missing file, naming the path, the reason and the fix."""
    message = f"Dataset file {entry.key!r} was not found at {path}, and {reason}. "
    message += f"Set {DATA_DIR_ENV} to a folder that contains {entry.relpath}"

    if entry.urls and entry.archive_member:
        message += f", or download {entry.urls[0]} by hand and extract {entry.archive_member} to {path}."
    elif entry.urls:
        message += f", or download {entry.urls[0]} by hand and save it as {path}."
    else:
        message += "."

    if entry.manual_source:
        message += f" {entry.manual_source}"
    return message


def _sha256_of_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _cached_sha256(path: Path) -> str:
    """Return the SHA-256 of ``path``, hashing it only when its size or mtime changed."""
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)

    digest = _DIGEST_CACHE.get(cache_key)
    if digest is None:
        digest = _sha256_of_file(path)
        _DIGEST_CACHE[cache_key] = digest
    return digest


def _verify(path: Path, entry: DatasetFile) -> None:
    """Raise ChecksumError unless the file at ``path`` has the registered SHA-256."""
    actual = _cached_sha256(path)
    if actual == entry.sha256:
        return

    size = path.stat().st_size
    raise ChecksumError(
        f"Dataset file {path} is corrupt or truncated: expected SHA-256 {entry.sha256} "
        f"({entry.size} bytes), got {actual} ({size} bytes). "
        f"Delete the file to download it again, or set {DATA_DIR_ENV} to a folder with a good copy."
    )


@contextlib.contextmanager
def _download_lock(entry: DatasetFile, path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` so concurrent processes download a file once."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.with_name(path.name + ".lock").open("w")
    except OSError as error:
        raise DatasetUnavailableError(
            f"Dataset file {entry.key!r} is missing at {path} and cannot be downloaded there ({error}). "
            f"Set {DATA_DIR_ENV} to a writable folder, or to one that contains {entry.relpath}."
        ) from error

    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _download(entry: DatasetFile, data_root: Path) -> Path:
    """Download ``entry`` under ``data_root``, verify it and return its path."""
    path = _local_path(entry, data_root)

    with _download_lock(entry, path):
        # Another process may have finished the same download while this one waited.
        if path.exists():
            _verify(path, entry)
            return path
        _download_from_urls(entry, data_root)

    return path


def _download_from_urls(entry: DatasetFile, data_root: Path) -> None:
    """Try each URL of ``entry`` in order until one yields a verified file."""
    path = _local_path(entry, data_root)
    failures: list[str] = []
    checksum_error: ChecksumError | None = None

    for url in entry.urls:
        try:
            if entry.archive_member is None:
                _fetch_verified(url, entry, path)
            else:
                _fetch_from_archive(url, entry, data_root)
            return
        except _NETWORK_ERRORS as error:
            logger.warning("Download of %s from %s failed: %s", entry.key, url, error)
            failures.append(f"{url}: {error}")
        except ChecksumError as error:
            logger.warning("Download of %s from %s failed verification: %s", entry.key, url, error)
            checksum_error = error

    if checksum_error is not None:
        raise checksum_error

    reason = "the download failed (" + "; ".join(failures) + ")"
    raise DatasetUnavailableError(_missing_message(entry, path, reason))


def _fetch_verified(url: str, entry: DatasetFile, path: Path) -> None:
    """Stream ``url`` into ``<path>.part``, check its SHA-256 and rename it to ``path``."""
    part = path.with_name(path.name + ".part")

    try:
        actual = _stream_to_file(url, part, entry.key)
        if actual != entry.sha256:
            raise ChecksumError(
                f"Download of {entry.key!r} from {url} is corrupt: expected SHA-256 {entry.sha256}, "
                f"got {actual} ({part.stat().st_size} bytes). The partial file was deleted. "
                f"Retry later, or download the file by hand to {path}."
            )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)

    _DIGEST_CACHE[_stat_key(path)] = actual


def _fetch_from_archive(url: str, entry: DatasetFile, data_root: Path) -> None:
    """Download the zip at ``url`` and extract ``entry`` plus every missing registered sibling."""
    path = _local_path(entry, data_root)
    archive_name = url.rsplit("/", 1)[-1].split("?", 1)[0] or "archive.zip"
    archive_part = path.with_name(archive_name + ".part")

    try:
        _stream_to_file(url, archive_part, entry.key)
        try:
            with zipfile.ZipFile(archive_part) as archive:
                _extract_verified(archive, url, entry, path)
                _extract_siblings(archive, url, entry, data_root)
        except zipfile.BadZipFile as error:
            raise ChecksumError(
                f"Download of {entry.key!r} from {url} is not a valid zip archive ({error}). "
                f"Retry later, or extract {entry.archive_member} by hand to {path}."
            ) from error
    finally:
        archive_part.unlink(missing_ok=True)


def _extract_siblings(archive: zipfile.ZipFile, url: str, entry: DatasetFile, data_root: Path) -> None:
    """Extract the other registered members of the same archive that are missing, so it is downloaded once."""
    for sibling in FILES.values():
        if sibling.key == entry.key or sibling.urls != entry.urls or sibling.archive_member is None:
            continue

        sibling_path = _local_path(sibling, data_root)
        if sibling_path.exists():
            continue

        try:
            sibling_path.parent.mkdir(parents=True, exist_ok=True)
            _extract_verified(archive, url, sibling, sibling_path)
        except (DatasetError, OSError) as error:
            # The requested file is already in place, and a sibling is fetched again when it is requested.
            logger.warning("Could not extract %s from %s: %s", sibling.key, url, error)


def _extract_verified(archive: zipfile.ZipFile, url: str, entry: DatasetFile, path: Path) -> None:
    """Extract ``entry.archive_member`` to ``<path>.part``, normalise it if registered, verify and rename."""
    member = entry.archive_member
    if member not in archive.namelist():
        raise DatasetError(
            f"Archive {url} has no member {member!r} for {entry.key!r}. Its members are: "
            f"{', '.join(archive.namelist()[:20])}. The archive layout may have changed, so "
            f"extract the file by hand to {path}."
        )

    part = path.with_name(path.name + ".part")
    try:
        payload = archive.read(member)
        if entry.normalize_text:
            # NOTE: the registered AI4I hash is of a copy whose BOM and CRLF endings were
            # removed. Byte identity of this normalisation with the UCI zip is unverified.
            payload = _normalize_text(payload)

        actual = hashlib.sha256(payload).hexdigest()
        if actual != entry.sha256:
            raise ChecksumError(
                f"Member {member!r} of {url} is corrupt or changed: expected SHA-256 {entry.sha256}, "
                f"got {actual} ({len(payload)} bytes). The partial file was deleted. "
                f"Retry later, or set {DATA_DIR_ENV} to a folder with a good copy of {entry.relpath}."
            )

        part.write_bytes(payload)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)

    logger.info("Extracted %s from %s to %s", entry.key, url, path)
    _DIGEST_CACHE[_stat_key(path)] = actual


def _normalize_text(payload: bytes) -> bytes:
    """Strip a leading UTF-8 byte-order mark and convert CRLF line endings to LF."""
    payload = payload.removeprefix(_UTF8_BOM)
    return payload.replace(b"\r\n", b"\n")


def _stream_to_file(url: str, part: Path, key: str) -> str:
    """Download ``url`` into ``part``, logging progress, and return the SHA-256 of the bytes written."""
    logger.info("Downloading %s from %s to %s", key, url, part)
    started = time.monotonic()
    last_report = started
    digest = hashlib.sha256()
    done = 0

    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, part.open("wb") as out:
        total = _content_length(response)
        while chunk := response.read(_CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)

            now = time.monotonic()
            if now - last_report >= _PROGRESS_INTERVAL_S:
                logger.info("Downloading %s: %d / %s bytes", key, done, total if total is not None else "unknown")
                last_report = now

    logger.info("Downloaded %s: %d bytes in %.1f s", key, done, time.monotonic() - started)
    return digest.hexdigest()


def _content_length(response: object) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value and value.isdigit() else None


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)
