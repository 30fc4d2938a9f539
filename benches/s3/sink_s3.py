#!/usr/bin/env python3
"""A minimal, cheap S3 object store for benches/s3/throughput.sh (UPSTREAM=sink).

Real S3 servers spend more CPU per byte than the proxy does (s3rver and s3s-fs compute an MD5
ETag over every PUT and copy every GET through user space), so on a small machine they, not the
proxy, set the throughput. This one does as little as an HTTP/1.1 object store can: a PUT body
goes from the socket to a file in 1 MiB reads, a GET is sent with sendfile(2) (no copy through
user space). It is only what the benchmark needs, path-style:

  PUT /bucket               CreateBucket            PUT /bucket/key   PutObject (Content-Length)
  GET|HEAD /bucket/key      GetObject, HeadObject   DELETE /bucket/key DeleteObject

Object metadata (x-amz-meta-*, Content-Type) is kept beside the object and returned on GET and
HEAD, as S3 does. It does NOT check signatures, compute an MD5 (the ETag is random), serve
ranges, list, or do multipart: never use it for anything but this benchmark.

  python3 sink_s3.py --port 18400 ROOT
"""

import argparse
import json
import base64
import os
import zlib
import secrets
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

READ = 1 << 20


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sink-s3"
    root = "."

    def log_message(self, *args):  # quiet
        pass

    def _split(self):
        path = unquote(urlsplit(self.path).path)
        parts = path.lstrip("/").split("/", 1)
        bucket = parts[0]
        key = parts[1] if len(parts) > 1 else ""
        if not bucket or "/" in bucket or bucket.startswith(".") or ".." in key.split("/"):
            return None, None
        return bucket, key

    def _file(self, bucket, key):
        # One flat file per key (its path percent-encoded), beside its metadata.
        name = key.replace("%", "%25").replace("/", "%2F")
        return os.path.join(self.root, bucket, name)

    def _reply(self, status, code=None, headers=()):
        body = b""
        if code:
            body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code></Error>'.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if body:
            self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self):
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            got = self.rfile.read(min(n, READ))
            if not got:
                break
            n -= len(got)

    def do_PUT(self):
        bucket, key = self._split()
        if bucket is None:
            self._drain()
            return self._reply(400, "InvalidURI")
        if not key:
            self._drain()
            os.makedirs(os.path.join(self.root, bucket), exist_ok=True)
            return self._reply(200)
        if not os.path.isdir(os.path.join(self.root, bucket)):
            self._drain()
            return self._reply(404, "NoSuchBucket")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            return self._reply(411, "MissingContentLength")
        left = int(length)
        path = self._file(bucket, key)
        tmp = f"{path}.{threading.get_ident()}.part"
        if "aws-chunked" in self.headers.get("Content-Encoding", ""):
            # The gateway's sealed uploads: aws-chunked with a trailing CRC32 (as S3 checks it).
            ok = self._write_aws_chunked(tmp, left)
            if ok is not True:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                self.close_connection = True
                return self._reply(400, ok)
            left = 0
        else:
            buf = bytearray(READ)
            view = memoryview(buf)
            with open(tmp, "wb", buffering=0) as f:
                while left > 0:
                    n = self.rfile.readinto(view[: min(left, READ)])
                    if not n:
                        break
                    f.write(view[:n])
                    left -= n
        if left:
            os.unlink(tmp)
            self.close_connection = True
            return self._reply(400, "IncompleteBody")
        meta = {k.lower(): v for k, v in self.headers.items()
                if k.lower().startswith("x-amz-meta-") or k.lower() == "content-type"}
        meta["etag"] = '"' + secrets.token_hex(16) + '"'
        with open(path + ".meta", "w") as m:
            json.dump(meta, m)
        os.replace(tmp, path)
        self._reply(200, headers=[("ETag", meta["etag"])])

    def _write_aws_chunked(self, tmp, length):
        """Decode an aws-chunked body of `length` bytes into `tmp`, checking its
        x-amz-checksum-crc32 trailer. True, or the S3 error code."""
        crc = 0
        read = 0
        with open(tmp, "wb", buffering=0) as f:
            while True:
                line = self.rfile.readline(64)
                read += len(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                left = size
                while left > 0:
                    data = self.rfile.read(min(left, READ))
                    if not data:
                        return "IncompleteBody"
                    crc = zlib.crc32(data, crc)
                    f.write(data)
                    left -= len(data)
                read += size + len(self.rfile.readline(8))
            trailers = {}
            while True:
                line = self.rfile.readline(1024)
                read += len(line)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                trailers[name.strip().lower()] = value.strip()
        if read != length:
            return "IncompleteBody"
        want = trailers.get("x-amz-checksum-crc32")
        if want is not None and want != base64.b64encode(crc.to_bytes(4, "big")).decode():
            return "BadDigest"
        return True

    def _object(self):
        bucket, key = self._split()
        if bucket is None or not key:
            self._reply(400, "InvalidRequest")
            return None
        path = self._file(bucket, key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self._reply(404, "NoSuchKey")
            return None
        with open(path + ".meta") as m:
            meta = json.load(m)
        st = os.fstat(f.fileno())
        self.send_response(200)
        self.send_header("Content-Length", str(st.st_size))
        self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in meta.items():
            self.send_header(k, v)
        self.end_headers()
        return f, st.st_size

    def do_GET(self):
        if "Range" in self.headers:
            return self._reply(501, "NotImplemented")
        got = self._object()
        if got:
            f, size = got
            with f:
                self.wfile.flush()
                sent = self.connection.sendfile(f, 0, size)
                if sent != size:
                    self.close_connection = True

    def do_HEAD(self):
        got = self._object()
        if got:
            got[0].close()

    def do_DELETE(self):
        bucket, key = self._split()
        if bucket is None or not key:
            return self._reply(400, "InvalidRequest")
        path = self._file(bucket, key)
        for p in (path, path + ".meta"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._reply(204)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("root")
    a = ap.parse_args()
    Handler.root = os.path.abspath(a.root)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((a.host, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
