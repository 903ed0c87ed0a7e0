"""Local folders and buckets (``gs://...``) behind one path type, ``etils.epath`` (orbax's own path layer).

Most of the work directory is read and written through ``epath.Path`` directly. This module holds the few operations
that differ between a local disk and a bucket:

- :func:`write_atomic`: a file that a killed process leaves either old or new (local: write a temporary file and
  rename it; a bucket: one object write, which GCS makes atomic already);
- :func:`upload_folder`: libraries that only write local files (safetensors, ``save_pretrained``) write into a local
  folder, which is then copied to the bucket;
- :func:`local_copy`: libraries that only read local files (safetensors' memory map, transformers' config loader)
  read a remote folder from a local copy, downloaded once and cached under :func:`cache_root`, keyed by the remote
  path and its objects' names, sizes and generations (a rewritten folder gets a fresh copy).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from etils import epath

_CHUNK = 16 * 2**20


def is_remote(path: str | os.PathLike) -> bool:
    """True for a bucket URL (``gs://``, ``s3://``, ...), False for a local path (``file://`` included)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def cache_root() -> Path:
    """Where remote folders are copied to and remote-run assets are built: ``$JAXALIGN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/jaxalign``, else ``~/.cache/jaxalign``."""
    if os.environ.get("JAXALIGN_CACHE_DIR"):
        return Path(os.environ["JAXALIGN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxalign"


def staging_dir() -> tempfile.TemporaryDirectory:
    """A temporary local folder under :func:`cache_root` (not /tmp, which may be a small RAM disk) to write into before
    :func:`upload_folder`; removed when the ``with`` block ends."""
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=root)


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new one, never a torn file."""
    path = epath.Path(path)
    raw = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(raw)  # a GCS object appears whole or not at all
        return
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(raw)
    os.replace(tmp, path)  # (epath's rename refuses an existing target)


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    # streamed: a model shard can be larger than the host's free memory
    with src.open("rb") as f, dst.open("wb") as g:
        shutil.copyfileobj(f, g, _CHUNK)


def _listing(folder: epath.Path) -> dict[str, dict]:
    """Relative name -> object metadata of every file under a remote folder, listed fresh (fsspec keeps listings
    cached per process, and another process may have rewritten the folder since)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(folder))
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    return {name[len(root):].lstrip("/"): info for name, info in found.items() if info.get("type") != "directory"}


def upload_folder(local: str | os.PathLike, remote: epath.PathLike) -> epath.Path:
    """Copy the files of ``local`` to ``remote`` (a bucket folder), replacing whatever ``remote`` held. ``config.json``
    goes last, as the local writer writes it last: a folder with a config is a complete one."""
    local, remote = Path(local), epath.Path(remote)
    if remote.exists():
        remote.rmtree()
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == "config.json", str(p)))
    for f in files:
        dst = remote / f.relative_to(local).as_posix()
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(epath.Path(f), dst)
    return remote


def local_copy(folder: str | os.PathLike) -> Path:
    """A local folder with the files of ``folder``: ``folder`` itself when local, else a cached download of it.

    The cache key holds the remote path and every object's relative name, size, generation and hashes, so a folder
    rewritten in the bucket is downloaded again while an unchanged one is read from disk. The download goes to a temporary sibling
    renamed into place, so processes sharing the cache never see a half-copied folder.
    """
    if not is_remote(folder):
        return Path(os.fspath(folder))
    remote = epath.Path(folder)
    files = _listing(remote)
    if not files:
        raise FileNotFoundError(f"{remote}: no files under this remote folder.")
    key = hashlib.sha256(str(remote).encode())
    for name in sorted(files):
        info = files[name]
        # GCS: generation changes on every rewrite; the hashes and mtime cover other stores
        stamp = [str(info.get(k)) for k in ("size", "generation", "md5Hash", "crc32c", "ETag", "mtime")]
        key.update(f"\n{name}:{':'.join(stamp)}".encode())
    target = cache_root() / "remote" / f"{remote.name}-{key.hexdigest()[:24]}"
    if target.is_dir():
        return target
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    for name in sorted(files):
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(remote / name, epath.Path(dst))
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


__all__ = ["is_remote", "cache_root", "staging_dir", "write_atomic", "upload_folder", "local_copy"]
