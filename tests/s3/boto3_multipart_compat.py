"""S3 compatibility of multipart uploads through the encrypting gateway (issue 13): what SDKs
and the aws cli rely on when they retry or resume. boto3 against the proxy, moto upstream.

Run by tests/s3_multipart_compat.rs with:
  PROXY_URL, MOTO_URL, CLIENT_KEY, CLIENT_SECRET, BUCKET, CHECKSUMS
Every check raises on failure; the last line printed is 'N passed, 0 failed'.
"""
import base64
import hashlib
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUCKET, check, done, expect_error, proxy, raw  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

MiB = 1024 * 1024
proxy.create_bucket(Bucket=BUCKET)


def parts_of(up, key, bodies):
    out = []
    for i, b in enumerate(bodies, start=1):
        r = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=i, Body=b)
        out.append({"ETag": r["ETag"], "PartNumber": i})
    return out


# --- A repeated Complete answers 200 again with the same result (SDKs retry Complete after a
# lost response); the object reads back.
key = "complete-twice"
bodies = [os.urandom(5 * MiB), os.urandom(1000)]
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
parts = parts_of(up, key, bodies)
first = proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": parts})
second = proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": parts})
check("complete twice: 200 both times", first["ResponseMetadata"]["HTTPStatusCode"] == 200 and second["ResponseMetadata"]["HTTPStatusCode"] == 200)
check("complete twice: same ETag", first["ETag"] == second["ETag"] and first["ETag"].strip('"').endswith("-2"), f"{first['ETag']} / {second['ETag']}")
check("complete twice: bucket and key", (second["Bucket"], second["Key"]) == (BUCKET, key), str(second))
check("complete twice: object reads back", proxy.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"".join(bodies))
# Another upload's id (or an upload that never completed here) is still NoSuchUpload.
other = proxy.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
proxy.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=other)
expect_error("complete of an aborted upload", lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=other, MultipartUpload={"Parts": parts}), {"NoSuchUpload"})
# Once the key holds another object, the old upload's retry is NoSuchUpload too.
proxy.put_object(Bucket=BUCKET, Key=key, Body=b"replaced")
expect_error("complete retry after the key was replaced", lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": parts}), {"NoSuchUpload"})

# --- The same part uploaded twice gets the same ETag; Complete accepts the first response's.
key = "part-twice"
p1, p2 = os.urandom(5 * MiB), os.urandom(3000)
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
e1 = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=p1)["ETag"]
e1_again = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=p1)["ETag"]
e2 = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=2, Body=p2)["ETag"]
check("same part twice: same ETag", e1 == e1_again, f"{e1} / {e1_again}")
check("part ETags are marked", e1.strip('"').endswith("-0"), e1)
check("another part, another ETag", e1 != e2)
r = proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": [
    {"ETag": e1, "PartNumber": 1}, {"ETag": e2, "PartNumber": 2}]})
check("complete with the first ETag", r["ETag"].strip('"').endswith("-2"), str(r))
check("complete with the first ETag reads back", proxy.get_object(Bucket=BUCKET, Key=key)["Body"].read() == p1 + p2)
# A client resuming from ListParts names the listed ETags: accepted too.
key = "resume-from-list"
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
parts_of(up, key, [p1, p2])
listed = proxy.list_parts(Bucket=BUCKET, Key=key, UploadId=up)["Parts"]
r = proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": [
    {"ETag": p["ETag"], "PartNumber": p["PartNumber"]} for p in listed]})
check("complete with listed ETags reads back", proxy.get_object(Bucket=BUCKET, Key=key)["Body"].read() == p1 + p2)

# --- A too-small non-last part is S3's 400 EntityTooSmall, checked before the gateway's layout
# rule (1 000 000 bytes is no multiple of 16 KiB; 1 MiB is, and then storage refuses it too).
for n, small in enumerate([1_000_000, MiB]):
    key = f"too-small-{n}"
    up = proxy.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    parts = parts_of(up, key, [os.urandom(small), os.urandom(10)])
    try:
        proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": parts})
        check(f"{small}-byte non-last part refused", False, "no error")
    except ClientError as e:
        code, status = e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
        check(f"{small}-byte non-last part: EntityTooSmall 400", (code, status) == ("EntityTooSmall", 400), f"{code} {status}")
    check("refused upload stays", len(proxy.list_parts(Bucket=BUCKET, Key=key, UploadId=up)["Parts"]) == 2)
    proxy.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up)

# --- Ids from ListMultipartUploads complete and abort.
body = os.urandom(5 * MiB)
up_c = proxy.create_multipart_upload(Bucket=BUCKET, Key="listed-complete")["UploadId"]
up_a = proxy.create_multipart_upload(Bucket=BUCKET, Key="listed-abort")["UploadId"]
parts = parts_of(up_c, "listed-complete", [body, b"tail"])
parts_of(up_a, "listed-abort", [b"x" * 100])
listed = {u["Key"]: u["UploadId"] for u in proxy.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])}
check("uploads listed", {"listed-complete", "listed-abort"} <= set(listed), str(listed))
r = proxy.complete_multipart_upload(Bucket=BUCKET, Key="listed-complete", UploadId=listed["listed-complete"], MultipartUpload={"Parts": parts})
check("complete with the listed id", r["ETag"].strip('"').endswith("-2"), str(r))
check("complete with the listed id reads back", proxy.get_object(Bucket=BUCKET, Key="listed-complete")["Body"].read() == body + b"tail")
proxy.abort_multipart_upload(Bucket=BUCKET, Key="listed-abort", UploadId=listed["listed-abort"])
left = [u["Key"] for u in raw.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]
check("abort with the listed id", "listed-abort" not in left and "listed-complete" not in left, str(left))
# A listed id carries no data key: parts need the id Create returned (a clear refusal).
up = proxy.create_multipart_upload(Bucket=BUCKET, Key="listed-part")["UploadId"]
bare = [u["UploadId"] for u in proxy.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) if u["Key"] == "listed-part"][0]
expect_error("upload part with a listed id", lambda: proxy.upload_part(Bucket=BUCKET, Key="listed-part", UploadId=bare, PartNumber=1, Body=b"x"), {"InvalidArgument"})
proxy.abort_multipart_upload(Bucket=BUCKET, Key="listed-part", UploadId=bare)

# --- UploadPart answers with the checksum it verified over the plaintext.
key = "part-checksums"
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
data = os.urandom(5 * MiB)
r = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=data, ChecksumAlgorithm="SHA256")
want = base64.b64encode(hashlib.sha256(data).digest()).decode()
check("upload part echoes its SHA256", r.get("ChecksumSHA256") == want, f"{r.get('ChecksumSHA256')} / {want}")
tail = b"the last part"
r = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=2, Body=tail, ChecksumAlgorithm="CRC32")
want = base64.b64encode(zlib.crc32(tail).to_bytes(4, "big")).decode()
check("upload part echoes its CRC32", r.get("ChecksumCRC32") == want, f"{r.get('ChecksumCRC32')} / {want}")
r = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=2, Body=tail, ChecksumSHA256=base64.b64encode(hashlib.sha256(tail).digest()).decode())
check("upload part echoes a given SHA256", r.get("ChecksumSHA256") == base64.b64encode(hashlib.sha256(tail).digest()).decode(), str(r.get("ChecksumSHA256")))
expect_error("upload part with a wrong SHA256", lambda: proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=2, Body=tail,
             ChecksumSHA256=base64.b64encode(hashlib.sha256(b"other").digest()).decode()), {"BadDigest"})
proxy.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up)

done()
