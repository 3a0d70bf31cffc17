"""The python step of scripts/bench-userland.sh: pure-Python interpreter work.

    python3 bench.py ROUNDS

Each round runs integer arithmetic in a loop, builds and counts words in a dict, formats and
sorts strings, and calls small methods on objects: what an interpreter spends its time on.
Prints "python <checksum>", the same on every correct CPU (no floats, no hashing of str
keys into the result, no time or randomness).
"""

import sys


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def step(self, k):
        return Point((self.x * 31 + k) % 65521, (self.y * 17 + self.x) % 65521)


def round_(r):
    acc = 0
    for i in range(20000):
        acc = (acc * 1103515245 + i + r) & 0xFFFFFFFF
    words = {}
    for i in range(5000):
        w = "w%d" % ((i * 7919 + r) % 613)
        words[w] = words.get(w, 0) + 1
    top = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    acc ^= sum(len(k) * v for k, v in top)
    p = Point(r, r + 1)
    for k in range(3000):
        p = p.step(k)
    acc ^= p.x << 16 | p.y
    text = ",".join(str(i * i) for i in range(2000))
    acc ^= sum(map(int, text.split(","))) & 0xFFFFFFFF
    return acc


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    check = 0
    for r in range(rounds):
        check = (check * 31 + round_(r)) & 0xFFFFFFFFFFFF
    print("python %d" % check)


main()
