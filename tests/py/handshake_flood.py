#!/usr/bin/python3
"""2,000 connections that never speak, then a real client: it must finish its handshake and
a write and read within one second while the flood stays open.

Usage: handshake_flood.py HOST PORT URI; prints "flood N", "client-seconds S" and
"flood-closed N" (how many silent connections the server closed) for the caller."""

import resource
import socket
import sys
import time

import nbd

host, port, uri = sys.argv[1], int(sys.argv[2]), sys.argv[3]
FLOOD = 2000

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, FLOOD + 256)), hard))

flood = []
for _ in range(FLOOD):
    s = socket.create_connection((host, port))
    flood.append(s)
# Let the server accept them all (the greeting arrives on each) before the real client.
time.sleep(1.0)
print("flood", len(flood))

t0 = time.monotonic()
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"f" * 4096, 0)
assert h.pread(4096, 0) == b"f" * 4096
elapsed = time.monotonic() - t0
h.shutdown()
print("client-seconds", f"{elapsed:.3f}")

closed = 0
for s in flood:
    s.setblocking(False)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                closed += 1
                break
    except BlockingIOError:
        pass
    except ConnectionResetError:
        closed += 1
    s.close()
print("flood-closed", closed)
