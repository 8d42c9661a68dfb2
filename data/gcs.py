"""Small helpers for gs:// URLs: filesystem construction, retries, errors that name the URL.

The emulator endpoint comes from `storage_options["endpoint_url"]` or `STORAGE_EMULATOR_HOST`;
with an endpoint the client is anonymous. Without one, gcsfs tries application-default
credentials and falls back to anonymous access (public buckets). gcsfs's default "extended"
filesystem probes every bucket over gRPC (a 60 s stall per call against the emulator), so the
core `GCSFileSystem` is registered for "gs" here, with a per-request timeout (gcsfs passes none to
aiohttp by default, so a request whose connection silently dies waits forever; with one it fails
with a retriable error and gcsfs's own retries take over) and without the listing cache (which
would hide checkpoint steps written by another process).
"""

import contextlib
import os
import random
import socket
import time
import urllib.parse
from typing import Callable, Iterator, Optional, TypeVar

from data.validate import SourceAccessError, SourceNotFoundError, SourceUnreachableError

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import aiohttp  # noqa: E402
import fsspec  # noqa: E402  (after the env var: gcsfs reads it at import)
import gcsfs.core  # noqa: E402
import gcsfs.retry  # noqa: E402

fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)
# Defaults fsspec applies to every GCSFileSystem, including the one orbax (through etils.epath)
# uses for checkpoint directories: connect within 30 s, and once a request is sent the server must
# answer (or keep sending) within 60 s; no directory-listing cache, since checkpoints are listed
# again and again while another process (the trainer, the eval job) adds and deletes steps.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(sock_connect=30, sock_read=60)
for _protocol in ("gs", "gcs"):
    _defaults = fsspec.config.conf.setdefault(_protocol, {})
    _defaults.setdefault("requests_timeout", REQUEST_TIMEOUT)
    _defaults.setdefault("use_listings_cache", False)

GCS_ENDPOINT = "https://storage.googleapis.com"
_TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}
T = TypeVar("T")


def is_gcs(url: str) -> bool:
    return url.startswith(("gs://", "gcs://"))


def endpoint(storage_options: Optional[dict] = None) -> Optional[str]:
    """The emulator/custom endpoint in force, if any."""
    opts = storage_options or {}
    return opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST") or None


def gcs_storage_options(storage_options: Optional[dict] = None) -> dict:
    """gcsfs keyword arguments: anonymous against an emulator endpoint, else as given (gcsfs's
    default token tries application-default credentials, then anonymous)."""
    opts = dict(storage_options or {})
    ep = endpoint(opts)
    if ep:
        opts["endpoint_url"] = ep if "://" in ep else f"http://{ep}"
        opts.setdefault("token", "anon")
    return opts


def options_for(url: str, storage_options: Optional[dict] = None) -> dict:
    """fsspec keyword arguments for `url`: gcsfs's for gs:// URLs, none for anything else."""
    return gcs_storage_options(storage_options) if is_gcs(url) else {}


def filesystem(url: str, storage_options: Optional[dict] = None) -> fsspec.AbstractFileSystem:
    """fsspec filesystem for a local path or gs:// URL."""
    if is_gcs(url):
        return gcsfs.core.GCSFileSystem(**gcs_storage_options(storage_options))
    return fsspec.filesystem("file")


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, gcsfs.retry.HttpError):
        return e.code in _TRANSIENT_CODES
    return isinstance(e, (ConnectionError, TimeoutError)) and not isinstance(
        e, (SourceAccessError, SourceNotFoundError))


@contextlib.contextmanager
def named_errors(url: str) -> Iterator[None]:
    """Re-raises storage errors as SourceError subclasses whose message names `url`."""
    try:
        yield
    except (SourceNotFoundError, SourceAccessError, SourceUnreachableError):
        raise
    except FileNotFoundError as e:
        raise SourceNotFoundError(f"{url} does not exist (bucket or object not found: {e}).") from e
    except PermissionError as e:
        raise SourceAccessError(f"Access to {url} denied: {e}.") from e
    except gcsfs.retry.HttpError as e:
        if e.code in (401, 403):
            raise SourceAccessError(f"Access to {url} denied (HTTP {e.code}): {e.message}. "
                                    "Check credentials (gcloud auth application-default "
                                    "login) or the bucket's permissions.") from e
        raise
    except OSError as e:
        if str(e).startswith("Forbidden"):
            raise SourceAccessError(f"Access to {url} denied (HTTP 403): {e}. Check credentials "
                                    "(gcloud auth application-default login) or the bucket's "
                                    "permissions.") from e
        if isinstance(e, (ConnectionError, TimeoutError)):
            raise SourceUnreachableError(f"Could not reach the storage for {url}: {e}.") from e
        raise


def with_retries(fn: Callable[[], T], *, url: str, attempts: int = 4,
                 base_delay: float = 0.5) -> T:
    """Calls `fn`, retrying transient errors (5xx, 429, timeouts, dropped connections) with
    jittered exponential backoff; errors are re-raised naming `url`."""
    for attempt in range(attempts):
        try:
            with named_errors(url):
                return fn()
        except Exception as e:  # noqa: BLE001 -- filtered just below
            cause = e.__cause__ or e
            if attempt == attempts - 1 or not (_is_transient(e) or _is_transient(cause)):
                raise
            time.sleep(base_delay * 2 ** attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def check_reachable(url: str, storage_options: Optional[dict] = None,
                    timeout: float = 5.0) -> None:
    """Fails fast (no gcsfs retry loop) when the storage endpoint for `url` cannot be contacted."""
    if not is_gcs(url):
        return
    ep = urllib.parse.urlparse(gcs_storage_options(storage_options).get("endpoint_url")
                               or GCS_ENDPOINT)
    port = ep.port or (443 if ep.scheme == "https" else 80)
    try:
        socket.create_connection((ep.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise SourceUnreachableError(f"Could not reach {ep.scheme}://{ep.hostname}:{port} to read "
                                     f"{url}: {e}.") from e


def check_exists(url: str, storage_options: Optional[dict] = None) -> None:
    """Raises a SourceError naming `url` if its bucket or object is missing or forbidden."""
    check_reachable(url, storage_options)
    fs = filesystem(url, storage_options)
    path = url.split("://", 1)[-1] if is_gcs(url) else url
    try:
        with_retries(lambda: fs.info(path), url=url)
    except SourceNotFoundError:
        if is_gcs(url):
            bucket = path.split("/", 1)[0]
            try:
                with_retries(lambda: fs.info(bucket), url=url)
            except SourceNotFoundError as e:
                raise SourceNotFoundError(
                    f"Bucket gs://{bucket} does not exist (reading {url}).") from e
        raise
