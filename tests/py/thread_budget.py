#!/usr/bin/python3
"""Many clients that each run one small request at a time, which makes a session grow its
threads (blockd/src/nbd/limits.rs, REQUESTS_BEFORE_GROWTH): together they would grow past
the server's thread budget. Every answer must stay right.

Usage: thread_budget.py URI BLOCKD_PID CLIENTS; prints "threads N" (the threads serving
sessions once all have grown) for the caller to check against the budget."""

import os
import sys

import nbd

uri, pid, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def session_threads():
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                n += f.read().strip() in ("nbd-conn", "nbd-writer")
        except OSError:
            pass
    return n


hs = []
for c in range(clients):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
for c, h in enumerate(hs):
    block = bytes([c + 1]) * 4096
    h.pwrite(block, c * 4096)
    for i in range(100):
        assert h.pread(4096, c * 4096) == block, f"client {c} read {i} returned other data"
print("threads", session_threads())
for h in hs:
    h.shutdown()
