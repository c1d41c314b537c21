"""``s3://`` through boto3, as it was tested against SeaweedFS and the chaos proxy.

Credentials come from the standard AWS chain (environment, shared files, instance
profile) and are never read, printed or logged here. The endpoint comes from
``storage.endpoint_url`` or ``AWS_ENDPOINT_URL``; Arrow's own environment support is
patchy, so its S3 filesystem is always built here and passed explicitly. Each call is
retried by botocore's standard strategy, and reads, writes and existence checks again
around it, body included (:func:`~mmrad.storage.errors.call_with_retries`). The node
cache's fingerprint of an object is its size and ETag.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mmrad.storage.credentials import credential_fingerprint
from mmrad.storage.errors import (
    AccessDenied,
    ObjectMissing,
    StorageError,
    call_with_retries,
    first_line,
)
from mmrad.storage.uris import split_s3

if TYPE_CHECKING:
    from mmrad.storage.core import Storage

CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                        "AWS_PROFILE")  # fmt: skip


def s3_error_for(uri: str, err: Exception) -> StorageError:
    """Translate a botocore error into one that says what is wrong with which URI."""
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    text = f"{code} {err}"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return ObjectMissing(f"{uri}: bucket does not exist")
    if code in {"NoSuchKey", "404"} or "NoSuchKey" in text or "Path does not exist" in text:
        return ObjectMissing(f"{uri}: no such object")
    denied = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    if code == "403" or any(c in text for c in denied):
        return AccessDenied(f"{uri}: access denied (check the AWS credentials and permissions)")
    return StorageError(f"{uri}: {type(err).__name__}: {first_line(err)}")


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, region: str | None, max_attempts: int, _fingerprint: str):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"})
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


@dataclass(frozen=True)
class S3Backend:
    storage: Storage

    @property
    def endpoint(self) -> str | None:
        return self.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def client(self):
        fingerprint = credential_fingerprint(CREDENTIAL_VARIABLES)
        return _s3_client(self.endpoint, self.storage.region, self.storage.max_attempts,
                          fingerprint)  # fmt: skip

    def _call(self, uri: str, call):
        return call_with_retries(uri, call, self.storage.outage_timeout_s, s3_error_for)

    def read(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        return self._call(
            uri, lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        )

    def write(self, uri: str, data: bytes) -> None:
        """Atomic: a complete put, so readers see the old object or the whole new one."""
        bucket, key = split_s3(uri)
        self._call(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self._call(uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
            return True
        except ObjectMissing as error:
            if "no such object" in str(error):
                return False
            raise

    def _objects(self, prefix: str) -> list[dict]:
        """Listed objects below ``prefix`` (a folder): keys ending in ``/`` are folder
        markers (pyarrow's), no files."""
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                objects = page.get("Contents", [])
                found.extend(obj for obj in objects if not obj["Key"].endswith("/"))
        except Exception as err:
            raise s3_error_for(prefix, err) from None
        for obj in found:
            obj["uri"] = f"s3://{bucket}/{obj['Key']}"
        return found

    def list(self, prefix: str) -> list[str]:
        return sorted(obj["uri"] for obj in self._objects(prefix))

    def versions(self, prefix: str) -> dict[str, list]:
        return {obj["uri"]: [obj["Size"], obj.get("ETag", "")] for obj in self._objects(prefix)}

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as err:
            raise s3_error_for(uri, err) from None

    def ensure_bucket(self, uri: str) -> None:
        bucket, _ = split_s3(uri)
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception:
            try:
                self.client.create_bucket(Bucket=bucket)
            except Exception as err:
                raise s3_error_for(uri, err) from None

    def download_file(self, uri: str, destination: Path) -> None:
        """Streamed and multi-part (a 4 GB shard is never held in memory)."""
        bucket, key = split_s3(uri)
        try:
            self.client.download_file(bucket, key, str(destination))
        except Exception as err:
            raise StorageError(f"{uri}: download failed: {first_line(err)}") from None

    def upload_file(self, path: Path, uri: str) -> None:
        """Streamed and multi-part: one ``put_object`` holds the file in memory and stops
        at 5 GB, and a 7B model's ``model.safetensors`` is 15 GB."""
        bucket, key = split_s3(uri)
        try:
            self.client.upload_file(str(path), bucket, key)
        except Exception as err:
            raise StorageError(f"{uri}: upload failed: {first_line(err)}") from None

    def arrow(self, uri: str) -> tuple[pafs.FileSystem, str]:
        bucket, key = split_s3(uri)
        return self.arrow_s3(), f"{bucket}/{key}".rstrip("/")

    def arrow_s3(self) -> pafs.S3FileSystem:
        retries = pafs.AwsStandardS3RetryStrategy(self.storage.max_attempts)
        kwargs: dict = {"retry_strategy": retries}
        if self.storage.region:
            kwargs["region"] = self.storage.region
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
            kwargs.setdefault("region", "us-east-1")
        return pafs.S3FileSystem(**kwargs)
