"""Workdir paths: a local folder or an object store (gs://, s3://) behind one type, etils.epath.

Every file a job reads or writes in a workdir goes through `path()`; orbax takes the same
`epath.Path`. Local paths behave as `os.path` would (made absolute, symlinks kept). On an object
store there is no rename, so `move_aside` copies then deletes.
"""

import os
import posixpath
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(p: PathLike) -> bool:
    """True for a URI such as 'gs://bucket/run', false for a local path."""
    return '://' in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: absolute when local (like os.path.abspath), the URI as given else."""
    if is_remote(p):
        return epath.Path(os.fspath(p))
    return epath.Path(os.path.abspath(os.fspath(p)))


def join(p: PathLike, *names: str) -> str:
    """`os.path.join` that keeps a URI a URI (for strings handed to logs and configs)."""
    if is_remote(p):
        return posixpath.join(os.fspath(p), *names)
    return os.path.join(os.fspath(p), *names)


def parent(p: PathLike) -> str:
    """The folder above `p` (a trailing slash ignored), as a string of the same kind."""
    s = os.fspath(p).rstrip('/') or '/'
    return posixpath.dirname(s) if is_remote(s) else os.path.dirname(os.path.abspath(s))


def name(p: PathLike) -> str:
    """The last component of `p` (a trailing slash ignored)."""
    return posixpath.basename(os.fspath(p).rstrip('/'))


def copy_tree(src: epath.Path, dst: epath.Path) -> None:
    """Copies a folder (or a file) from `src` to `dst`, across stores if need be."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            copy_tree(child, dst / child.name)
    else:
        src.copy(dst, overwrite=True)


def move_aside(src: PathLike, dst: PathLike) -> None:
    """Renames `src` to `dst`; on an object store (no rename) copies it, then deletes `src`.

    The copy is complete before anything is deleted, so an interrupted move leaves both."""
    src, dst = path(src), path(dst)
    if not is_remote(src):
        os.rename(src, dst)
        return
    copy_tree(src, dst)
    if src.is_dir():
        src.rmtree()
    else:
        src.unlink()
