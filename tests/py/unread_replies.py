#!/usr/bin/python3
"""Clients that send large READs and never read the replies: each pins its session's payload
cap, together more than the server's payload budget. Prints "sent N" once every request is
written, then holds the sockets open, unread, until stdin closes.

Usage: unread_replies.py URI CLIENTS REQUESTS"""

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdraw  # noqa: E402

uri, clients, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LEN = 32 << 20

socks = []
for c in range(clients):
    s, _size = nbdraw.connect(uri)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    socks.append(s)
for c, s in enumerate(socks):
    for i in range(requests):
        s.sendall(nbdraw.request(nbdraw.CMD_READ, cookie=c * 1000 + i, offset=0, length=LEN))
print("sent", clients * requests, flush=True)
sys.stdin.read()
