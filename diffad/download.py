"""Resumable, verified file downloads with the standard library only.

Used for the MVTec-AD archive (5 GB, :func:`diffad.data.download_mvtec`) and for OpenAI's
diffusion checkpoints. Large downloads on Colab get interrupted; this module makes running
the same call again cheap and safe:

* bytes go to ``<dest>.part``; a later call continues it with an HTTP ``Range`` request
  (a server that ignores ``Range`` and answers 200 is handled by starting over cleanly);
* the finished file is checked (size, SHA-256 and/or MD5) *before* it is renamed to
  ``dest`` atomically, so ``dest`` either does not exist or is complete and verified;
* a ``dest`` that already exists and verifies is returned without any network access.

This module imports nothing else from diffad.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from diffad.io import exclusive

__all__ = ["download_url", "file_hash", "DownloadError", "ChecksumError"]

_USER_AGENT = "diffad-downloader/1.0 (+python urllib)"


class DownloadError(RuntimeError):
    """The transfer failed (network, HTTP status, truncated body); running again resumes.

    ``retryable`` is False for answers that another try will not change (e.g. HTTP 404).
    """

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class ChecksumError(ValueError):
    """The downloaded file's size or hash differs from the expected one."""


def file_hash(path: str | Path, algorithm: str = "sha256", chunk_size: int = 1 << 22) -> str:
    """Hex digest of a file, read in chunks (works for files larger than memory)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected_size: int | None, sha256: str | None, md5: str | None, name: Path) -> None:
    """Raise ChecksumError naming ``name`` if ``path`` does not match the expectations."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"size mismatch for {name}: expected {expected_size} bytes, got {size} bytes")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        actual = file_hash(path, algorithm)
        if actual.lower() != expected.lower():
            raise ChecksumError(f"{algorithm} mismatch for {name}: expected {expected.lower()}, got {actual}")


def _verifies(path: Path, expected_size: int | None, sha256: str | None, md5: str | None) -> bool:
    try:
        _verify(path, expected_size, sha256, md5, path)
    except ChecksumError:
        return False
    return True


def _content_range_start_total(header: str | None) -> tuple[int | None, int | None]:
    """Parse ``Content-Range: bytes START-END/TOTAL`` (or ``bytes */TOTAL``)."""
    if not header:
        return None, None
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    # A fresh opener per call, so proxy environment variables are read now, not at import.
    return urllib.request.build_opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, expected_size: int | None, desc: str, chunk_size: int, timeout: float) -> None:
    """Bring ``part`` to the full length of the remote file, resuming when possible."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # complete; verification follows

    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset > 0:
            # Range not satisfiable: the part file is already complete, or longer than the file.
            _, total = _content_range_start_total(error.headers.get("Content-Range"))
            if total is not None and total == offset:
                return
            part.unlink()
            return _transfer(url, part, expected_size, desc, chunk_size, timeout)
        retryable = error.code >= 500 or error.code in (408, 429)
        raise DownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}", retryable) from error
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise DownloadError(
            f"download of {url} failed to connect ({error}); check the network and run the same call again"
        ) from error

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if status == 206:
            start, total = _content_range_start_total(response.headers.get("Content-Range"))
            if start != offset:  # not the range we asked for: start over
                response.close()
                part.unlink(missing_ok=True)
                return _transfer(url, part, expected_size, desc, chunk_size, timeout)
            mode = "ab"
            total = total if total is not None else (offset + length if length is not None else None)
        elif status == 200:
            mode, offset = "wb", 0  # the server ignored Range (or none was sent): restart cleanly
            total = length
        else:
            raise DownloadError(f"download of {url} failed: unexpected HTTP status {status}", retryable=False)
        if expected_size is not None and total is not None and total != expected_size:
            raise ChecksumError(
                f"size mismatch for {url}: expected {expected_size} bytes, the server announces {total} bytes"
            )

        received = offset
        with open(part, mode) as handle, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc
        ) as bar:
            while True:
                try:
                    block = response.read(chunk_size)
                except (http.client.HTTPException, OSError) as error:
                    raise DownloadError(
                        f"download of {url} was interrupted after {received} bytes ({error}); "
                        f"the partial file {part} is kept: run the same call again to resume"
                    ) from error
                if not block:
                    break
                handle.write(block)  # a full disk raises OSError here, unwrapped
                received += len(block)
                bar.update(len(block))
    if total is not None and received < total:
        raise DownloadError(
            f"download of {url} ended early at {received} of {total} bytes; "
            f"the partial file {part} is kept: run the same call again to resume"
        )


def download_url(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    desc: str | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
    retries: int = 2,
) -> Path:
    """Download ``url`` to ``dest`` with resume and verification; return ``Path(dest)``.

    ``expected_size`` (bytes), ``sha256`` and ``md5`` are checked when given (with none given,
    an existing ``dest`` counts as complete). On a network
    failure the transfer is resumed automatically up to ``retries`` times, then a
    :class:`DownloadError` says which URL failed; the ``.part`` file stays, so calling again
    resumes. A size or hash mismatch deletes the bad file and raises :class:`ChecksumError`
    naming the file and both values.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest = Path(dest)
    if dest.is_file() and _verifies(dest, expected_size, sha256, md5):
        return dest
    with exclusive(dest, f"downloading {url}"):  # two processes never append to one .part file
        if dest.is_file() and _verifies(dest, expected_size, sha256, md5):  # downloaded meanwhile
            return dest
        return _download(url, dest, expected_size, sha256, md5, desc or dest.name, chunk_size, timeout, retries)


def _download(url: str, dest: Path, expected_size: int | None, sha256: str | None, md5: str | None, desc: str,
              chunk_size: int, timeout: float, retries: int) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, expected_size, desc, chunk_size, timeout)
            break
        except DownloadError as error:
            if attempt == retries or not error.retryable:
                raise
    try:
        _verify(part, expected_size, sha256, md5, dest)
    except ChecksumError as error:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{error}; the bad download was deleted, run again to download it afresh") from None
    os.replace(part, dest)
    return dest
