"""Run storage that may be remote: a local folder or an object store URI (s3://, gs://, ...).

Ray Train persists checkpoints to `ray.storage_path` itself (through pyarrow.fs); what else a run
writes goes through accel_tp/run_folder.py, which mirrors a staging folder up with these helpers. S3-compatible stores take the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = [
    "AWS_ENV",
    "AWS_SECRET_ENV",
    "Credentials",
    "is_remote",
    "join",
    "check_storage",
    "exists",
    "read_text",
    "download",
    "upload",
    "replace_folder",
]

# The standard variables an S3 client reads. The plain ones go to Ray workers (which may run on nodes
# started without them) through the runtime env; the secret ones never do: Ray writes a job's runtime
# env into its logs (runtime_env_agent.log, export events) in clear text. They travel in memory,
# as `Credentials`.
AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CA_BUNDLE",
)
AWS_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class Credentials:
    """Secret environment values handed to Ray workers in memory (train_loop_config), never in a
    runtime env; its repr names the variables only, since Ray records the loop config's repr."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = dict(values)

    @classmethod
    def from_environ(cls) -> Credentials | None:
        found = {k: os.environ[k] for k in AWS_SECRET_ENV if k in os.environ}
        return cls(found) if found else None

    def apply(self) -> None:
        """Into this process's environment (a worker, before it touches storage)."""
        os.environ.update(self._values)

    def s3_filesystem(self) -> Any:
        """A pyarrow S3 filesystem holding these keys (for Ray Train's controller, which may run on
        a node without them)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self._values.get("AWS_ACCESS_KEY_ID"),
            secret_key=self._values.get("AWS_SECRET_ACCESS_KEY"),
            session_token=self._values.get("AWS_SESSION_TOKEN"),
            endpoint_override=_endpoint(),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )

    def __repr__(self) -> str:
        return f"Credentials({', '.join(self._values)}: redacted)"

    __str__ = __repr__


def is_remote(path: str | os.PathLike) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _endpoint() -> str | None:
    """The S3 endpoint override from the standard variables (the S3-specific one first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _fs(uri: str, quick: bool = False) -> tuple[Any, str]:
    """pyarrow filesystem and in-filesystem path of `uri`. `quick`: short timeouts and no retries,
    so an unreachable endpoint fails in seconds (the pre-flight probe)."""
    import pyarrow.fs as pafs

    if quick and uri.startswith("s3://"):
        endpoint = _endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None and endpoint is None:
            # What FileSystem.from_uri (Ray's path) does: ask AWS where the bucket lives.
            region = pafs.resolve_s3_region(uri.removeprefix("s3://").split("/", 1)[0])
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            region=region,
            connect_timeout=3,
            request_timeout=5,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        return fs, uri.removeprefix("s3://").rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def _where(uri: str) -> str:
    endpoint = _endpoint()
    return f" (endpoint {endpoint} from AWS_ENDPOINT_URL)" if uri.startswith("s3://") and endpoint else ""


def check_storage(uri: str, field: str) -> None:
    """Prove `uri` takes, returns and deletes a file, in seconds, or fail naming `field` and the fix."""
    if "?" in uri:
        # accel-tp joins paths onto the URI; options belong in the standard variables.
        raise ConfigError(
            f"{field}: {uri!r} has URI options; set them through the standard variables instead "
            "(AWS_REGION, AWS_ENDPOINT_URL) and pass a plain s3://bucket/prefix."
        )
    try:
        fs, path = _fs(uri, quick=True)
        probe = f"{path}/.accel-tp-write-test-{os.urandom(6).hex()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        with fs.open_input_stream(probe) as f:
            ok = f.read() == b"ok"
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError / ArrowInvalid / ValueError by backend
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{field}: cannot write to {uri!r}{_where(uri)}: {detail}. Check the URI, that the bucket "
            "exists, AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."
        ) from None
    if not ok:
        raise ConfigError(f"{field}: {uri!r} did not return what was written to it.")


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def download(uri: str, local: str | os.PathLike) -> Path:
    """Copy a remote folder (or file) to `local`."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    local = Path(local)
    is_file = fs.get_file_info(path).type == pafs.FileType.File
    (local.parent if is_file else local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def replace_folder(local: str | os.PathLike, uri: str) -> None:
    """Make the remote folder `uri` hold exactly the files of `local`: the new files are uploaded
    first, then the ones only an earlier version had are deleted (a failed upload leaves the old
    version's files, never an empty folder)."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    before = []
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        before = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file]
    upload(local, uri)
    keep = {f"{path}/{p.relative_to(local).as_posix()}" for p in Path(local).rglob("*") if p.is_file()}
    for stale in before:
        if stale not in keep:
            fs.delete_file(stale)


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file or folder to `uri` (objects are replaced whole: readers never see half)."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    local = Path(local)
    if local.is_dir():
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
