"""Multipart uploads through the encrypting S3 gateway: boto3 against the proxy, moto upstream.

Run by tests/s3_gateway.rs with:
  PROXY_URL, MOTO_URL, CLIENT_KEY, CLIENT_SECRET, BUCKET, CHECKSUMS
Every check raises on failure; the last line printed is 'N passed, 0 failed'.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from boto3.s3.transfer import TransferConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUCKET, PROXY, S3S_FS, VERIFY, check, done, expect_error, proxy, raw  # noqa: E402

MiB = 1024 * 1024
CHUNK = 16384


def ct_len(p):
    """Stored size of one part (one C2SP message) of p plaintext bytes."""
    return p + 16 * (p // CHUNK) + 72


def stored_parts(key, sizes):
    """The stored bytes of each part of a multipart object, read straight from moto."""
    data = raw.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    out, at = [], 0
    for p in sizes:
        out.append(data[at : at + ct_len(p)])
        at += ct_len(p)
    assert at == len(data), (at, len(data))
    return out


def raw_multipart(key, bodies, metadata):
    """Write a multipart object straight to moto (what a storage-level attacker can do)."""
    up = raw.create_multipart_upload(Bucket=BUCKET, Key=key, Metadata=metadata)
    parts = []
    for i, b in enumerate(bodies, start=1):
        r = raw.upload_part(Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=i, Body=b)
        parts.append({"ETag": r["ETag"], "PartNumber": i})
    raw.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts})


proxy.create_bucket(Bucket=BUCKET)
tmp = tempfile.mkdtemp()
transfer = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)

# --- boto3's managed transfer: 23 MiB in 5 MiB parts (4 × 5 MiB + 3 MiB), uploaded in parallel.
size = 23 * MiB
body = os.urandom(size)
sizes = [5 * MiB] * 4 + [3 * MiB]
src = os.path.join(tmp, "big.bin")
with open(src, "wb") as f:
    f.write(body)
proxy.upload_file(src, BUCKET, "big.bin", Config=transfer, ExtraArgs={"Metadata": {"owner": "ada"}})

if S3S_FS:
    # s3s-fs ignores ?partNumber on HEAD, so the part layout of a multipart object is unknown:
    # the upload works, sizes come from arithmetic, and a read is refused clearly (never garbage).
    head = proxy.head_object(Bucket=BUCKET, Key="big.bin")
    check("multipart head size (s3s-fs)", head["ContentLength"] == size, str(head["ContentLength"]))
    stored = raw.head_object(Bucket=BUCKET, Key="big.bin")["ContentLength"]
    check("multipart stored as ciphertext (s3s-fs)", stored == size + 16 * (size // 16384) + 72 * 5, str(stored))
    expect_error("multipart get on storage without part reads", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin"), {"NotImplemented"})
    done()
    sys.exit(0)

got = proxy.get_object(Bucket=BUCKET, Key="big.bin")
data = got["Body"].read()
check("multipart get round trip", data == body, f"{len(data)} vs {size}")
check("multipart get content-length", got["ContentLength"] == size, str(got["ContentLength"]))
check("multipart get user metadata", got["Metadata"].get("owner") == "ada", str(got["Metadata"]))
check("multipart get hides envelope metadata", not any(k.startswith("ep-") for k in got["Metadata"]))
check("multipart ETag keeps its part count", got["ETag"].strip('"').endswith("-5"), got["ETag"])
head = proxy.head_object(Bucket=BUCKET, Key="big.bin")
check("multipart head size", head["ContentLength"] == size, str(head["ContentLength"]))
listed = {o["Key"]: o for o in proxy.list_objects_v2(Bucket=BUCKET)["Contents"]}
check("multipart listing size", listed["big.bin"]["Size"] == size, str(listed["big.bin"]["Size"]))
dst = os.path.join(tmp, "big.back")
proxy.download_file(BUCKET, "big.bin", dst, Config=transfer)  # parallel ranged GETs
with open(dst, "rb") as f:
    check("multipart download_file round trip", f.read() == body)

stored = raw.get_object(Bucket=BUCKET, Key="big.bin")
sdata = stored["Body"].read()
check("stored multipart size", len(sdata) == sum(ct_len(p) for p in sizes), str(len(sdata)))

# Material for the offline decryption test: the stored body, and its metadata as `aws s3api
# head-object` prints it, with PartsCount and ContentLength from `head-object --part-number 1`
# (part 1's stored size: the part layout). moto omits user metadata on a part HEAD, so the
# two HEADs are merged here.
out_dir = os.environ.get("OUT_DIR")
if out_dir:
    import json
    part1 = raw.head_object(Bucket=BUCKET, Key="big.bin", PartNumber=1)
    meta = {"Metadata": raw.head_object(Bucket=BUCKET, Key="big.bin")["Metadata"]}
    meta.update({k: part1[k] for k in ("PartsCount", "ContentLength")})
    with open(os.path.join(out_dir, "stored.bin"), "wb") as f:
        f.write(sdata)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(out_dir, "key.txt"), "w") as f:
        f.write("big.bin")  # a v2 object opens only with its bucket and key
    with open(os.path.join(out_dir, "plain.bin"), "wb") as f:
        f.write(body)
check("stored multipart size formula", len(sdata) == size + 16 * (size // CHUNK) + 72 * len(sizes))
check("stored multipart is not plaintext", body[:32] not in sdata and body[7 * MiB : 7 * MiB + 32] not in sdata)
check("stored multipart metadata", {"ep-envelope", "ep-object", "ep-multipart"} <= set(stored["Metadata"]), str(stored["Metadata"]))
check("stored multipart marked", stored["Metadata"]["ep-multipart"] == "1")

# --- Ranges across part boundaries (one upstream request each, headers of later parts included).
b5 = 5 * MiB
for rng, want in [
    ("bytes=0-0", body[0:1]),
    (f"bytes={b5 - 10}-{b5 + 10}", body[b5 - 10 : b5 + 11]),
    (f"bytes={b5 - 1}-{b5}", body[b5 - 1 : b5 + 1]),
    (f"bytes={b5}-{b5}", body[b5 : b5 + 1]),
    ("bytes=6000000-6000010", body[6000000:6000011]),  # mid-part: the part header fetched apart
    (f"bytes={2 * b5 - 100}-{4 * b5 + 100}", body[2 * b5 - 100 : 4 * b5 + 101]),
    ("bytes=20000000-", body[20000000:]),
    ("bytes=-5", body[-5:]),
    (f"bytes=-{3 * MiB + 10}", body[-(3 * MiB + 10) :]),
    (f"bytes={size - 10}-{size + 100}", body[size - 10 :]),
]:
    r = proxy.get_object(Bucket=BUCKET, Key="big.bin", Range=rng)
    data = r["Body"].read()
    check(f"multipart range {rng}", data == want, f"{len(data)} vs {len(want)}")
    check(f"multipart range {rng} content-range", r["ContentRange"].endswith(f"/{size}"), r["ContentRange"])
    check(f"multipart range {rng} content-length", r["ContentLength"] == len(want))
expect_error("multipart range past the end", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin", Range=f"bytes={size}-"), {"InvalidRange"})

# --- ?partNumber=N reads one part.
r = proxy.get_object(Bucket=BUCKET, Key="big.bin", PartNumber=2)
check("get part 2", r["Body"].read() == body[b5 : 2 * b5])
check("get part 2 parts count", r.get("PartsCount") == 5, str(r.get("PartsCount")))
check("get part 2 content-range", r["ContentRange"] == f"bytes {b5}-{2 * b5 - 1}/{size}", r["ContentRange"])
r = proxy.head_object(Bucket=BUCKET, Key="big.bin", PartNumber=5)
check("head part 5 size", r["ContentLength"] == 3 * MiB, str(r["ContentLength"]))
expect_error("part 6 of 5", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin", PartNumber=6), {"InvalidPartNumber", "416"})
proxy.put_object(Bucket=BUCKET, Key="single", Body=b"one message")
check("part 1 of a single-part object", proxy.get_object(Bucket=BUCKET, Key="single", PartNumber=1)["Body"].read() == b"one message")

# --- Explicit calls: parts out of order, one retried, ListParts in plaintext sizes.
key = "explicit.bin"
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=key, Metadata={"owner": "grace"}, ContentType="application/x-test")
uid = up["UploadId"]
check("proxy upload id carries the envelope", "." in uid and len(uid) > 100, uid)
p1, p2, p3 = os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(1000)
etags = {}
etags[3] = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=3, Body=p3)["ETag"]
etags[1] = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=1, Body=p1)["ETag"]
proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=2, Body=os.urandom(5 * MiB))
etags[2] = proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=2, Body=p2)["ETag"]  # retried
check("part ETags are marked", all(e.strip('"').endswith("-0") for e in etags.values()), str(etags))
import base64
import hashlib
wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
expect_error("part with a bad Content-MD5", lambda: proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=4, Body=b"x" * 100, ContentMD5=wrong_md5), {"BadDigest", "InvalidDigest"})
lp = proxy.list_parts(Bucket=BUCKET, Key=key, UploadId=uid)
check("list parts plaintext sizes", [(p["PartNumber"], p["Size"]) for p in lp["Parts"]] == [(1, 5 * MiB), (2, 5 * MiB), (3, 1000)], str(lp["Parts"]))
# ListParts shows upstream's ETags (marked): the gateway's part ETags are MACs of the
# plaintext, which ListParts cannot compute; Complete accepts either (FORMAT.md §9).
check("list parts marked ETags", all(p["ETag"].strip('"').endswith("-0") for p in lp["Parts"]), str(lp["Parts"]))
check("list parts gives our upload id back", lp["UploadId"] == uid)
uploads = proxy.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
mine = [u for u in uploads if u["Key"] == key]
check("list multipart uploads", len(mine) == 1, str(uploads))
bare = mine[0]["UploadId"]
check("bare id is the upstream id", uid.startswith(bare + "."), f"{bare} / {uid}")
check("list parts with the bare id", len(proxy.list_parts(Bucket=BUCKET, Key=key, UploadId=bare)["Parts"]) == 3)
expect_error("upload part with a bare id", lambda: proxy.upload_part(Bucket=BUCKET, Key=key, UploadId=bare, PartNumber=1, Body=p1), {"InvalidArgument"})
expect_error(
    "complete with parts out of order",
    lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=uid, MultipartUpload={"Parts": [
        {"ETag": etags[2], "PartNumber": 2}, {"ETag": etags[1], "PartNumber": 1}, {"ETag": etags[3], "PartNumber": 3}]}),
    {"InvalidPartOrder"},
)
expect_error(
    "complete with a gap in part numbers",
    lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=uid, MultipartUpload={"Parts": [
        {"ETag": etags[1], "PartNumber": 1}, {"ETag": etags[3], "PartNumber": 3}]}),
    {"InvalidPart"},
)
expect_error(
    "complete with a wrong plaintext size",
    lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=uid, MpuObjectSize=123, MultipartUpload={"Parts": [
        {"ETag": etags[n], "PartNumber": n} for n in (1, 2, 3)]}),
    {"InvalidRequest"},
)
# Per-part checksums in the Complete body describe plaintext: the proxy drops them. The
# object size the client states is the plaintext size; the proxy checks it.
r = proxy.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=uid, MpuObjectSize=len(p1 + p2 + p3), MultipartUpload={"Parts": [
    {"ETag": etags[n], "PartNumber": n, "ChecksumCRC32": "AAAAAA=="} for n in (1, 2, 3)]})
check("complete ETag", r["ETag"].strip('"').endswith("-3"), r["ETag"])
got = proxy.get_object(Bucket=BUCKET, Key=key)
check("explicit round trip", got["Body"].read() == p1 + p2 + p3)
check("explicit metadata", got["Metadata"] == {"owner": "grace"} and got["ContentType"] == "application/x-test", str(got["Metadata"]))
check("explicit head size", proxy.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == len(p1 + p2 + p3))
whole = p1 + p2 + p3
r = proxy.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={10 * MiB - 3}-")
check("explicit range into the short last part", r["Body"].read() == whole[10 * MiB - 3 :])

# A multipart object is copied by re-encrypting it as one piece (a server-side copy would lose
# its part layout).
r = proxy.copy_object(Bucket=BUCKET, Key="copy-of-big", CopySource={"Bucket": BUCKET, "Key": "big.bin"})
check("copy of a multipart object", proxy.get_object(Bucket=BUCKET, Key="copy-of-big")["Body"].read() == body)
copied = raw.head_object(Bucket=BUCKET, Key="copy-of-big")
check("copy of a multipart object is stored in one piece", copied["ContentLength"] == ct_len(size) and "ep-multipart" not in copied["Metadata"], str(copied["ContentLength"]))
check("copy of a multipart object keeps the metadata", proxy.head_object(Bucket=BUCKET, Key="copy-of-big")["Metadata"] == {"owner": "ada"})

# UploadPartCopy: source ranges (of a multipart and of a single-part object), re-encrypted as
# this upload's parts.
pc = proxy.create_multipart_upload(Bucket=BUCKET, Key="part-copied")
r1 = proxy.upload_part_copy(Bucket=BUCKET, Key="part-copied", UploadId=pc["UploadId"], PartNumber=1,
                            CopySource={"Bucket": BUCKET, "Key": "big.bin"}, CopySourceRange=f"bytes={MiB}-{6 * MiB - 1}")
check("upload part copy ETag", r1["CopyPartResult"]["ETag"].strip('"').endswith("-0"), str(r1))
r2 = proxy.upload_part_copy(Bucket=BUCKET, Key="part-copied", UploadId=pc["UploadId"], PartNumber=2,
                            CopySource={"Bucket": BUCKET, "Key": "single"})
proxy.complete_multipart_upload(Bucket=BUCKET, Key="part-copied", UploadId=pc["UploadId"], MultipartUpload={"Parts": [
    {"ETag": r1["CopyPartResult"]["ETag"], "PartNumber": 1}, {"ETag": r2["CopyPartResult"]["ETag"], "PartNumber": 2}]})
want = body[MiB : 6 * MiB] + b"one message"
check("upload part copy round trip", proxy.get_object(Bucket=BUCKET, Key="part-copied")["Body"].read() == want)
stored_pc = raw.get_object(Bucket=BUCKET, Key="part-copied")["Body"].read()
check("upload part copy stored as ciphertext", len(stored_pc) == ct_len(5 * MiB) + ct_len(11) and want[:64] not in stored_pc)

# --- Abort leaves nothing (with the proxy's id, and with a bare id).
for use_bare in (False, True):
    k = f"aborted-{use_bare}"
    up = proxy.create_multipart_upload(Bucket=BUCKET, Key=k)
    proxy.upload_part(Bucket=BUCKET, Key=k, UploadId=up["UploadId"], PartNumber=1, Body=os.urandom(1000))
    abort_id = up["UploadId"].rsplit(".", 1)[0] if use_bare else up["UploadId"]
    proxy.abort_multipart_upload(Bucket=BUCKET, Key=k, UploadId=abort_id)
    left = [u for u in raw.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) if u["Key"] == k]
    check(f"abort (bare id: {use_bare}) leaves no upload", not left, str(left))
    objs = [o["Key"] for o in raw.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    check(f"abort (bare id: {use_bare}) leaves no object", k not in objs)
    expect_error(f"list parts after abort (bare id: {use_bare})", lambda: proxy.list_parts(Bucket=BUCKET, Key=k, UploadId=up["UploadId"]), {"NoSuchUpload"})

# --- A part size that is not a multiple of 16 KiB is refused at Complete (the upload stays).
k = "odd-parts"
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=k)
odd = [os.urandom(5 * MiB + 100), os.urandom(5 * MiB + 100), os.urandom(10)]
parts = []
for i, b in enumerate(odd, start=1):
    parts.append({"ETag": proxy.upload_part(Bucket=BUCKET, Key=k, UploadId=up["UploadId"], PartNumber=i, Body=b)["ETag"], "PartNumber": i})
expect_error("odd part size refused", lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=k, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}), {"InvalidPart"})
check("refused upload still listed", len(proxy.list_parts(Bucket=BUCKET, Key=k, UploadId=up["UploadId"])["Parts"]) == 3)
objs = [o["Key"] for o in raw.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
check("refused upload wrote no object", k not in objs)
proxy.abort_multipart_upload(Bucket=BUCKET, Key=k, UploadId=up["UploadId"])
# Unequal non-final parts (both multiples of 16 KiB) are refused too.
k = "unequal-parts"
up = proxy.create_multipart_upload(Bucket=BUCKET, Key=k)
parts = []
for i, n in enumerate([6 * MiB, 5 * MiB, 10], start=1):
    parts.append({"ETag": proxy.upload_part(Bucket=BUCKET, Key=k, UploadId=up["UploadId"], PartNumber=i, Body=os.urandom(n))["ETag"], "PartNumber": i})
expect_error("unequal part sizes refused", lambda: proxy.complete_multipart_upload(Bucket=BUCKET, Key=k, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}), {"InvalidPart"})
proxy.abort_multipart_upload(Bucket=BUCKET, Key=k, UploadId=up["UploadId"])

# --- Tampering with what storage holds is detected. Objects are bound to their bucket and key
# (format 2), so the tampered versions are written in big.bin's own place (restored after).
meta = stored["Metadata"]
sparts = stored_parts("big.bin", sizes)
# Untouched stored parts and metadata moved to another key do not open there.
raw_multipart("moved-mp", sparts, meta)
expect_error("a multipart object moved by storage fails", lambda: proxy.get_object(Bucket=BUCKET, Key="moved-mp")["Body"].read(), {"*", "InternalError"})
flipped = bytearray(sparts[1])
flipped[len(flipped) // 2] ^= 1
raw_multipart("big.bin", [sparts[0], bytes(flipped)] + sparts[2:], meta)
check("tampered copy keeps the multipart layout", raw.head_object(Bucket=BUCKET, Key="big.bin")["ETag"].strip('"').endswith("-5"))
expect_error("flipped byte in part 2 fails", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read(), {"*", "InternalError"})
mid = 5 * MiB + (len(flipped) // 2)  # about where the flipped byte decrypts
expect_error("range over the flipped byte fails", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin", Range=f"bytes={mid - 20000}-{mid + 20000}")["Body"].read(), {"*", "InternalError"})
r = proxy.get_object(Bucket=BUCKET, Key="big.bin", Range="bytes=0-99999")
check("an untouched part still reads", r["Body"].read() == body[:100000])
# The same stored parts in another order (as if Complete had listed them swapped).
raw_multipart("big.bin", [sparts[1], sparts[0]] + sparts[2:], meta)
expect_error("swapped parts fail", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read(), {"*", "InternalError"})
expect_error("range in a swapped part fails", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin", Range="bytes=0-10")["Body"].read(), {"*", "InternalError"})
# A part from another object (same bucket, same size) fails too.
explicit_parts = stored_parts(key, [5 * MiB, 5 * MiB, 1000])
raw_multipart("big.bin", [sparts[0], explicit_parts[1]] + sparts[2:], meta)
expect_error("a part of another object fails", lambda: proxy.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read(), {"*", "InternalError"})
# Known limit: someone who can write the store can re-assemble an object from its first
# parts (each part is authenticated, the part count is not: S3 offers no place to bind it at
# Complete). What is served is then an authentic prefix, never altered bytes.
raw_multipart("big.bin", sparts[:4], meta)
short = proxy.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read()
check("dropped last part serves an authentic prefix only", short == body[: 4 * b5], str(len(short)))
raw_multipart("big.bin", sparts, meta)
check("big.bin restored", proxy.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read() == body)

# --- The aws cli, when the test peers have it.
# The aws cli from the test peers' virtualenv (tests/peers/requirements.txt): required.
aws = shutil.which("aws", path=os.path.dirname(sys.executable))
check("aws cli installed in the test peers (run scripts/test.sh)", aws is not None)
if aws:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ["CLIENT_KEY"], AWS_SECRET_ACCESS_KEY=os.environ["CLIENT_SECRET"],
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.path.join(tmp, "aws-config"))
    env.pop("AWS_CA_BUNDLE", None)
    with open(env["AWS_CONFIG_FILE"], "w") as f:
        f.write("[default]\ns3 =\n  multipart_threshold = 8MB\n  multipart_chunksize = 8MB\n  addressing_style = path\n")
    cli_src = os.path.join(tmp, "cli.bin")
    cli_body = os.urandom(20 * MiB)
    with open(cli_src, "wb") as f:
        f.write(cli_body)
    for args in (["cp", cli_src, f"s3://{BUCKET}/cli.bin"], ["cp", f"s3://{BUCKET}/cli.bin", cli_src + ".back"]):
        tls = ["--ca-bundle", VERIFY] if VERIFY else []
        out = subprocess.run([aws, "--endpoint-url", PROXY] + tls + ["s3"] + args, env=env, capture_output=True, text=True)
        check(f"aws s3 {' '.join(args[:1])} exit", out.returncode == 0, out.stderr)
    with open(cli_src + ".back", "rb") as f:
        check("aws s3 cp round trip", f.read() == cli_body)
    check("aws cli upload was multipart", proxy.head_object(Bucket=BUCKET, Key="cli.bin")["ETag"].strip('"').endswith("-3"))
    # A copy to another bucket: the aws cli copies objects above its threshold with
    # UploadPartCopy, which the gateway serves by re-encrypting each range.
    proxy.create_bucket(Bucket=BUCKET + "-cli")
    out = subprocess.run([aws, "--endpoint-url", PROXY] + tls + ["s3", "cp", f"s3://{BUCKET}/cli.bin", f"s3://{BUCKET}-cli/cli.bin"],
                         env=env, capture_output=True, text=True)
    check("aws s3 cp between buckets exit", out.returncode == 0, out.stderr)
    copied = proxy.get_object(Bucket=BUCKET + "-cli", Key="cli.bin")
    check("aws s3 cp between buckets reads back", copied["Body"].read() == cli_body)
    check("aws s3 cp between buckets copied in parts", copied["ETag"].strip('"').endswith("-3"), copied["ETag"])

    # aws s3 sync twice: the second run finds nothing to upload (listings carry plaintext
    # sizes, and the last-modified times match).
    sync_dir = os.path.join(tmp, "sync")
    os.makedirs(os.path.join(sync_dir, "sub dir"))
    import time
    for name, size in (("a.txt", 10), ("sub dir/b+c.bin", 70_000), ("big.bin", 9 * MiB)):
        path = os.path.join(sync_dir, name)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        # Older than the upload: S3's LastModified has one-second granularity, and sync
        # re-uploads a local file newer than the stored object.
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    tls = ["--ca-bundle", VERIFY] if VERIFY else []
    runs = []
    for _ in range(2):
        out = subprocess.run([aws, "--endpoint-url", PROXY] + tls + ["s3", "sync", sync_dir, f"s3://{BUCKET}/synced/"],
                             env=env, capture_output=True, text=True)
        check("aws s3 sync exit", out.returncode == 0, out.stderr)
        runs.append(out.stdout)
    check("first sync uploaded 3 files", runs[0].count("upload:") == 3, runs[0])
    check("second sync uploaded nothing", "upload:" not in runs[1], runs[1])

shutil.rmtree(tmp)
done()
