#!/usr/bin/python3
"""Queues 64 writes of 256 KiB, sends SIGTERM to blockd while they are in flight, and prints
the indexes of the writes that were answered with success (each must then be on disk).

Usage: sigterm_writes.py URI PID
"""

import os
import signal
import sys

import nbd

uri, pid = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
size = 256 * 1024
bufs = [nbd.Buffer.from_bytearray(bytearray(bytes([i + 1]) * size)) for i in range(64)]
cookies = [h.aio_pwrite(b, i * size) for i, b in enumerate(bufs)]
h.poll(0)
os.kill(pid, signal.SIGTERM)
try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
answered = []
for i, c in enumerate(cookies):
    try:
        if h.aio_command_completed(c):
            answered.append(i)
    except nbd.Error:
        pass
print(" ".join(map(str, answered)))
