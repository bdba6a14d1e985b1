#!/usr/bin/python3
"""With --max-connections 2: two clients work, a third is refused with the reason, the two
keep working, and once they leave a new client is accepted.  Usage: connection_limit.py URI"""

import subprocess
import sys
import time

import nbd

uri = sys.argv[1]
hs = []
for _ in range(2):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
h3 = nbd.NBD()
try:
    h3.connect_uri(uri)
    sys.exit("third connection was accepted beyond --max-connections 2")
except nbd.Error:
    pass
# qemu shows the server's reason (libnbd keeps it for its debug log).
third = subprocess.run(["qemu-img", "info", uri], capture_output=True, text=True)
if third.returncode == 0 or "--max-connections" not in third.stderr:
    sys.exit(f"third client refused without the reason: {third.stderr}")
for h in hs:
    h.pwrite(b"x" * 4096, 0)
    assert h.pread(4096, 0) == b"x" * 4096
    h.shutdown()
# The server frees a slot when it has finished the session, just after the client's
# shutdown returns: allow it a moment.
deadline = time.time() + 5
while True:
    h4 = nbd.NBD()
    try:
        h4.connect_uri(uri)
        break
    except nbd.Error:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
h4.pread(512, 0)
h4.shutdown()
print("ok")
