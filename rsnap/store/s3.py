"""S3-compatible store: `s3://bucket/prefix`, an OpenDAL operator config (rsnap.store.opendal_backend).

Configuration is the standard AWS one: AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN, AWS_REGION,
AWS_ENDPOINT_URL (path-style addressing whenever an endpoint is given), ~/.aws/config and
credentials with AWS_PROFILE, web-identity and instance roles. OpenDAL reads credentials itself;
a profile's region and endpoint_url are resolved here (rsnap.store.aws). URL query parameters
override: `s3://bucket/prefix?region=eu-west-1&endpoint=http://127.0.0.1:9000&profile=ci`.
"""
from __future__ import annotations

import os
from urllib.parse import parse_qs, urlparse

from ..errors import PermanentStoreError
from .aws import profile_settings
from .opendal_backend import OpenDALBackend, redact


def resolve(url: str) -> tuple[str, str, dict]:
    """(bucket, prefix, OpenDAL options) for an s3:// URL and the AWS environment."""
    p = urlparse(url)
    bucket, prefix = p.netloc, p.path.strip("/")
    if p.scheme != "s3" or not bucket or "@" in bucket:
        raise PermanentStoreError(f"invalid S3 store URL {redact(url)!r} (use s3://bucket/prefix)")
    q, env = {k: v[-1] for k, v in parse_qs(p.query).items()}, os.environ
    profile = q.get("profile") or env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    region = q.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    endpoint = q.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not region or not endpoint:
        prof = profile_settings(profile)
        region, endpoint = region or prof.get("region"), endpoint or prof.get("endpoint_url")
    opts = {"bucket": bucket, "root": "/" + prefix, "region": region or "us-east-1"}
    if endpoint:
        opts["endpoint"] = endpoint      # OpenDAL addresses it path-style unless told otherwise
    if q.get("virtual_host") in ("1", "true"):
        opts["enable_virtual_host_style"] = "true"
    if q.get("profile") or env.get("AWS_PROFILE"):
        opts["profile"] = profile
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        opts["disable_ec2_metadata"] = "true"
    return bucket, prefix, opts


class S3Store(OpenDALBackend):
    label = "S3"
    denied_hint = "check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE or role) and the bucket policy"
    missing_container_codes = ("NoSuchBucket",)

    def __init__(self, url: str, jobs: int | None = None):
        self.bucket, self.prefix, opts = resolve(url)
        self.container = f"S3 bucket {self.bucket!r}"
        super().__init__("s3", opts, url=f"s3://{self.bucket}/{self.prefix}".rstrip("/"), env="S3", jobs=jobs,
                         endpoint=opts.get("endpoint") or f"https://s3.{opts['region']}.amazonaws.com")
