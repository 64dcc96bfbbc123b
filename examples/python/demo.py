#!/usr/bin/env python3
"""demo.py: write, read and list files through coda from Python.

    CODA_LIB=target/debug/libcoda.so PYTHONPATH=python python3 examples/python/demo.py \
        SERVER SECRET_FILE CACHE_DIR
"""
import sys

import coda


def main(argv):
    if len(argv) != 4:
        print("usage: demo.py SERVER SECRET_FILE CACHE_DIR", file=sys.stderr)
        return 2
    server, secret, cache = argv[1:]
    with coda.Client(servers=server, secret_file=secret, cache_dir=cache) as c:
        try:
            c.mkdir("/pydemo")
        except FileExistsError:
            pass
        c.write_file("/pydemo/greeting.txt", b"hello from python\n")
        print("read back:", c.read_file("/pydemo/greeting.txt").decode().strip())
        print("listing of /pydemo:", c.listdir("/pydemo"))
        try:
            c.stat("/pydemo/missing")
        except OSError as e:
            print("stat of a missing file:", e.errno, e.strerror)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
