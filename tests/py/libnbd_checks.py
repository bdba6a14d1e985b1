#!/usr/bin/python3
"""Protocol checks against a running blockd with python3-libnbd and raw sockets.

Usage: libnbd_checks.py HOST PORT VOLUME RO_VOLUME

Each check raises on failure. The script prints one line per check and ends with the line
"N passed, M failed"; it exits non-zero if anything failed.
"""

import errno
import os
import random
import socket
import struct
import sys
import traceback

import nbd

HOST, PORT, VOLUME, RO_VOLUME = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
URI = f"nbd://{HOST}:{PORT}/{VOLUME}"

NBD_CMD_WRITE = 1
NBD_CMD_READ = 0
NBD_CMD_FLUSH = 3
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EPERM = 1


def connect(uri=URI, strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def expect_error(fn, want_errno, what):
    try:
        fn()
    except nbd.Error as e:
        got = getattr(errno, e.errno, None) if isinstance(e.errno, str) else e.errno
        assert got == want_errno, f"{what}: errno {e.errno} ({e.string}), want {want_errno}"
        return
    raise AssertionError(f"{what}: succeeded, want errno {want_errno}")


def extents(h, offset, length):
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb)
    return out


def check_many_in_flight():
    h = connect()
    n, size = 64, 64 * 1024
    bufs = [nbd.Buffer.from_bytearray(bytearray(os.urandom(size))) for _ in range(n)]
    cookies = [h.aio_pwrite(bufs[i], i * size) for i in range(n)]
    assert h.aio_in_flight() > 1, "requests were not in flight together"
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    reads = [nbd.Buffer(size) for _ in range(n)]
    cookies = [h.aio_pread(reads[i], i * size) for i in range(n)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(n):
        assert reads[i].to_bytearray() == bufs[i].to_bytearray(), f"block {i} differs"
    h.shutdown()


def check_multi_conn():
    a, b = connect(), connect()
    assert a.can_multi_conn(), "CAN_MULTI_CONN not advertised"
    data = os.urandom(1 << 20)
    a.pwrite(data, 8 << 20)
    a.flush()
    assert b.pread(len(data), 8 << 20) == data, "write on one connection not seen on another"
    b.pwrite(data[::-1], 8 << 20, nbd.CMD_FLAG_FUA)
    assert a.pread(len(data), 8 << 20) == data[::-1]
    a.shutdown()
    b.shutdown()


def check_block_status_after_trim_and_zero():
    h = connect()
    base, mib = 16 << 20, 1 << 20
    h.pwrite(os.urandom(4 * mib), base)
    h.flush()
    st = extents(h, base, 4 * mib)
    assert st and st[0][1] & 1 == 0, f"written data reported as hole: {st}"
    h.trim(mib, base)
    st = extents(h, base, mib)
    assert st[0] == (mib, 3), f"after TRIM want one hole,zero extent, got {st}"
    assert h.pread(mib, base) == bytes(mib), "trimmed range does not read as zeros"
    h.zero(mib, base + mib)
    st = extents(h, base + mib, mib)
    assert st[0][1] & 2, f"after WRITE_ZEROES want zero flag, got {st}"
    h.zero(mib, base + 2 * mib, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(mib, base + 2 * mib) == bytes(mib), "WRITE_ZEROES NO_HOLE does not read as zeros"
    h.zero(mib, base + 3 * mib, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(mib, base + 3 * mib) == bytes(mib)
    one = []
    h.block_status(4 * mib, base, lambda m, o, e, err: one.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 2, f"REQ_ONE returned {len(one) // 2} extents"
    h.shutdown()


def check_bad_requests_keep_connection():
    h = connect(strict=False)
    size = h.get_size()
    pattern = os.urandom(4096)
    h.pwrite(pattern, 0)
    expect_error(lambda: h.pread(4096, size), errno.EINVAL, "read past the end")
    expect_error(lambda: h.pread(4096, size - 512), errno.EINVAL, "read across the end")
    expect_error(lambda: h.pwrite(bytes(4096), size), errno.ENOSPC, "write past the end")
    expect_error(lambda: h.pread(512, 1), errno.EINVAL, "unaligned read")
    expect_error(lambda: h.pwrite(bytes(100), 0), errno.EINVAL, "unaligned write")
    expect_error(lambda: h.pread(0, 0), errno.EINVAL, "zero-length read")
    expect_error(lambda: h.pwrite(b"", 0), errno.EINVAL, "zero-length write")
    expect_error(lambda: h.trim(0, 0), errno.EINVAL, "zero-length trim")
    expect_error(lambda: h.zero(4096, size), errno.ENOSPC, "write_zeroes past the end")
    assert h.pread(4096, 0) == pattern, "data damaged by rejected requests"
    h.shutdown()


def check_read_only_volume():
    h = connect(f"nbd://{HOST}:{PORT}/{RO_VOLUME}", strict=False)
    assert h.is_read_only()
    expect_error(lambda: h.pwrite(bytes(4096), 0), errno.EPERM, "write to read-only")
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


# Raw-socket client: for what libnbd refuses to send.

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def raw_connect(volume=VOLUME):
    """Fixed newstyle, NO_ZEROES, OPT_GO; simple replies. Returns (socket, size)."""
    s = socket.create_connection((HOST, PORT), timeout=10)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == 0x4E42444D41474943 and opt == 0x49484156454F5054 and flags & 1
    s.sendall(struct.pack(">I", 3))
    name = volume.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    size = None
    while True:
        _, _, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
        body = recv_exact(s, rlen)
        if rtype == 3 and struct.unpack(">H", body[:2])[0] == 0:
            size = struct.unpack(">Q", body[2:10])[0]
        if rtype == 1:
            return s, size
        assert rtype < 0x80000000, f"GO failed with {rtype:#x}"


def raw_request(s, cmd, offset, length, cookie, payload=b"", flags=0):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length) + payload)


def raw_reply(s, cookie, data_len=0):
    magic, err, got = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698, f"bad reply magic {magic:#x}"
    assert got == cookie, f"reply cookie {got} for request {cookie}"
    data = recv_exact(s, data_len) if err == 0 and data_len else b""
    return err, data


def check_unknown_command_and_drained_write():
    s, size = raw_connect()
    raw_request(s, 99, 0, 0, cookie=1)
    err, _ = raw_reply(s, 1)
    assert err == NBD_EINVAL, f"unknown command: errno {err}"
    raw_request(s, NBD_CMD_WRITE, 0, 0, cookie=2, flags=1 << 9)
    err, _ = raw_reply(s, 2)
    assert err == NBD_EINVAL, f"unknown flag: errno {err}"
    # A rejected write's payload must be drained, not parsed as the next header.
    junk = bytes([0x25, 0x60, 0x95, 0x13]) * 1024
    raw_request(s, NBD_CMD_WRITE, size, len(junk), cookie=3, payload=junk)
    err, _ = raw_reply(s, 3)
    assert err == NBD_ENOSPC, f"write past end: errno {err}"
    raw_request(s, NBD_CMD_FLUSH, 4096, 0, cookie=4)
    err, _ = raw_reply(s, 4)
    assert err == NBD_EINVAL, f"flush with offset: errno {err}"
    payload = os.urandom(4096)
    raw_request(s, NBD_CMD_WRITE, 40 << 20, 4096, cookie=5, payload=payload)
    assert raw_reply(s, 5)[0] == 0
    raw_request(s, NBD_CMD_READ, 40 << 20, 4096, cookie=6)
    err, data = raw_reply(s, 6, 4096)
    assert err == 0 and data == payload, "connection broken after rejected requests"
    s.close()


def check_garbage_and_torn_write_spare_other_sessions():
    good = connect()
    pattern = os.urandom(1 << 20)
    good.pwrite(pattern, 48 << 20)
    # Garbage in place of a request header: that session (only) is closed.
    s, _ = raw_connect()
    s.sendall(os.urandom(28))
    try:
        closed = s.recv(16) == b""
    except ConnectionResetError:
        closed = True
    assert closed, "server kept a session whose framing is broken"
    s.close()
    # A client that dies in the middle of a write's payload.
    s, _ = raw_connect()
    raw_request(s, NBD_CMD_WRITE, 56 << 20, 1 << 20, cookie=7, payload=os.urandom(300000))
    s.close()
    assert good.pread(1 << 20, 48 << 20) == pattern, "other session disturbed"
    again = connect()
    assert again.pread(1 << 20, 48 << 20) == pattern, "new sessions broken"
    again.shutdown()
    good.shutdown()


def check_export_name_negotiation():
    # Old clients end the handshake with NBD_OPT_EXPORT_NAME (no error channel): the server
    # answers size, flags and (without NO_ZEROES) 124 zero bytes.
    s = socket.create_connection((HOST, PORT), timeout=10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 1))  # fixed newstyle, but zeroes wanted
    name = VOLUME.encode()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    size, flags = struct.unpack(">QH", recv_exact(s, 10))
    assert recv_exact(s, 124) == bytes(124), "padding after EXPORT_NAME must be zeroes"
    assert flags & 1 and size > 0
    raw_request(s, NBD_CMD_READ, 0, 4096, cookie=9)
    err, data = raw_reply(s, 9, 4096)
    assert err == 0 and len(data) == 4096
    s.close()
    # An unknown export with EXPORT_NAME: the server can only hang up.
    s = socket.create_connection((HOST, PORT), timeout=10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 7) + b"nothere")
    assert s.recv(1) == b"", "unknown EXPORT_NAME must close the connection"
    s.close()


CHECKS = [
    check_export_name_negotiation,
    check_many_in_flight,
    check_multi_conn,
    check_block_status_after_trim_and_zero,
    check_bad_requests_keep_connection,
    check_read_only_volume,
    check_unknown_command_and_drained_write,
    check_garbage_and_torn_write_spare_other_sessions,
]

if __name__ == "__main__":
    random.seed(0)
    passed = failed = 0
    for check in CHECKS:
        try:
            check()
            passed += 1
            print(f"ok   {check.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL {check.__name__}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
