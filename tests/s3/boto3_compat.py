"""S3 compatibility through the encrypting gateway (issue 13, bugs 3, 4, 5, 8, 9, 10 and the
refusals): what real clients hit. boto3 against the proxy, moto upstream.

Run by tests/s3_compat.rs with:
  PROXY_URL, MOTO_URL, CLIENT_KEY, CLIENT_SECRET, BUCKET, CHECKSUMS
Every check raises on failure; the last line printed is 'N passed, 0 failed'.
"""
import base64
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402
from harness import BUCKET, PROXY, check, done, expect_error, proxy, raw  # noqa: E402

MiB = 1024 * 1024
proxy.create_bucket(Bucket=BUCKET)


def http(method, url, headers=None, data=None):
    """(status, headers, body) of a plain HTTP request: no SDK in between."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# boto3 asks for checksums on every GET unless told otherwise.
no_validation = boto3.client(
    "s3", endpoint_url=PROXY, aws_access_key_id=os.environ["CLIENT_KEY"],
    aws_secret_access_key=os.environ["CLIENT_SECRET"], region_name="us-east-1",
    config=Config(s3={"addressing_style": "path"}, response_checksum_validation="when_required", retries={"total_max_attempts": 1}),
)


def b64(digest):
    return base64.b64encode(digest).decode()


# --- 4. Verified checksums are echoed, kept (sealed) and returned by GET/HEAD ChecksumMode.
body = b"checksummed body " * 1000
for algo, want in [
    ("SHA256", b64(hashlib.sha256(body).digest())),
    ("SHA1", b64(hashlib.sha1(body).digest())),
    ("CRC32", b64(zlib.crc32(body).to_bytes(4, "big"))),
]:
    key = f"checksum-{algo}"
    header = f"x-amz-checksum-{algo.lower()}"
    put = proxy.put_object(Bucket=BUCKET, Key=key, Body=body, ChecksumAlgorithm=algo)
    echoed = put["ResponseMetadata"]["HTTPHeaders"].get(header)
    check(f"{algo}: PutObject echoes the checksum", echoed == want, f"{echoed} != {want}")
    got = proxy.get_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    check(f"{algo}: GET ChecksumMode returns it", got["ResponseMetadata"]["HTTPHeaders"].get(header) == want, str(got["ResponseMetadata"]["HTTPHeaders"]))
    check(f"{algo}: GET body (validated by boto3)", got["Body"].read() == body)
    head = proxy.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    check(f"{algo}: HEAD ChecksumMode returns it", head["ResponseMetadata"]["HTTPHeaders"].get(header) == want)
    plain = no_validation.get_object(Bucket=BUCKET, Key=key)
    check(f"{algo}: no ChecksumMode, no checksum", header not in plain["ResponseMetadata"]["HTTPHeaders"])
    ranged = proxy.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-9", ChecksumMode="ENABLED")
    check(f"{algo}: a range carries no whole-object checksum", header not in ranged["ResponseMetadata"]["HTTPHeaders"] and ranged["Body"].read() == body[:10])
    # At rest: the checksum of the plaintext is sealed, never stored in clear.
    stored = raw.head_object(Bucket=BUCKET, Key=key)
    meta = stored["Metadata"]
    check(f"{algo}: kept sealed", "ep-checksum" in meta and want not in str(stored), str(meta))
    check(f"{algo}: storage got no plaintext checksum", stored["ResponseMetadata"]["HTTPHeaders"].get(header) != want)

# A wrong checksum is refused, nothing stored.
expect_error(
    "a wrong checksum is BadDigest",
    lambda: proxy.put_object(Bucket=BUCKET, Key="bad-checksum", Body=b"abc", ChecksumSHA256=b64(hashlib.sha256(b"abd").digest())),
    {"BadDigest", "InvalidRequest"},
)
expect_error("nothing stored after BadDigest", lambda: raw.head_object(Bucket=BUCKET, Key="bad-checksum"), {"404", "NoSuchKey"})

# A sealed checksum moved onto another object does not open there: the read fails, it never
# returns a value that is not this object's.
other = raw.head_object(Bucket=BUCKET, Key="checksum-SHA1")["Metadata"]["ep-checksum"]
victim = raw.head_object(Bucket=BUCKET, Key="checksum-SHA256")["Metadata"]
victim["ep-checksum"] = other
raw.copy_object(Bucket=BUCKET, Key="checksum-SHA256", CopySource={"Bucket": BUCKET, "Key": "checksum-SHA256"}, Metadata=victim, MetadataDirective="REPLACE")
expect_error(
    "a foreign sealed checksum fails the read",
    lambda: proxy.get_object(Bucket=BUCKET, Key="checksum-SHA256", ChecksumMode="ENABLED")["Body"].read(),
    {"InternalError", "500"},
)

# --- 3. GetObjectAttributes is answered as HEAD is.
ALL = ["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"]
attrs = proxy.get_object_attributes(Bucket=BUCKET, Key="checksum-CRC32", ObjectAttributes=ALL)
head = proxy.head_object(Bucket=BUCKET, Key="checksum-CRC32")
check("attributes: plaintext size", attrs["ObjectSize"] == len(body), str(attrs))
check("attributes: the ETag HEAD gives", '"' + attrs["ETag"] + '"' == head["ETag"], f"{attrs['ETag']} / {head['ETag']}")
check("attributes: the client's checksum", attrs.get("Checksum", {}).get("ChecksumCRC32") == b64(zlib.crc32(body).to_bytes(4, "big")), str(attrs))
check("attributes: storage class", attrs["StorageClass"] == "STANDARD")
check("attributes: no parts for a single-part object", "ObjectParts" not in attrs)
up = proxy.create_multipart_upload(Bucket=BUCKET, Key="attr-mp")["UploadId"]
sizes = [5 * MiB, 5 * MiB, 1234]
parts = []
for i, n in enumerate(sizes, start=1):
    r = proxy.upload_part(Bucket=BUCKET, Key="attr-mp", UploadId=up, PartNumber=i, Body=os.urandom(n))
    parts.append({"ETag": r["ETag"], "PartNumber": i})
proxy.complete_multipart_upload(Bucket=BUCKET, Key="attr-mp", UploadId=up, MultipartUpload={"Parts": parts})
attrs = proxy.get_object_attributes(Bucket=BUCKET, Key="attr-mp", ObjectAttributes=ALL)
check("attributes (multipart): plaintext size", attrs["ObjectSize"] == sum(sizes), str(attrs))
op = attrs["ObjectParts"]
check("attributes (multipart): parts count", op["TotalPartsCount"] == 3, str(op))
check("attributes (multipart): part sizes", [p["Size"] for p in op["Parts"]] == sizes, str(op))
page = proxy.get_object_attributes(Bucket=BUCKET, Key="attr-mp", ObjectAttributes=["ObjectParts"], MaxParts=1, PartNumberMarker=1)["ObjectParts"]
check("attributes (multipart): paging", [p["PartNumber"] for p in page["Parts"]] == [2] and page["IsTruncated"], str(page))
expect_error("attributes: missing key", lambda: proxy.get_object_attributes(Bucket=BUCKET, Key="nope", ObjectAttributes=ALL), {"NoSuchKey", "404"})

# --- 9. SigV2 (header) on bucket- and object-level requests.
v2 = boto3.client(
    "s3", endpoint_url=PROXY, aws_access_key_id=os.environ["CLIENT_KEY"],
    aws_secret_access_key=os.environ["CLIENT_SECRET"], region_name="us-east-1",
    config=Config(signature_version="s3", s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, read_timeout=20),
)
v2.put_object(Bucket=BUCKET, Key="v2/object", Body=b"signed v2")
check("SigV2: object GET", v2.get_object(Bucket=BUCKET, Key="v2/object")["Body"].read() == b"signed v2")
listed = v2.list_objects_v2(Bucket=BUCKET, Prefix="v2/")
check("SigV2: bucket listing", [o["Key"] for o in listed.get("Contents", [])] == ["v2/object"], str(listed.get("Contents")))
check("SigV2: HeadBucket", v2.head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200)
check("SigV2: GetBucketLocation", v2.get_bucket_location(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200)
deleted = v2.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "v2/object"}]})
check("SigV2: DeleteObjects", [d["Key"] for d in deleted.get("Deleted", [])] == ["v2/object"], str(deleted))
bad = boto3.client(
    "s3", endpoint_url=PROXY, aws_access_key_id=os.environ["CLIENT_KEY"],
    aws_secret_access_key="not-the-secret", region_name="us-east-1",
    config=Config(signature_version="s3", s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
)
expect_error("SigV2: a wrong secret on a bucket request", lambda: bad.list_objects_v2(Bucket=BUCKET), {"SignatureDoesNotMatch", "AccessDenied"})

# --- 10. Presigned URLs with a zero or negative expiry: 403 AccessDenied, as S3 answers.
proxy.put_object(Bucket=BUCKET, Key="presigned", Body=b"p")
for expires in (0, -5):
    for method, op in (("GET", "get_object"), ("PUT", "put_object")):
        url = proxy.generate_presigned_url(op, Params={"Bucket": BUCKET, "Key": "presigned"}, ExpiresIn=expires)
        status, _, text = http(method, url, data=b"x" if method == "PUT" else None)
        check(f"presigned {method} expiry {expires}: 403 AccessDenied", status == 403 and b"<Code>AccessDenied</Code>" in text, f"{status} {text[:200]}")
check("presigned PUT with a bad expiry wrote nothing", proxy.get_object(Bucket=BUCKET, Key="presigned")["Body"].read() == b"p")

# --- 8. CORS preflight: unsigned OPTIONS goes to the storage, which answers from the bucket's
# CORS configuration; any other unsigned request is refused as S3 refuses it.
raw.put_bucket_cors(Bucket=BUCKET, CORSConfiguration={"CORSRules": [{"AllowedOrigins": ["https://app.example"], "AllowedMethods": ["PUT", "GET"], "AllowedHeaders": ["*"]}]})
obj = f"{PROXY}/{BUCKET}/upload-target"
status, headers, _ = http("OPTIONS", obj, {"Origin": "https://app.example", "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"})
lower = {k.lower(): v for k, v in headers.items()}
check("preflight: allowed origin answered", status == 200 and lower.get("access-control-allow-origin") == "https://app.example", f"{status} {headers}")
check("preflight: methods named", "PUT" in lower.get("access-control-allow-methods", ""), str(headers))
status, headers, _ = http("OPTIONS", obj, {"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})
check("preflight: other origin not allowed", "access-control-allow-origin" not in {k.lower() for k in headers} or status >= 400, f"{status} {headers}")
status, _, text = http("OPTIONS", obj)
check("unsigned OPTIONS that is no preflight: 403", status == 403 and b"AccessDenied" in text, f"{status} {text[:200]}")
status, _, text = http("GET", obj)
check("anonymous GET: 403 AccessDenied", status == 403 and b"<Code>AccessDenied</Code>" in text, f"{status} {text[:200]}")
status, _, text = http("PUT", f"{PROXY}/{BUCKET}/anonymous", data=b"clear")
check("anonymous PUT: 403 AccessDenied", status == 403 and b"<Code>AccessDenied</Code>" in text, f"{status} {text[:200]}")
expect_error("anonymous PUT stored nothing", lambda: raw.head_object(Bucket=BUCKET, Key="anonymous"), {"404", "NoSuchKey"})

# --- POST Object (browser form upload) is refused with S3's NotImplemented.
# A correctly signed form (boto3's generate_presigned_post): the file would pass in clear, so
# the gateway answers 501 NotImplemented; nothing reaches storage.
post = proxy.generate_presigned_post(BUCKET, "form-upload")
boundary = "----envelopeproxytest"
form = b""
for k, v in list(post["fields"].items()) + [("file", "clear form data")]:
    extra = '; filename="f.txt"' if k == "file" else ""
    form += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"{extra}\r\n\r\n{v}\r\n'.encode()
form += f"--{boundary}--\r\n".encode()
status, _, text = http("POST", post["url"], {"Content-Type": f"multipart/form-data; boundary={boundary}"}, form)
check("POST Object: 501 NotImplemented", status == 501 and b"<Code>NotImplemented</Code>" in text, f"{status} {text[:300]}")
expect_error("POST Object stored nothing", lambda: raw.head_object(Bucket=BUCKET, Key="form-upload"), {"404", "NoSuchKey"})

# --- A PutObject with Transfer-Encoding: chunked and no length: 411 MissingContentLength, as S3.
import http.client  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

from botocore.auth import SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

url = f"{PROXY}/{BUCKET}/chunked-no-length"
signed = AWSRequest(method="PUT", url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
SigV4Auth(Credentials(os.environ["CLIENT_KEY"], os.environ["CLIENT_SECRET"]), "s3", "us-east-1").add_auth(signed)
u = urlparse(url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
conn.request("PUT", u.path, body=iter([b"clear ", b"bytes"]), headers=dict(signed.headers.items()), encode_chunked=True)
resp = conn.getresponse()
text = resp.read()
check("chunked PUT without a length: 411 MissingContentLength", resp.status == 411 and b"MissingContentLength" in text, f"{resp.status} {text[:200]}")
expect_error("chunked PUT stored nothing", lambda: raw.head_object(Bucket=BUCKET, Key="chunked-no-length"), {"404", "NoSuchKey"})

done()
