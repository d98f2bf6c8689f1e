#!/usr/bin/env python3
"""nbd-replay SOCKET TRACE: replays a boot trace ("OFFSET LENGTH" per line,
bytes, in order) through an NBD server on a Unix socket with libnbd, one
read at a time, as the P3 benchmark replays it through isr's engine.
Prints one JSON object: seconds (connect included), reads, bytes."""
import json
import sys
import time

import nbd


def main():
    sock, trace = sys.argv[1], sys.argv[2]
    reads = []
    with open(trace) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                off, length = line.split()
                reads.append((int(off), int(length)))
    started = time.monotonic()
    h = nbd.NBD()
    h.connect_unix(sock)
    size = h.get_size()
    total = 0
    for off, length in reads:
        if off >= size:
            continue
        length = min(length, size - off)
        h.pread(length, off)
        total += length
    seconds = time.monotonic() - started
    h.shutdown()
    print(json.dumps({"seconds": seconds, "reads": len(reads), "bytes": total, "size": size}))


if __name__ == "__main__":
    main()
