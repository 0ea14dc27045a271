"""The one place for storage: a local folder or ``s3://bucket/prefix``.

Everything a run writes (Parquet shards, Ray Train checkpoints, weights, the report) goes
through a :class:`Storage`, which wraps a ``pyarrow.fs.FileSystem``. The same filesystem
object is handed to Ray (``RunConfig(storage_filesystem=...)``, ``read_parquet(filesystem=...)``),
so Ray and raydefense always agree on the endpoint.

S3 endpoints: pyarrow's ``S3FileSystem`` does not read ``AWS_ENDPOINT_URL``; we pass
``endpoint_override`` ourselves from the config, then ``AWS_ENDPOINT_URL_S3``, then
``AWS_ENDPOINT_URL`` (the variables boto3 honours). Credentials come from the standard AWS
chain (environment, shared files, instance roles) and are never logged.

Atomicity: a file is written under a temporary name and moved into place (local), or put
as a single object (S3, where a PUT is atomic). Readers therefore never see half a file;
a stage is marked finished by a marker written after all its outputs (see ``pipeline``).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs

from raydefense.errors import CorruptFileError, StorageError

# What to do about a corrupt file when the caller does not say: every file under a run is
# rewritten by the stage that made it.
REDO_HINT = "delete it and run again (the stage that wrote it is redone), or use another --name"


def endpoint_from_env() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def resolve_s3(endpoint_url: Optional[str], region: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The S3 endpoint and region to use: the arguments, else the standard AWS variables.

    Resolved once, where the storage is opened (the driver), and carried by value from then on:
    a Storage pickled to a Ray worker on another node must not re-read that node's environment.
    An explicit endpoint without a region gets ``us-east-1`` (what S3-compatible servers expect).
    """
    endpoint = endpoint_url or endpoint_from_env()
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    if endpoint and not region:
        region = "us-east-1"
    return endpoint, region


def _s3_filesystem(endpoint_url: Optional[str], region: Optional[str]) -> pafs.S3FileSystem:
    endpoint, region = resolve_s3(endpoint_url, region)
    kwargs: dict[str, Any] = {
        # Fail fast on an unreachable endpoint instead of retrying for minutes.
        "connect_timeout": 3.0,
        "request_timeout": 20.0,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    }
    if region:
        kwargs["region"] = region
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    try:
        return pafs.S3FileSystem(**kwargs)
    except Exception as exc:  # pyarrow raises ArrowInvalid etc. for bad arguments
        raise StorageError(f"storage: cannot configure S3 client ({_describe(exc)})") from exc


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p`` -> ('s3', 'b/p'); a local path -> ('file', absolute path)."""
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):].strip("/")
        if not rest:
            raise StorageError(f"storage '{uri}': no bucket named")
        return "s3", rest
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"storage '{uri}': only local paths and s3:// URIs are supported")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return "file", os.path.abspath(os.path.expanduser(uri))


def filesystem_for(uri: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri`` (local or s3://)."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        return _s3_filesystem(endpoint_url, region), path
    return pafs.LocalFileSystem(), path


def resolve(uri: str, filesystem: Optional[pafs.FileSystem] = None, *, endpoint_url: Optional[str] = None,
            region: Optional[str] = None) -> tuple[pafs.FileSystem, str]:
    """The one URI-to-filesystem resolver: ``(pyarrow filesystem, path inside it)`` for ``uri``.

    With ``filesystem`` given, the path is ``uri`` without its scheme (``s3://b/k`` -> ``b/k``),
    or ``uri`` itself for a local path. Otherwise as :func:`filesystem_for`: ``s3://`` gets the
    project's S3 setup (endpoint and region from the arguments or the AWS variables, short
    timeouts), a local path or ``file://`` URI the local filesystem and an absolute path.
    Raises StorageError for any other scheme.
    """
    if filesystem is not None:
        return filesystem, uri.split("://", 1)[1] if "://" in uri else uri
    return filesystem_for(uri, endpoint_url=endpoint_url, region=region)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "credential" in low or "access key" in low or "accessdenied" in low.replace(" ", "") or "403" in low:
        return f"access denied or missing credentials ({text})"
    if "curl" in low or "connect" in low or "timeout" in low or "resolve" in low:
        return f"endpoint unreachable ({text})"
    return text


@dataclass
class Storage:
    """A run root: ``uri`` (as the user wrote it), ``fs`` and ``root`` (path inside ``fs``)."""

    uri: str
    fs: pafs.FileSystem
    root: str
    endpoint_url: Optional[str] = None
    region: Optional[str] = None

    @classmethod
    def open(cls, uri: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> "Storage":
        """Open ``uri`` (a local path or ``s3://bucket/prefix``); StorageError for other schemes.

        For S3 the endpoint and region are resolved now (arguments, else ``AWS_ENDPOINT_URL_S3`` /
        ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``) and kept on the object,
        so a copy pickled to another node talks to the same endpoint. Credentials are not carried:
        each node gets them from its own AWS chain (instance role, IRSA, runtime_env env_vars).
        """
        if uri.startswith("s3://"):
            endpoint_url, region = resolve_s3(endpoint_url, region)
        fs, root = filesystem_for(uri, endpoint_url=endpoint_url, region=region)
        if not uri.startswith("s3://"):
            uri = root  # absolute: a worker that changes directory (Tune trials do) reopens the same folder
        return cls(uri=uri, fs=fs, root=root, endpoint_url=endpoint_url, region=region)

    # Storage objects travel to Ray workers: rebuild the filesystem there from the resolved
    # endpoint and region (never from the worker's environment).
    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "endpoint_url": self.endpoint_url, "region": self.region}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = Storage.open(state["uri"], endpoint_url=state["endpoint_url"], region=state["region"])
        self.__dict__.update(other.__dict__)

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def child(self, *parts: str) -> "Storage":
        """A Storage rooted at a sub-path (e.g. one run)."""
        sub = posixpath.join(self.uri.rstrip("/"), *parts)
        return Storage(uri=sub, fs=self.fs, root=self.path(*parts), endpoint_url=self.endpoint_url, region=self.region)

    def path(self, *parts: str) -> str:
        """Path inside ``fs`` (no scheme): what pyarrow and Ray's ``filesystem=`` take."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def display(self, *parts: str) -> str:
        return posixpath.join(self.uri.rstrip("/"), *parts) if parts else self.uri

    # ---------------------------------------------------------------- checks

    def check_writable(self) -> None:
        """Create the root and write/read/delete a probe object; StorageError naming the URI."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            with self.fs.open_input_stream(probe) as f:
                f.read()
            self.fs.delete_file(probe)
        except Exception as exc:
            raise StorageError(f"storage '{self.uri}': {_describe(exc)}") from exc

    # ---------------------------------------------------------------- files

    def exists(self, *parts: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound
        except Exception as exc:
            raise StorageError(f"storage '{self.display(*parts)}': {_describe(exc)}") from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        try:
            parent = posixpath.dirname(target)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            if self.is_s3:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
            else:
                tmp = f"{target}.tmp-{uuid.uuid4().hex}"
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, target)
        except Exception as exc:
            raise StorageError(f"storage '{self.display(rel)}': cannot write ({_describe(exc)})") from exc

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError as exc:
            raise StorageError(f"storage '{self.display(rel)}': not found") from exc
        except Exception as exc:
            raise StorageError(f"storage '{self.display(rel)}': cannot read ({_describe(exc)})") from exc

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    # Reading back what the project wrote: every read of a run's files (config.yaml, stage
    # markers, metrics.json, meta.json, weights) comes through read_text / read_json /
    # read_yaml / load_torch, which name the file and what to do when it is corrupt.

    def _corrupt(self, rel: str, what: str, hint: Optional[str], exc: BaseException) -> CorruptFileError:
        err = CorruptFileError(f"{self.display(rel)} is corrupt ({what}); {hint or REDO_HINT}")
        err.__cause__ = exc
        return err

    def read_text(self, rel: str, *, hint: Optional[str] = None) -> str:
        """UTF-8 text of ``rel``; CorruptFileError naming the file when it is not UTF-8."""
        data = self.read_bytes(rel)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._corrupt(rel, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}", hint, exc) from exc

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")

    def read_json(self, rel: str, *, expect: type | tuple[type, ...] = (dict, list), hint: Optional[str] = None) -> Any:
        """The JSON value in ``rel``, of type ``expect``; CorruptFileError naming the file when it
        is empty, truncated, not JSON or another type (StorageError when it cannot be read)."""
        text = self.read_text(rel, hint=hint)
        try:
            value = json.loads(text)
        except ValueError as exc:  # JSONDecodeError; an empty file is one too
            why = "empty file" if not text.strip() else f"not JSON: {exc}"
            raise self._corrupt(rel, why, hint, exc) from exc
        if not isinstance(value, expect):
            raise self._corrupt(rel, f"holds a {type(value).__name__}", hint, TypeError(type(value).__name__))
        return value

    def read_yaml(self, rel: str, *, hint: Optional[str] = None) -> dict[str, Any]:
        """The YAML mapping in ``rel`` (e.g. a run's ``config.yaml``); CorruptFileError naming the
        file when it is not UTF-8, not YAML, or not a mapping."""
        import yaml

        text = self.read_text(rel, hint=hint)
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if getattr(mark, "line", None) is not None else ""
            raise self._corrupt(rel, f"not valid YAML{where}", hint, exc) from exc
        if not isinstance(value, dict):
            why = "empty file" if value is None else f"holds a {type(value).__name__}, not a mapping"
            raise self._corrupt(rel, why, hint, TypeError(why))
        return value

    def save_torch(self, rel: str, obj: Any) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(rel, buf.getvalue())

    def load_torch(self, rel: str, map_location: Any = "cpu", *, hint: Optional[str] = None) -> Any:
        """``torch.load(weights_only=True)`` of ``rel``; CorruptFileError naming the file when it is
        truncated or not a torch file (StorageError when it cannot be read)."""
        import torch

        data = self.read_bytes(rel)
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # unpickling and zip errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = "empty file" if not data else f"not a torch file: {type(exc).__name__}: {first[:200]}"
            raise self._corrupt(rel, why, hint, exc) from exc

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (empty list when it does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel) if rel else self.root, allow_not_found=True))
        except Exception as exc:
            raise StorageError(f"storage '{self.display(rel)}': {_describe(exc)}") from exc
        return sorted(posixpath.basename(i.path) for i in infos)

    def delete_dir(self, rel: str) -> None:
        path = self.path(rel)
        try:
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.fs.delete_dir(path)
        except Exception as exc:
            raise StorageError(f"storage '{self.display(rel)}': cannot delete ({_describe(exc)})") from exc

    def delete_file(self, rel: str) -> None:
        path = self.path(rel)
        try:
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.fs.delete_file(path)
        except Exception as exc:
            raise StorageError(f"storage '{self.display(rel)}': cannot delete ({_describe(exc)})") from exc


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def boto3_client(*, endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """A boto3 S3 client for the same endpoint the pyarrow filesystem uses."""
    import boto3

    kwargs: dict[str, Any] = {}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if region:
        kwargs["region_name"] = region
    return boto3.client("s3", **kwargs)
