"""SIGTERM answers every request blockd has received, instead of dropping the ones not started.

Two raw-socket clients (nbdraw), so that what blockd has received at the signal is known:
- one mid-handshake (after a LIST): its next option, GO, must be answered ERR_SHUTDOWN;
- one in transmission that sends, in one write, READS reads of 1 MiB, WRITES small writes, a
  FLUSH, and a WRITE whose payload stops half-way, then reads nothing: blockd answers a few
  reads, fills the socket and stalls with the rest received but not started. Then SIGTERM,
  and the client reads every reply until blockd closes: each request must be answered exactly
  once, with success or ESHUTDOWN, and the torn WRITE with ESHUTDOWN.

Usage: sigterm_queued.py nbd://HOST:PORT/EXPORT BLOCKD_PID
Prints "ok N eshutdown M" and "written-ok B..." (the blocks, of 4 KiB, whose writes were
answered with success: each must hold the byte B % 251 + 1 once blockd has exited)."""

import os
import signal
import sys
import time

from nbdraw import (CMD_FLUSH, CMD_READ, CMD_WRITE, ESHUTDOWN, OPT_ABORT, OPT_GO, OPT_LIST,
                    REP_ACK, REP_ERR_SHUTDOWN, REP_SERVER, connect, greet, option,
                    option_reply, parse_uri, recv_exact, request, simple_reply)

uri, pid = sys.argv[1], int(sys.argv[2])
host, port, export = parse_uri(uri)
MIB, BLOCK = 1 << 20, 4096
READS, WRITES = 32, 16
# Writes go after the reads' range; the torn one after them.
WRITE_BLOCK0 = READS * MIB // BLOCK
TORN_COOKIE, TORN_LEN, FLUSH_COOKIE = 9999, 64 << 10, 9000

problems = []

# The client mid-handshake: past the greeting and one option.
h = greet(host, port)
h.sendall(option(OPT_LIST))
while True:
    opt, kind, _ = option_reply(h)
    assert opt == OPT_LIST and kind in (REP_SERVER, REP_ACK), (opt, kind)
    if kind == REP_ACK:
        break

# The client in transmission: one write holding every request.
s, size = connect(uri)
assert size >= READS * MIB + (WRITES + 16) * BLOCK, size
burst = bytearray()
kinds = {}
for i in range(READS):
    burst += request(CMD_READ, i, i * MIB, MIB)
    kinds[i] = CMD_READ
for i in range(WRITES):
    block = WRITE_BLOCK0 + i
    burst += request(CMD_WRITE, 100 + i, block * BLOCK, BLOCK) + bytes([block % 251 + 1]) * BLOCK
    kinds[100 + i] = CMD_WRITE
burst += request(CMD_FLUSH, FLUSH_COOKIE)
kinds[FLUSH_COOKIE] = CMD_FLUSH
burst += request(CMD_WRITE, TORN_COOKIE, (WRITE_BLOCK0 + WRITES) * BLOCK, TORN_LEN)
burst += bytes(TORN_LEN // 2)
kinds[TORN_COOKIE] = CMD_WRITE
s.sendall(burst)
# blockd answers reads until the socket is full, then stalls with the rest received.
time.sleep(1.0)

os.kill(pid, signal.SIGTERM)
time.sleep(0.3)

h.sendall(option(OPT_GO, len(export).to_bytes(4, "big") + export + bytes(2)))
try:
    opt, kind, msg = option_reply(h)
    if (opt, kind) != (OPT_GO, REP_ERR_SHUTDOWN):
        problems.append(f"GO at shutdown answered {kind:#x} for option {opt}, not ERR_SHUTDOWN")
    h.sendall(option(OPT_ABORT))
except (AssertionError, OSError) as e:
    problems.append(f"GO at shutdown got no reply: {e!r}")
h.close()

answers = {}
while True:
    try:
        err, cookie = simple_reply(s)
    except AssertionError as e:
        if "closed" not in str(e):
            raise
        break
    except OSError as e:
        problems.append(f"reading replies: {e!r}")
        break
    if cookie in answers:
        problems.append(f"cookie {cookie} answered twice")
    answers[cookie] = err
    if err == 0 and kinds.get(cookie) == CMD_READ:
        recv_exact(s, MIB)
s.close()

for cookie in sorted(kinds):
    if cookie not in answers:
        problems.append(f"request {cookie} was dropped (no reply)")
    elif answers[cookie] not in (0, ESHUTDOWN):
        problems.append(f"request {cookie} answered error {answers[cookie]}")
if answers.get(TORN_COOKIE) != ESHUTDOWN:
    problems.append(f"the WRITE cut short was answered {answers.get(TORN_COOKIE)}, not ESHUTDOWN")
ok = [c for c, e in answers.items() if e == 0]
refused = [c for c, e in answers.items() if e == ESHUTDOWN]
print(f"ok {len(ok)} eshutdown {len(refused)}")
print("written-ok", " ".join(str(WRITE_BLOCK0 + c - 100) for c in ok if kinds.get(c) == CMD_WRITE
                             and c != TORN_COOKIE))
if problems:
    print("\n".join(problems))
    sys.exit(1)
