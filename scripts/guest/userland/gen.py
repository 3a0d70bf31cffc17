"""Inputs of scripts/bench-userland.sh's steps, generated once when the image is built.

    python3 gen.py DIR

Writes, deterministically (a fixed linear congruential generator, no randomness):
  DIR/text        1 MiB of text lines of pseudo-random words (the xz step's input)
  DIR/blob        32 MiB of pseudo-random bytes (the openssl step's input)
  DIR/insert.sql  a table and 100,000 INSERT statements in one transaction (sqlite step)
"""

import os
import sys


def lcg(seed):
    x = seed
    while True:
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        yield x >> 33


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    r = lcg(13)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[next(r) % 26] for _ in range(2 + next(r) % 8)) for _ in range(5000)]
    with open(os.path.join(out, "text"), "w") as f:
        n = i = 0
        while n < 1 << 20:
            line = "%d %s\n" % (i, " ".join(words[next(r) % 5000] for _ in range(3 + next(r) % 10)))
            f.write(line)
            n += len(line)
            i += 1
    with open(os.path.join(out, "blob"), "wb") as f:
        for _ in range(32):
            f.write(bytes(next(r) & 0xFF for _ in range(1 << 20)))
    with open(os.path.join(out, "insert.sql"), "w") as f:
        f.write("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, s TEXT);\nBEGIN;\n")
        for i in range(1, 100001):
            f.write("INSERT INTO t VALUES(%d, %d, 'row-%d-%x');\n" % (i, next(r) % 1000, i, next(r)))
        f.write("COMMIT;\n")


main()
