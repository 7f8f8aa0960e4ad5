"""Tests of diffad.download against a loopback HTTP server (no internet)."""

import hashlib
import re
import socket

import numpy as np
import pytest
from download_server import LoopbackServer, clear_proxy_environment

from diffad.download import ChecksumError, DownloadError, download_url, file_hash

CONTENT = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA256 = hashlib.sha256(CONTENT).hexdigest()
MD5 = hashlib.md5(CONTENT).hexdigest()


@pytest.fixture
def server(monkeypatch):
    clear_proxy_environment(monkeypatch)
    with LoopbackServer() as running:
        running.files["blob.bin"] = CONTENT
        yield running


def test_full_download_verifies_and_leaves_no_part_file(server, tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    result = download_url(
        server.url("blob.bin"), dest, expected_size=len(CONTENT), sha256=SHA256, md5=MD5, chunk_size=1 << 15
    )
    assert result == dest
    assert dest.read_bytes() == CONTENT
    assert not (tmp_path / "sub" / "blob.bin.part").exists()
    assert [(r["range"], r["status"], r["sent"]) for r in server.requests] == [(None, 200, len(CONTENT))]


def test_existing_verified_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(CONTENT)
    download_url(server.url("blob.bin"), dest, sha256=SHA256)
    assert server.requests == []


def test_existing_corrupt_file_is_replaced(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"not the right bytes")
    download_url(server.url("blob.bin"), dest, sha256=SHA256)
    assert dest.read_bytes() == CONTENT
    assert len(server.requests) == 1


def test_resume_requests_only_the_missing_bytes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    done = 123_457
    (tmp_path / "blob.bin.part").write_bytes(CONTENT[:done])
    download_url(server.url("blob.bin"), dest, expected_size=len(CONTENT), sha256=SHA256)
    assert dest.read_bytes() == CONTENT
    [request] = server.requests
    assert request["range"] == f"bytes={done}-"
    assert request["status"] == 206
    assert request["sent"] == len(CONTENT) - done


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    # A wrong prefix: had it been appended to, the checksum would fail.
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 5000)
    download_url(server.url("blob.bin"), dest, sha256=SHA256)
    assert dest.read_bytes() == CONTENT
    [request] = server.requests
    assert request["range"] == "bytes=5000-"
    assert request["status"] == 200 and request["sent"] == len(CONTENT)


def test_checksum_mismatch_names_file_and_both_hashes_and_deletes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=rf"sha256 mismatch for .*blob\.bin: expected {wrong}, got {SHA256}"):
        download_url(server.url("blob.bin"), dest, sha256=wrong)
    assert not dest.exists()
    assert not (tmp_path / "blob.bin.part").exists()


def test_md5_mismatch_is_reported(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"md5 mismatch .*got {MD5}"):
        download_url(server.url("blob.bin"), tmp_path / "blob.bin", md5="f" * 32)


def test_announced_size_different_from_expected_fails_before_downloading(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"expected 10 bytes, the server announces {len(CONTENT)} bytes"):
        download_url(server.url("blob.bin"), tmp_path / "blob.bin", expected_size=10)
    assert not (tmp_path / "blob.bin").exists()


def test_dropped_connection_keeps_part_and_next_call_resumes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    server.drops = [50_000]
    with pytest.raises(DownloadError, match=re.escape(server.url("blob.bin")) + ".*run the same call again to resume"):
        download_url(server.url("blob.bin"), dest, sha256=SHA256, retries=0, chunk_size=4096)
    assert (tmp_path / "blob.bin.part").stat().st_size == 50_000
    assert not dest.exists()
    download_url(server.url("blob.bin"), dest, sha256=SHA256)
    assert dest.read_bytes() == CONTENT
    assert server.requests[-1]["range"] == "bytes=50000-"
    assert server.requests[-1]["sent"] == len(CONTENT) - 50_000


def test_retries_resume_automatically(server, tmp_path):
    server.drops = [70_000]
    download_url(server.url("blob.bin"), tmp_path / "blob.bin", sha256=SHA256, retries=1, chunk_size=4096)
    assert (tmp_path / "blob.bin").read_bytes() == CONTENT
    assert [r["range"] for r in server.requests] == [None, "bytes=70000-"]


def test_complete_part_file_answered_416_is_accepted(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(CONTENT)
    download_url(server.url("blob.bin"), tmp_path / "blob.bin", sha256=SHA256)
    assert (tmp_path / "blob.bin").read_bytes() == CONTENT
    assert [r["status"] for r in server.requests] == [416]


def test_http_404_is_clear_and_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match=r"missing\.bin failed: HTTP 404"):
        download_url(server.url("missing.bin"), tmp_path / "missing.bin", retries=3)
    assert len(server.requests) == 1


def test_unreachable_server_names_the_url(tmp_path, monkeypatch):
    clear_proxy_environment(monkeypatch)
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError, match=re.escape(url) + ".*run the same call again"):
        download_url(url, tmp_path / "x.bin", retries=0, timeout=5)


def test_file_hash_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(CONTENT)
    assert file_hash(path, "sha256", chunk_size=1000) == SHA256
    assert file_hash(path, "md5") == MD5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        download_url("http://127.0.0.1:1/x", tmp_path / "x", chunk_size=0)
    with pytest.raises(ValueError, match="retries"):
        download_url("http://127.0.0.1:1/x", tmp_path / "x", retries=-1)
