"""How much I/O can a guest keep in flight?  The calculator as a library.

Run: .venv/bin/python examples/capacity.py
"""
from blkif.calc import calculate, human

for segments in (None, 32, 256, 512, 4096):
    for order in (0, 2, 4):
        row = calculate("x86_64", order, segments)
        ind = row["indirect"]
        inflight = ind["max_inflight_bytes"] if ind else row["max_inflight_bytes"]
        print("indirect %-4s ring order %d: %4d requests, %9s in flight"
              % (segments or "off", order, row["slots"], human(inflight)))
