"""Tests for scenarios.datasets: verification, offline errors and downloads, without network access.

The real files come from the folder in FEDSEAL_DATA_DIR. Downloads are served
from local bytes through a patched ``urllib.request.urlopen``.
"""

from __future__ import annotations

import email.message
import hashlib
import io
import os
import shutil
import urllib.error
import urllib.request
import urllib.response
import zipfile
from pathlib import Path

import pytest

from scenarios import datasets
from scenarios.datasets import (
    DATA_DIR_ENV,
    FILES,
    ChecksumError,
    DatasetError,
    DatasetFile,
    DatasetUnavailableError,
    ensure_file,
    ensure_first_available,
    resolve_data_root,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that reaches urlopen without serving local bytes, and clear offline mode."""

    def reject_network(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected network access to {url}")

    monkeypatch.setattr(urllib.request, "urlopen", reject_network)
    monkeypatch.delenv(datasets.OFFLINE_ENV, raising=False)


def copy_real(real_root: Path, key: str, target_root: Path) -> Path:
    """Copy one registered file from the real data root into ``target_root`` and return the copy."""
    relpath = FILES[key].relpath
    target = target_root / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(real_root / relpath, target)
    return target


def serve(monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes | Exception]) -> list[str]:
    """Make urlopen return ``payloads[url]`` (or raise it) and return the list of URLs requested."""
    requested: list[str] = []

    def fake_urlopen(url: str, *args: object, **kwargs: object) -> urllib.response.addinfourl:
        requested.append(url)
        payload = payloads[url]
        if isinstance(payload, Exception):
            raise payload
        headers = email.message.Message()
        headers["Content-Length"] = str(len(payload))
        return urllib.response.addinfourl(io.BytesIO(payload), headers, url, 200)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftover_parts(data_root: Path) -> list[Path]:
    return sorted(data_root.rglob("*.part"))


def test_registry_matches_real_files(data_root: Path) -> None:
    present = [key for key, entry in FILES.items() if (data_root / entry.relpath).exists()]

    assert "fraud/sub50k" in present
    assert "imaging/breastmnist" in present
    for key in present:
        path = ensure_file(key, data_root, allow_download=False)
        assert path.stat().st_size == FILES[key].size


def test_good_copy_verifies(data_root: Path, tmp_path: Path) -> None:
    copy = copy_real(data_root, "imaging/breastmnist", tmp_path)

    assert ensure_file("imaging/breastmnist", tmp_path, allow_download=False) == copy


def test_file_hashed_once_per_process(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_real(data_root, "imaging/breastmnist", tmp_path)
    calls: list[Path] = []
    real_hash = datasets._sha256_of_file
    monkeypatch.setattr(datasets, "_sha256_of_file", lambda path: calls.append(path) or real_hash(path))

    ensure_file("imaging/breastmnist", tmp_path, allow_download=False)
    ensure_file("imaging/breastmnist", tmp_path, allow_download=False)
    assert calls == [copy]

    # A changed mtime means the file may have changed, so it is hashed again.
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    ensure_file("imaging/breastmnist", tmp_path, allow_download=False)
    assert calls == [copy, copy]


def test_truncated_file_raises_checksum_error(data_root: Path, tmp_path: Path) -> None:
    copy = copy_real(data_root, "maintenance/ai4i2020", tmp_path)
    truncated = copy.read_bytes()[:100_000]
    copy.write_bytes(truncated)

    with pytest.raises(ChecksumError) as caught:
        ensure_file("maintenance/ai4i2020", tmp_path)

    message = str(caught.value)
    assert str(copy) in message
    assert FILES["maintenance/ai4i2020"].sha256 in message
    assert sha256(truncated) in message
    assert "Delete the file" in message
    assert DATA_DIR_ENV in message


def test_corrupted_byte_raises_checksum_error(data_root: Path, tmp_path: Path) -> None:
    copy = copy_real(data_root, "imaging/breastmnist", tmp_path)
    corrupted = bytearray(copy.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    copy.write_bytes(bytes(corrupted))

    with pytest.raises(ChecksumError) as caught:
        ensure_file("imaging/breastmnist", tmp_path)

    assert str(copy) in str(caught.value)
    assert sha256(bytes(corrupted)) in str(caught.value)
    assert copy.read_bytes() == bytes(corrupted)


def test_missing_file_downloads_disabled(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as caught:
        ensure_file("imaging/pneumoniamnist", tmp_path, allow_download=False)

    message = str(caught.value)
    assert str(tmp_path / "imaging" / "pneumoniamnist.npz") in message
    assert DATA_DIR_ENV in message
    assert FILES["imaging/pneumoniamnist"].urls[0] in message
    assert "allow_download=False" in message


def test_missing_file_offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(datasets.OFFLINE_ENV, "1")

    with pytest.raises(DatasetUnavailableError) as caught:
        ensure_file("recommendations/u.data", tmp_path)

    message = str(caught.value)
    assert str(tmp_path / "recommendations" / "ml-100k" / "u.data") in message
    assert DATA_DIR_ENV in message
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message
    assert "extract ml-100k/u.data" in message
    assert "FEDSEAL_OFFLINE=1" in message


def test_missing_file_network_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = FILES["imaging/breastmnist"].urls[0]
    serve(monkeypatch, {url: urllib.error.URLError("Name or service not known")})

    with pytest.raises(DatasetUnavailableError) as caught:
        ensure_file("imaging/breastmnist", tmp_path)

    message = str(caught.value)
    assert str(tmp_path / "imaging" / "breastmnist.npz") in message
    assert DATA_DIR_ENV in message
    assert url in message
    assert "Name or service not known" in message
    assert leftover_parts(tmp_path) == []


def test_subsample_without_url_names_full_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as caught:
        ensure_file("fraud/sub50k", tmp_path)

    message = str(caught.value)
    assert str(tmp_path / "fraud" / "creditcard_ulb_sub50k.csv.gz") in message
    assert "https://zenodo.org/records/7395559/files/creditcard.csv?download=1" in message


def test_download_writes_verified_file(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = (data_root / FILES["imaging/breastmnist"].relpath).read_bytes()
    url = FILES["imaging/breastmnist"].urls[0]
    requested = serve(monkeypatch, {url: payload})

    path = ensure_file("imaging/breastmnist", tmp_path)

    assert requested == [url]
    assert path == tmp_path / "imaging" / "breastmnist.npz"
    assert path.read_bytes() == payload
    assert leftover_parts(tmp_path) == []


def test_download_corrupt_payload_leaves_no_file(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = bytearray((data_root / FILES["imaging/breastmnist"].relpath).read_bytes())
    payload[1000] ^= 0xFF
    url = FILES["imaging/breastmnist"].urls[0]
    serve(monkeypatch, {url: bytes(payload)})

    with pytest.raises(ChecksumError) as caught:
        ensure_file("imaging/breastmnist", tmp_path)

    assert sha256(bytes(payload)) in str(caught.value)
    assert FILES["imaging/breastmnist"].sha256 in str(caught.value)
    assert not (tmp_path / "imaging" / "breastmnist.npz").exists()
    assert leftover_parts(tmp_path) == []


def test_download_falls_back_to_next_url(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = FILES["imaging/breastmnist"]
    mirrors = ("https://mirror-a.example/breastmnist.npz", "https://mirror-b.example/breastmnist.npz")
    entry = DatasetFile(
        key="test/breast", relpath="test/breastmnist.npz", sha256=original.sha256, size=original.size, urls=mirrors
    )
    monkeypatch.setitem(FILES, entry.key, entry)
    payload = (data_root / original.relpath).read_bytes()
    requested = serve(monkeypatch, {mirrors[0]: TimeoutError("timed out"), mirrors[1]: payload})

    path = ensure_file("test/breast", tmp_path)

    assert requested == list(mirrors)
    assert path.read_bytes() == payload


def test_archive_member_normalised_and_verified(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = (data_root / FILES["maintenance/ai4i2020"].relpath).read_bytes()
    # A copy with a byte-order mark and CRLF line endings, both of which the registered file lacks.
    as_published = b"\xef\xbb\xbf" + stored.replace(b"\n", b"\r\n")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ai4i2020.csv", as_published)
    url = FILES["maintenance/ai4i2020"].urls[0]
    serve(monkeypatch, {url: archive.getvalue()})

    path = ensure_file("maintenance/ai4i2020", tmp_path)

    assert path.read_bytes() == stored
    assert leftover_parts(tmp_path) == []


def test_archive_download_extracts_siblings(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ["recommendations/u.data", "recommendations/u.item", "recommendations/u.user"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for key in keys:
            zipped.writestr(FILES[key].archive_member, (data_root / FILES[key].relpath).read_bytes())
    url = FILES["recommendations/u.data"].urls[0]
    requested = serve(monkeypatch, {url: archive.getvalue()})

    ensure_file("recommendations/u.data", tmp_path)
    for key in keys:
        ensure_file(key, tmp_path, allow_download=False)

    assert requested == [url]
    assert not (tmp_path / "recommendations" / "ml-100k" / "ml-100k.zip.part").exists()


def test_archive_without_member_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("readme.txt", b"no data here")
    url = FILES["maintenance/ai4i2020"].urls[0]
    serve(monkeypatch, {url: archive.getvalue()})

    with pytest.raises(DatasetError, match="has no member 'ai4i2020.csv'.*readme.txt"):
        ensure_file("maintenance/ai4i2020", tmp_path)
    assert leftover_parts(tmp_path) == []


def test_first_available_prefers_present_file(data_root: Path, tmp_path: Path) -> None:
    copy = copy_real(data_root, "fraud/sub50k", tmp_path)

    assert ensure_first_available(["fraud/full", "fraud/sub50k"], tmp_path) == ("fraud/sub50k", copy)


def test_first_available_offline_names_every_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as caught:
        ensure_first_available(["fraud/sub50k", "fraud/full"], tmp_path, allow_download=False)

    message = str(caught.value)
    assert str(tmp_path / "fraud" / "creditcard_ulb_sub50k.csv.gz") in message
    assert str(tmp_path / "fraud" / "creditcard.csv") in message
    assert DATA_DIR_ENV in message
    assert FILES["fraud/full"].urls[0] in message


def test_first_available_downloads_first_with_url(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = FILES["imaging/breastmnist"]
    no_url = DatasetFile(key="test/local", relpath="test/local.npz", sha256=original.sha256, size=original.size)
    with_url = DatasetFile(
        key="test/remote", relpath="test/remote.npz", sha256=original.sha256, size=original.size,
        urls=("https://mirror.example/breastmnist.npz",),
    )
    monkeypatch.setitem(FILES, no_url.key, no_url)
    monkeypatch.setitem(FILES, with_url.key, with_url)
    serve(monkeypatch, {with_url.urls[0]: (data_root / original.relpath).read_bytes()})

    key, path = ensure_first_available(["test/local", "test/remote"], tmp_path)

    assert key == "test/remote"
    assert path == tmp_path / "test" / "remote.npz"


def test_first_available_raises_on_corrupt_file(data_root: Path, tmp_path: Path) -> None:
    copy = copy_real(data_root, "fraud/sub50k", tmp_path)
    copy.write_bytes(copy.read_bytes()[:1000])

    with pytest.raises(ChecksumError, match="creditcard_ulb_sub50k.csv.gz"):
        ensure_first_available(["fraud/sub50k", "fraud/full"], tmp_path)


def test_unknown_key_lists_registered_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown dataset key 'fraud/typo'. Registered keys: fraud/full, fraud/sub50k"):
        ensure_file("fraud/typo", tmp_path)


def test_resolve_data_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "fedseal" / "datasets"

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert resolve_data_root() == tmp_path / "from-env"
    assert resolve_data_root("") == tmp_path / "from-env"

    assert resolve_data_root(tmp_path / "configured") == tmp_path / "configured"
    assert resolve_data_root("~/data") == tmp_path / "home" / "data"
