"""Holds one NBD-over-TLS session across a server-side event (SIGHUP).

Usage: tls_session.py URI CERT_DIR
Connects with libnbd (TLS required), writes a pattern, prints "ready", waits for a line on
stdin, then reads the pattern back and writes and reads a second one over the same session,
and prints "still served". Any failure exits non-zero with the reason.
"""
import sys

import nbd

uri, certs = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(certs)
h.connect_uri(uri)
assert h.get_tls_negotiated(), "TLS was not negotiated"
h.pwrite(b"\x11" * 65536, 0)
print("ready", flush=True)
sys.stdin.readline()
assert h.pread(65536, 0) == b"\x11" * 65536, "first pattern lost"
h.pwrite(b"\x22" * 65536, 65536)
h.flush()
assert h.pread(65536, 65536) == b"\x22" * 65536, "second pattern lost"
h.shutdown()
print("still served", flush=True)
