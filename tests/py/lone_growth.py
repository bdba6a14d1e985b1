"""A client that runs one small request at a time makes its connection grow to its full
thread count (blockd/src/nbd/limits.rs, CONNECTION_THREADS_MAX), and every answer stays
right while it grows and afterwards, also with many requests in flight.

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
print(f"threads before {before} after {after}")
