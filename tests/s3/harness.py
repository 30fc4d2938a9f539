"""Shared setup of the boto3 suites: clients for the proxy and for the storage behind it, and
the check helpers. Environment: PROXY_URL, MOTO_URL, CLIENT_KEY, CLIENT_SECRET, BUCKET,
CHECKSUMS, CA_BUNDLE (when the proxy listens on TLS)."""
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

PROXY = os.environ["PROXY_URL"]
MOTO = os.environ["MOTO_URL"]
BUCKET = os.environ["BUCKET"]
VERIFY = os.environ.get("CA_BUNDLE") or None  # the test CA when the proxy listens on TLS
# The storage is s3s-fs (UPSTREAM=s3s-fs) rather than moto: the suites skip what s3s-fs 0.14
# itself does not do (see each use).
S3S_FS = os.environ.get("UPSTREAM") == "s3s-fs"

cfg = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    # No retries: every request must succeed (or fail as expected) on its first attempt; a
    # retry would hide a response the client missed. A read timeout well below boto3's 60 s, so
    # such a miss costs seconds, not minutes.
    retries={"total_max_attempts": 1},
    read_timeout=20,
    request_checksum_calculation=os.environ.get("CHECKSUMS", "when_supported"),
)
proxy = boto3.client(
    "s3",
    endpoint_url=PROXY,
    aws_access_key_id=os.environ["CLIENT_KEY"],
    aws_secret_access_key=os.environ["CLIENT_SECRET"],
    region_name="us-east-1",
    config=cfg,
    verify=VERIFY,
)
# Straight to storage, as an attacker or auditor would look at it.
raw = boto3.client(
    "s3",
    endpoint_url=MOTO,
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
    region_name="us-east-1",
    config=Config(s3={"addressing_style": "path"}),
)

_passed = 0


def check(name, cond, detail=""):
    global _passed
    if not cond:
        print(f"FAILED: {name} {detail}", file=sys.stderr)
        print(f"{_passed} passed, 1 failed")
        sys.exit(1)
    _passed += 1


def expect_error(name, fn, codes):
    try:
        fn()
    except ClientError as e:
        code = e.response["Error"]["Code"]
        check(name, code in codes, f"got {code}: {e}")
        return
    except Exception as e:  # an aborted body, for example
        check(name, "*" in codes, f"got {e!r}")
        return
    check(name, False, "no error")


def done():
    print(f"{_passed} passed, 0 failed")
