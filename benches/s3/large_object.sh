#!/usr/bin/env bash
# Streams one large object through the encrypting S3 gateway (release build) to moto server and
# back, and reports the proxy's peak RSS (VmHWM) and the wall time of each direction.
# Proves constant memory; the throughput is moto's (a Python server), not the proxy's.
#
#   SIZE_MIB=1024 bash benches/s3/large_object.sh
# Needs: scripts/test.sh run once (tests/peers/venv with moto and boto3).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOG_TAG=s3-large-object
# shellcheck source=../lib.sh source-path=SCRIPTDIR
source benches/lib.sh # cleanup traps (PIDS, WORK), BIN, s3_route_toml
SIZE_MIB=${SIZE_MIB:-1024}
PY=tests/peers/venv/bin/python
[ -x "$PY" ] || { echo "run scripts/test.sh first (tests/peers/venv)" >&2; exit 1; }
cargo build --release -q
WORK=$(mktemp -d)
printf testing >"$WORK/ak"; printf testing >"$WORK/sk"; printf bench-secret >"$WORK/csk"; chmod 600 "$WORK"/*
tests/peers/venv/bin/moto_server -H 127.0.0.1 -p 18501 >/dev/null 2>&1 & PIDS+=($!)
{
	cat <<TOML
[server]
listen = "127.0.0.1:18500"
auth = "none"
[keyring]
path = "$WORK/kr.json"
master_key_file = "$WORK/m.key"
create_missing_keys = true
TOML
	s3_route_toml "http://127.0.0.1:18501" us-east-1 "$WORK/ak" "$WORK/sk" AKIABENCH "$WORK/csk"
} >"$WORK/c.toml"
ENVELOPE_PROXY_LOG=warn "$BIN" serve --config "$WORK/c.toml" & PIDS+=($!)
proxy=$!
sleep 2
"$PY" - "$SIZE_MIB" "$WORK" <<'PY'
import hashlib, os, sys, time
import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
size = int(sys.argv[1]) << 20
work = sys.argv[2]
c = boto3.client("s3", endpoint_url="http://127.0.0.1:18500", aws_access_key_id="AKIABENCH",
                 aws_secret_access_key="bench-secret", region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}))
c.create_bucket(Bucket="big")
src = os.path.join(work, "src.bin")
with open(src, "wb") as f:
    block = os.urandom(1 << 20)
    for _ in range(size >> 20):
        f.write(block)
tc = TransferConfig(multipart_threshold=size + 1)  # one PutObject stream: the hardest case
t = time.time(); c.upload_file(src, "big", "object.bin", Config=tc); up = time.time() - t
t = time.time(); c.download_file("big", "object.bin", src + ".back", Config=tc); down = time.time() - t
same = hashlib.sha256(open(src, "rb").read()).digest() == hashlib.sha256(open(src + ".back", "rb").read()).digest()
print(f"object: {size >> 20} MiB in one PutObject; round trip identical: {same}")
print(f"upload {size / up / 1e6:.0f} MB/s, download {size / down / 1e6:.0f} MB/s (moto-bound)")
PY
echo "proxy peak RSS: $(grep VmHWM /proc/$proxy/status | awk '{print $2, $3}')"
