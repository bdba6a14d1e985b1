"""A raw-socket NBD client for tests that must control what each write to the socket holds
(libnbd decides that itself): the fixed-newstyle handshake, option replies, compact requests
and simple replies, with the protocol's magic numbers named once.

Only what the tests use: no TLS, no structured replies."""

import socket
import struct
import urllib.parse

NBDMAGIC, IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO = 1, 2, 3, 7
REP_ACK, REP_SERVER, REP_ERR_SHUTDOWN = 1, 2, (1 << 31) + 7
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
ESHUTDOWN = 108


def parse_uri(uri):
    """(host, port, export name as bytes) of an nbd://HOST:PORT/EXPORT URI."""
    u = urllib.parse.urlparse(uri)
    return u.hostname, u.port, u.path.lstrip("/").encode()


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return bytes(buf)


def greet(host, port):
    """Connects and does the fixed-newstyle greeting (asking for no zeroes); returns the socket,
    ready for options."""
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    magic, opt_magic, _flags = struct.unpack(">8s8sH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opt_magic == IHAVEOPT, (magic, opt_magic)
    s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
    return s


def option(opt, data=b""):
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def option_reply(s):
    """(option, reply type, data) of the next option reply."""
    magic, opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REP_MAGIC, hex(magic)
    return opt, kind, recv_exact(s, length)


def export_name(s, export):
    """Ends the handshake with EXPORT_NAME; returns (size, transmission flags)."""
    s.sendall(option(OPT_EXPORT_NAME, export))
    return struct.unpack(">QH", recv_exact(s, 10))


def connect(uri):
    """A socket in the transmission phase (simple replies) and the export's size."""
    host, port, export = parse_uri(uri)
    s = greet(host, port)
    size, _flags = export_name(s, export)
    return s, size


def request(kind, cookie, offset=0, length=0, flags=0):
    """A compact request header (a WRITE's payload follows it)."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, cookie, offset, length)


def simple_reply(s):
    """(error, cookie) of the next simple reply; a READ's data follows only when error is 0."""
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
    return err, cookie
