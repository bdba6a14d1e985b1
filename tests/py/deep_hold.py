"""A client that keeps more than one request in flight is served by one connection thread
that keeps the read side from request to request (blockd/src/nbd/limits.rs, DEEP_BURSTS),
even when some of its writes carry a single request.

The client is a raw socket, so that what each write holds is known: it alternates one write
carrying two READs with one write carrying a single READ, and checks every reply. Handing
the read side over after each single one would spread the work over the connection's two
threads; keeping it leaves one thread with nearly all of it.

Usage: deep_hold.py nbd://HOST:PORT/EXPORT BLOCKD_PID; prints "busiest-share S" (the busiest
nbd-conn thread's share of all nbd-conn CPU time, from schedstat, in nanoseconds)."""

import os
import socket
import struct
import sys
import urllib.parse

uri, pid = urllib.parse.urlparse(sys.argv[1]), int(sys.argv[2])
host, port, export = uri.hostname, uri.port, uri.path.lstrip("/").encode()
ROUNDS = 10000
BLOCK = 4096
# Fewer lone writes than REQUESTS_BEFORE_GROWTH: the connection keeps its two threads.
BLOCKS = 16


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return bytes(buf)


def conn_thread_times():
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != "nbd-conn":
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                times[tid] = int(f.read().split()[0])
        except OSError:
            pass
    return times


s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# Fixed newstyle handshake, then NBD_OPT_EXPORT_NAME with NO_ZEROES.
magic, opt_magic, _flags = struct.unpack(">8s8sH", recv_exact(s, 18))
assert magic == b"NBDMAGIC" and opt_magic == b"IHAVEOPT", (magic, opt_magic)
s.sendall(struct.pack(">I", 1 | 2))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(export)) + export)
size, _tflags = struct.unpack(">QH", recv_exact(s, 10))
assert size >= BLOCKS * BLOCK, size

REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


def request(kind, cookie, block, length=BLOCK):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, kind, cookie, block * BLOCK, length)


# Known data to read back: block i holds the byte i.
for i in range(BLOCKS):
    s.sendall(request(CMD_WRITE, 1000 + i, i) + bytes([i]) * BLOCK)
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert (magic, err, cookie) == (SIMPLE_REPLY_MAGIC, 0, 1000 + i), (magic, err, cookie)


def check_replies(want):
    got = {}
    for _ in range(len(want)):
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        assert magic == SIMPLE_REPLY_MAGIC and err == 0, (magic, err)
        got[cookie] = recv_exact(s, BLOCK)
    for cookie, block in want.items():
        assert got[cookie] == bytes([block]) * BLOCK, f"cookie {cookie} read other data"


before = conn_thread_times()
cookie = 0
for r in range(ROUNDS):
    a, b, c = (r * 3) % BLOCKS, (r * 3 + 1) % BLOCKS, (r * 3 + 2) % BLOCKS
    s.sendall(request(CMD_READ, cookie, a) + request(CMD_READ, cookie + 1, b))
    check_replies({cookie: a, cookie + 1: b})
    s.sendall(request(CMD_READ, cookie + 2, c))
    check_replies({cookie + 2: c})
    cookie += 3
after = conn_thread_times()
s.sendall(request(CMD_DISC, 0, 0, 0))
s.close()

spent = [after[t] - before.get(t, 0) for t in after]
total = sum(spent)
assert total > 0, (before, after)
print(f"threads {len(spent)} busiest-share {max(spent) / total:.3f}")
