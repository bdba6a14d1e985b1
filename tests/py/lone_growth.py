"""A client that runs one small request at a time, or sends large writes, makes its
connection grow to its full thread count (blockd/src/nbd/limits.rs, CONNECTION_THREADS_MAX),
and every answer stays right while it grows and afterwards, also with many requests in
flight.

Usage: lone_growth.py URI BLOCKD_PID; prints "threads N" for the caller to check."""

import os
import sys

import nbd

uri, pid = sys.argv[1], int(sys.argv[2])


def conn_threads():
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                n += f.read().strip() == "nbd-conn"
        except OSError:
            pass
    return n


h = nbd.NBD()
h.connect_uri(uri)
before = conn_threads()
# Lone requests: a write, then a read of it, one at a time.
for i in range(300):
    block = bytes([i % 251]) * 4096
    off = (i * 7919 % 1024) * 4096
    h.pwrite(block, off)
    got = h.pread(4096, off)
    assert got == block, f"lone read {i} at {off} returned other data"
after = conn_threads()

# Then many in flight on the grown connection, each checked.
bufs = {}
for i in range(256):
    off = i * 4096
    data = bytes([(i * 3) % 251]) * 4096
    h.aio_pwrite(data, off)
    bufs[off] = data
while h.aio_in_flight() > 0:
    h.poll(-1)
cookies = []
for off in bufs:
    b = nbd.Buffer(4096)
    cookies.append((off, b, h.aio_pread(b, off)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, b, c in cookies:
    h.aio_command_completed(c)
    assert b.to_bytearray() == bufs[off], f"read at {off} after the burst returned other data"
h.shutdown()
del h
print(f"threads before {before} after {after}")

# Large writes grow a connection too (large reads do not: only those check them here).
import time
deadline = time.time() + 10
while conn_threads() > 0 and time.time() < deadline:
    time.sleep(0.05)
h = nbd.NBD()
h.connect_uri(uri)
big = 128 * 1024
datas = [bytes([(i * 5 + 1) % 251]) * big for i in range(96)]
for i, data in enumerate(datas):
    h.aio_pwrite(data, i * big)
    while h.aio_in_flight() >= 8:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
grown = conn_threads()
for i, data in enumerate(datas):
    assert h.pread(big, i * big) == data, f"large write {i} read back other data"
h.shutdown()
print(f"large-writes {grown}")
