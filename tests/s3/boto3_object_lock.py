"""Writes through the gateway into a bucket with Object Lock and a default retention period
(issue 13, bug 5): S3 refuses a write there without an integrity header
(MissingUploadObjectWithObjectLockHeaders). The gateway sends a CRC32 of the ciphertext as an
aws-chunked trailer. EXPECT=ok: every write succeeds and reads back; EXPECT=refused (the
route's upstream_checksum = false): the storage refuses them.

Run by tests/s3_compat.rs with PROXY_URL, MOTO_URL, CLIENT_KEY, CLIENT_SECRET, BUCKET,
CHECKSUMS, EXPECT.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUCKET, check, done, expect_error, proxy, raw  # noqa: E402

MiB = 1024 * 1024
raw.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
raw.put_object_lock_configuration(
    Bucket=BUCKET,
    ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}},
)
body = os.urandom(200_000)
if os.environ["EXPECT"] == "ok":
    proxy.put_object(Bucket=BUCKET, Key="single", Body=body)
    check("locked: PutObject reads back", proxy.get_object(Bucket=BUCKET, Key="single")["Body"].read() == body)
    stored = raw.get_object(Bucket=BUCKET, Key="single")["Body"].read()
    check("locked: ciphertext at rest", body[:64] not in stored and len(stored) > len(body))
    up = proxy.create_multipart_upload(Bucket=BUCKET, Key="parts")["UploadId"]
    bodies = [os.urandom(5 * MiB), os.urandom(777)]
    parts = []
    for i, b in enumerate(bodies, start=1):
        r = proxy.upload_part(Bucket=BUCKET, Key="parts", UploadId=up, PartNumber=i, Body=b)
        parts.append({"ETag": r["ETag"], "PartNumber": i})
    proxy.complete_multipart_upload(Bucket=BUCKET, Key="parts", UploadId=up, MultipartUpload={"Parts": parts})
    check("locked: multipart reads back", proxy.get_object(Bucket=BUCKET, Key="parts")["Body"].read() == b"".join(bodies))
    # A copy re-sealed into the locked bucket is a write too.
    proxy.copy_object(Bucket=BUCKET, Key="copy", CopySource={"Bucket": BUCKET, "Key": "parts"})
    check("locked: copy reads back", proxy.get_object(Bucket=BUCKET, Key="copy")["Body"].read() == b"".join(bodies))
else:
    expect_error(
        "without the upstream checksum the storage refuses the write",
        lambda: proxy.put_object(Bucket=BUCKET, Key="single", Body=body),
        {"MissingUploadObjectWithObjectLockHeaders", "InvalidRequest", "400"},
    )
done()
