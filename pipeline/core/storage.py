"""Object storage: a local path or an ``s3://`` URI as a pyarrow filesystem and the path inside it.

Credentials come from the environment the AWS way (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, profiles, instance
roles). ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` points at an S3-compatible store (MinIO,
Ceph, moto): ``http://host:port`` or ``https://host``. Other pyarrow schemes (``gs://``,
``hdfs://``) go through ``pyarrow.fs.FileSystem.from_uri`` as they are.

An object store has no rename, but one PUT is all or nothing: a reader sees the whole object or
none of it. So a run folder on a bucket is made safe by order, not by renames: the data objects
first, the marker that says they are complete (a stage's ``_SUCCESS.json``, the run's
``manifest.json``) last, and an old marker deleted before its data is replaced.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

_CHUNK = 8 << 20


def is_uri(path: str | Path | None) -> bool:
    """True for ``scheme://...`` (object storage); a ``Path`` is always local."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


# What a Ray worker needs to reach the same store as the driver (see ``worker_env``).
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_env(credentials: bool) -> dict[str, str]:
    """The object-storage variables set here, for the ``runtime_env`` of a job that joins a running
    cluster (its workers were started by ``ray start``, not by this process, and lack them). The
    credentials only with ``credentials`` (``ray.ship_credentials``): a runtime_env is readable by
    whoever can list the cluster's jobs."""
    names = STORE_ENV + (CREDENTIAL_ENV if credentials else ())
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def endpoint_url() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``uri`` and the path inside it (``bucket/key`` for S3)."""
    scheme, _, rest = uri.partition("://")
    if scheme in ("s3", "s3a"):
        kwargs: dict[str, str] = {}
        endpoint = endpoint_url()
        if endpoint:
            endpoint_scheme, sep, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host.rstrip("/"), "scheme": endpoint_scheme} if sep else \
                {"endpoint_override": endpoint}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def join(base: str | Path, *parts: str) -> str | Path:
    """``base/parts``: a URI stays a URI (``Path`` would fold its ``//``), a local path a ``Path``."""
    if is_uri(base):
        return posixpath.join(str(base), *parts)
    return Path(base).joinpath(*parts)


def name(uri: str | Path) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def _uri(base_uri: str, base_path: str, path: str) -> str:
    """The URI of ``path`` (a path in the filesystem of ``base_uri``, under ``base_path``)."""
    return base_uri.rstrip("/") + path[len(base_path):]


def info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def is_file(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


@dataclass(frozen=True)
class StoredFile:
    uri: str
    size: int
    mtime_ns: int | None


def list_files(uri: str) -> list[StoredFile]:
    """Every object under the prefix ``uri`` (recursively), sorted by URI; none when it is absent."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    found = [StoredFile(_uri(uri, path, f.path), int(f.size or 0), f.mtime_ns)
             for f in fs.get_file_info(selector) if f.type == pafs.FileType.File]
    return sorted(found, key=lambda f: f.uri)


def glob_files(pattern: str) -> list[StoredFile]:
    """The objects whose URI matches ``pattern`` (``*``, ``?``, ``[...]``), as ``glob`` matches files:
    ``*`` stays inside one name unless the pattern has ``**``, and hidden names need a leading dot."""
    cut = min((i for i, ch in enumerate(pattern) if ch in "*?["), default=len(pattern))
    prefix = pattern[:cut].rpartition("/")[0]
    deep = "**" in pattern
    return [f for f in list_files(prefix)
            if fnmatch.fnmatchcase(f.uri, pattern) and (deep or f.uri.count("/") == pattern.count("/"))
            and not any(part.startswith(".") and not pattern_part.startswith(".")
                        for part, pattern_part in zip(f.uri[len(prefix):].split("/"), pattern[len(prefix):].split("/")))]


def open_input(uri: str) -> IO[bytes]:
    """A seekable binary reader of one object."""
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as fh:
        return fh.read()


def read_bytes_or_none(uri: str) -> bytes | None:
    try:
        return read_bytes(uri)
    except (FileNotFoundError, OSError):
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """One PUT: readers see the old object or the new one, never part of one."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path, compression=None) as fh:  # a .gz name must not mean "gzip it again"
        fh.write(data)


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(uri: str) -> None:
    """Delete every object under the prefix ``uri`` (nothing when there are none)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def copy_file(source: str, target: str) -> None:
    """A copy inside the store (S3 CopyObject: the bytes do not pass through this process)."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    fs.copy_file(source_path, target_path)


def sha256_uri(uri: str) -> str:
    digest = hashlib.sha256()
    with open_input(uri) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_tree(local: Path, uri: str) -> None:
    """Copy the files under ``local`` to the prefix ``uri`` (small trees: models, tokenizers)."""
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        write_bytes(posixpath.join(uri, path.relative_to(local).as_posix()), path.read_bytes())


def download_tree(uri: str, local: Path) -> None:
    """Copy the objects under the prefix ``uri`` into ``local``."""
    for f in list_files(uri):
        target = Path(local) / f.uri[len(uri.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(f.uri))


def local_mirror(uri: str) -> Path:
    """A local folder for what of a run folder on object storage must be a local file (stage
    artifacts such as models and tokenizers): ``$CURRICULUM_LOCAL_CACHE`` (default
    ``~/.cache/data-curriculum``) ``/objects/<scheme>/<bucket>/<key>``."""
    root = Path(os.environ.get("CURRICULUM_LOCAL_CACHE") or Path.home() / ".cache" / "data-curriculum")
    scheme, _, rest = uri.partition("://")
    return root / "objects" / scheme / rest.strip("/")
