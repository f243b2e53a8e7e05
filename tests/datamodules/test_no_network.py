"""Nothing reaches the network at run time: importing the 2D datamodules (albumentations checks
PyPI for updates on import unless told not to) makes no DNS lookup or connection."""

import os
import subprocess
import sys

PROBE = r"""
import socket, sys
calls = []
def deny(name):
    def f(*a, **k):
        calls.append(name)
        raise OSError("network access attempted: " + name)
    return f
socket.getaddrinfo = deny("getaddrinfo")
socket.create_connection = deny("create_connection")
socket.socket.connect = deny("connect")
import mamba_dense.datamodules.ade20k, mamba_dense.datamodules.coco  # noqa: E401
import threading, time
for t in threading.enumerate():  # a background update check would run in a thread
    if t is not threading.main_thread():
        t.join(timeout=5)
print("CALLS", calls)
sys.exit(1 if calls else 0)
"""


def test_importing_datamodules_makes_no_network_call():
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
