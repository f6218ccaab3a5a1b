"""Download a file by URL or path, and unpack archives without trusting them.

`download` writes to a temporary file beside the destination and renames it into
place only once the transfer is complete and the checksum matches, so an
interrupted or corrupted fetch never leaves a file that looks finished.

`safe_extract` refuses members that would land outside the destination
(absolute names, `..`, links pointing out), special files, and archives whose
declared uncompressed size is implausibly large. Every problem is a DataError
with one line naming the archive and, where there is one, the member.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import lzma
import os
import re
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pipeline.errors import DataError

CHUNK_BYTES = 1 << 20
USER_AGENT = "pipeline-fetch/0.1 (+python urllib)"

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
ZIP_SUFFIXES = (".zip",)
SUPPORTED_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
DEFAULT_MAX_BYTES = 20 * 2**30

# Errors that a damaged or truncated compressed stream raises while being read.
_CORRUPT_STREAM_ERRORS = (EOFError, zlib.error, lzma.LZMAError, OSError)

_FILTER_REASONS = {
    "AbsolutePathError": "absolute path",
    "OutsideDestinationError": "path outside the destination",
    "SpecialFileError": "device or other special file",
    "AbsoluteLinkError": "link to an absolute path",
    "LinkOutsideDestinationError": "link pointing outside the destination",
}


# --------------------------------------------------------------------------- download


def download(url: str, dest: Path, *, sha256: str = "", timeout_s: float = 60) -> str:
    """Fetch `url` (local path, file:// or http(s)://) into `dest`; return its sha256 hex.

    The bytes go to a temporary file in dest's directory, renamed over `dest` only
    when complete and (if `sha256` is given) matching. On failure `dest` is left as
    it was and the temporary file is removed.
    """
    dest = Path(dest)
    fd, tmp_name = _make_temp(dest)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _transfer(url, out, dest, timeout_s)
        _check_digest(url, digest, sha256)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _make_temp(dest: Path) -> tuple[int, str]:
    """A temporary file beside `dest`, so the final rename stays on one filesystem."""
    try:
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"fetch: cannot write into {dest.parent} ({_reason(exc)})") from exc


def _check_digest(url: str, actual: str, expected: str) -> None:
    """Compare checksums case-insensitively; an empty `expected` means no check."""
    if expected and actual.lower() != expected.strip().lower():
        raise DataError(
            f"fetch: checksum mismatch for {url}: expected {expected.strip().lower()}, got {actual}"
        )


def _transfer(url: str, out: BinaryIO, dest: Path, timeout_s: float) -> str:
    """Copy the source into `out` in chunks, with a progress bar; return the sha256."""
    with _open_source(url, timeout_s) as (stream, total):
        digest = hashlib.sha256()
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=archive_name(url),
            file=sys.stderr,
            disable=None,
            leave=False,
        ) as bar:
            while chunk := _read_chunk(stream, url, timeout_s):
                _write_chunk(out, chunk, dest)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DataError(
            f"fetch: {url} ended after {received} of {total} bytes (connection dropped?)"
        )
    return digest.hexdigest()


def _is_http(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


@contextmanager
def _open_source(url: str, timeout_s: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield (readable stream, total size or None) for any supported kind of `url`."""
    if _is_http(url):
        with _open_http(url, timeout_s) as resp:
            yield resp, _content_length(resp)
        return
    path = local_path(url)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError as exc:
        raise DataError(f"fetch: no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"fetch: {path} is a directory, not an archive file") from exc
    except OSError as exc:
        raise DataError(f"fetch: cannot read {path} ({_reason(exc)})") from exc
    with fh:
        yield fh, os.fstat(fh.fileno()).st_size


def local_path(url: str) -> Path:
    """The filesystem path behind a plain path or file:// URL, made absolute."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise DataError(f"fetch: {url}: file:// URLs must name a local file")
        url = urllib.request.url2pathname(parts.path)
    elif parts.scheme and len(parts.scheme) > 1:  # one letter would be a Windows drive
        raise DataError(
            f"fetch: {url}: unsupported URL scheme {parts.scheme!r} "
            "(use a path, file://, http:// or https://)"
        )
    return Path(url).expanduser().absolute()


def _open_http(url: str, timeout_s: float):
    """urlopen with one-line DataErrors for every way a server can fail to answer."""
    try:
        request = _request(url)
        return urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DataError(f"fetch: {url} answered HTTP {exc.code} ({exc.reason})") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _timeout_error(url, timeout_s) from exc
        raise DataError(f"fetch: cannot reach {url} ({_reason(exc.reason)})") from exc
    except TimeoutError as exc:
        raise _timeout_error(url, timeout_s) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"fetch: {url} failed before sending data ({_reason(exc)})") from exc
    except ValueError as exc:
        raise DataError(f"fetch: {url} is not a valid URL ({exc})") from exc


def _request(url: str) -> urllib.request.Request:
    """A GET of `url`; a `user:password@` in it becomes HTTP Basic auth (urllib would take
    it for part of the host), sent to that host only, never along a redirect."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    host = parts.netloc.rsplit("@", 1)[1]
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=host)), headers={"User-Agent": USER_AGENT}
    )
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _timeout_error(url: str, timeout_s: float) -> DataError:
    return DataError(f"fetch: {url} did not answer within {timeout_s:g}s (fetch.timeout_s)")


def _content_length(resp) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _read_chunk(stream: BinaryIO, url: str, timeout_s: float) -> bytes:
    """One chunk from the source; a stall or a dropped connection becomes a DataError."""
    try:
        return stream.read(CHUNK_BYTES)
    except TimeoutError as exc:
        raise DataError(
            f"fetch: {url} stalled for more than {timeout_s:g}s mid-transfer (fetch.timeout_s)"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"fetch: reading {url} failed ({_reason(exc)})") from exc


def _write_chunk(out: BinaryIO, chunk: bytes, dest: Path) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise DataError(f"fetch: cannot write {dest} ({_reason(exc)})") from exc


def _reason(exc: BaseException | str) -> str:
    """A short human reason: strerror for OS errors, else the message or class name."""
    if isinstance(exc, str):
        return exc
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- extract


def safe_extract(
    archive: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, label: str = ""
) -> None:
    """Unpack a tar (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) or .zip into `dest`.

    Every member is checked before anything is written; a refused archive writes
    nothing. If extraction itself fails midway (disk full, corrupt data), `dest`
    may hold part of the content: extract into a scratch directory. `label` is how
    errors name the archive (e.g. its URL) when `archive` is a temporary download.
    """
    archive, dest = Path(archive), Path(dest)
    shown = label or str(archive)
    kind = archive_kind(archive)
    try:
        fh = open(archive, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError as exc:
        raise DataError(f"fetch: no such file: {shown}") from exc
    except OSError as exc:
        raise DataError(f"fetch: cannot read {shown} ({_reason(exc)})") from exc
    with fh:
        dest.mkdir(parents=True, exist_ok=True)
        if kind == "zip":
            _extract_zip(fh, shown, dest, max_bytes)
        else:
            _extract_tar(fh, shown, dest, max_bytes)


def archive_name(url: str | Path) -> str:
    """The file name a path or URL points at (query strings dropped), for typing and saving."""
    text = str(url)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() in ("http", "https", "file"):
        text = urllib.parse.unquote(parts.path)
    name = re.split(r"[/\\]", text.rstrip("/\\"))[-1]
    return name if name not in ("", ".", "..") else "archive"


def archive_kind(archive: str | Path) -> str:
    """'tar' or 'zip' by file name; anything else is a DataError listing what works."""
    name = archive_name(archive).lower()
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    raise DataError(
        f"fetch: {archive}: unsupported archive type; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _member_problem(name: str) -> str | None:
    """Why a member name is unsafe to join onto the destination, or None if it is fine."""
    if name.startswith(("/", "\\")):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "absolute path with a drive letter"
    if ".." in re.split(r"[/\\]", name):
        return "path outside the destination"
    if "\x00" in name:
        return "NUL byte in the name"
    return None


def _refuse(archive: str, member: str, reason: str) -> DataError:
    return DataError(f"fetch: refusing archive member {member!r} in {archive} ({reason})")


def _check_total(archive: str, total: int, max_bytes: int) -> None:
    """Cheap decompression-bomb guard on the members' declared sizes."""
    if total > max_bytes:
        raise DataError(
            f"fetch: refusing {archive}: its members add up to {total} bytes uncompressed, "
            f"over the limit of {max_bytes} bytes"
        )


def _extract_tar(fh: BinaryIO, archive: str, dest: Path, max_bytes: int) -> None:
    """Check all members (names, sizes, the stdlib 'data' filter), then extract them."""
    if not hasattr(tarfile, "data_filter"):  # Python < 3.11.4
        raise DataError("fetch: safe tar extraction needs Python >= 3.11.4 (tarfile filters)")
    try:
        with tarfile.open(fileobj=fh, mode="r:*") as tar:
            members = _read_tar_members(tar, archive)
            _check_tar_members(members, archive, dest, max_bytes)
            _extract_tar_members(tar, members, archive, dest)
    except tarfile.ReadError as exc:
        raise DataError(f"fetch: {archive} is not a readable tar archive ({exc})") from exc
    except tarfile.CompressionError as exc:
        raise DataError(f"fetch: {archive}: unsupported compression ({exc})") from exc


def _read_tar_members(tar: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    try:
        return tar.getmembers()
    except _CORRUPT_STREAM_ERRORS as exc:
        raise DataError(f"fetch: {archive} is truncated or corrupt ({_reason(exc)})") from exc


def _check_tar_members(
    members: list[tarfile.TarInfo], archive: str, dest: Path, max_bytes: int
) -> None:
    for member in members:
        problem = _member_problem(member.name)
        if problem:
            raise _refuse(archive, member.name, problem)
        _apply_data_filter(member, archive, dest)
    _check_total(archive, sum(m.size for m in members if m.isreg()), max_bytes)


def _apply_data_filter(member: tarfile.TarInfo, archive: str, dest: Path) -> None:
    """Run the stdlib 'data' filter early, so a bad member is refused before any write."""
    try:
        tarfile.data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        raise _filter_refusal(exc, archive) from exc


def _filter_refusal(exc: tarfile.FilterError, archive: str) -> DataError:
    reason = _FILTER_REASONS.get(type(exc).__name__, "unsafe member")
    if isinstance(exc, tarfile.AbsoluteLinkError | tarfile.LinkOutsideDestinationError):
        reason = f"{reason}: {exc.tarinfo.linkname!r}"
    return _refuse(archive, exc.tarinfo.name, reason)


def _extract_tar_members(
    tar: tarfile.TarFile, members: list[tarfile.TarInfo], archive: str, dest: Path
) -> None:
    """extractall with filter='data': the filter re-checks links against what is on disk."""
    try:
        tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise _filter_refusal(exc, archive) from exc
    except tarfile.TarError as exc:
        raise DataError(f"fetch: extracting {archive} failed ({exc})") from exc
    except _CORRUPT_STREAM_ERRORS as exc:
        raise DataError(f"fetch: extracting {archive} into {dest} failed ({_reason(exc)})") from exc


def _extract_zip(fh: BinaryIO, archive: str, dest: Path, max_bytes: int) -> None:
    """Check every zip member ourselves (zipfile has no filter), then extract."""
    try:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_zip_member(info, archive, dest)
            _check_total(archive, sum(info.file_size for info in infos), max_bytes)
            for info in infos:
                zf.extract(info, dest)
    except zipfile.BadZipFile as exc:
        raise DataError(f"fetch: {archive} is not a readable zip archive ({exc})") from exc
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"fetch: {archive}: unsupported zip feature ({exc})") from exc
    except _CORRUPT_STREAM_ERRORS as exc:
        raise DataError(f"fetch: extracting {archive} into {dest} failed ({_reason(exc)})") from exc


def _check_zip_member(info: zipfile.ZipInfo, archive: str, dest: Path) -> None:
    """Refuse absolute names, drive letters, `..`, symlinks, special files, encryption."""
    name = info.filename
    problem = _member_problem(name)
    if problem:
        raise _refuse(archive, name, problem)
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise _refuse(archive, name, "symbolic link")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(archive, name, "device or other special file")
    if info.flag_bits & 0x1:
        raise _refuse(archive, name, "encrypted")
    root = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        raise _refuse(archive, name, "path outside the destination")
