"""Whole-file reads and writes by local path or fsspec URL (gs://bucket/name, spaces allowed).

Statistics, checkpoints and cached graphs are small enough to move as whole files. Errors name
the path: a missing object is a FileNotFoundError, a refused one (HTTP 401/403) a PermissionError.
"""

import contextlib
import os
import tempfile
from typing import Iterator, Optional

import fsspec


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} does not exist.") from e
    except PermissionError as e:
        raise PermissionError(f"Access to {path} denied: {e}") from e
    except Exception as e:  # gcsfs: OSError("Forbidden: ...") for 403, HttpError(code=401)
        if str(e).startswith("Forbidden") or getattr(e, "code", None) in (401, 403):
            raise PermissionError(f"Access to {path} denied (HTTP 403): check the environment's "
                                  "credentials (gcloud auth application-default login) or the "
                                  f"bucket's permissions. {e}") from e
        raise


def exists(path: str, storage_options: Optional[dict] = None) -> bool:
    """Whether the file exists (a refused URL raises PermissionError naming it)."""
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
    with _named(path):
        try:
            fs.info(inner)
            return True
        except FileNotFoundError:
            return False


def read_bytes(path: str, storage_options: Optional[dict] = None) -> bytes:
    """The file's contents; FileNotFoundError / PermissionError naming `path`."""
    with _named(path):
        if not is_url(path):
            with open(path, "rb") as f:
                return f.read()
        fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return fs.cat_file(inner)


def write_bytes(path: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Writes atomically: a local file through a temporary file and a rename, an object in one
    upload (it appears only when complete)."""
    if is_url(path):
        fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
        with _named(path):
            fs.pipe_file(inner, bytes(data))
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def join(directory: str, name: str) -> str:
    """`directory/name` for a folder path or URL."""
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else os.path.join(directory, name)
