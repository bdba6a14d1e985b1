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
import sys

from nbdraw import CMD_DISC, CMD_READ, CMD_WRITE, connect, recv_exact, simple_reply
from nbdraw import request as raw_request

pid = int(sys.argv[2])
ROUNDS = 10000
BLOCK = 4096
# Fewer lone writes than REQUESTS_BEFORE_GROWTH: the connection keeps its two threads.
BLOCKS = 16


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


s, size = connect(sys.argv[1])
assert size >= BLOCKS * BLOCK, size


def request(kind, cookie, block, length=BLOCK):
    return raw_request(kind, cookie, block * BLOCK, length)


# Known data to read back: block i holds the byte i.
for i in range(BLOCKS):
    s.sendall(request(CMD_WRITE, 1000 + i, i) + bytes([i]) * BLOCK)
    assert simple_reply(s) == (0, 1000 + i)


def check_replies(want):
    got = {}
    for _ in range(len(want)):
        err, cookie = simple_reply(s)
        assert err == 0, err
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
