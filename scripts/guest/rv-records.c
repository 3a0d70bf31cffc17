/* rv-records: the guest side of rustvisor's kill -9 data-safety loop (issue 14).
 *
 *   rv-records DEVICE SLOTS
 *
 * Writes numbered 512-byte records n = 0, 1, ... to the block device DEVICE of SLOTS
 * 512-byte slots (opened O_DIRECT | O_SYNC, so each write reaches the virtio-blk device and
 * is flushed before it returns), record n with nonce x into slot x % SLOTS (byte offset
 * 512 * (x % SLOTS)): scattered, so that on a qcow2 image most writes allocate a cluster
 * and update its metadata. It never stops by itself. Each record is
 *   bytes 0-7    "RVREC001"
 *   bytes 8-15   n (little-endian)
 *   bytes 16-23  a nonce from RDRAND, fresh for every record
 *   bytes 24-511 filled from the nonce (xorshift64), so a torn sector is seen
 * and after its write returns the program prints
 *   RV-REC n nonce            (both in hex)
 * on stdout (the serial console), flushed at once. Whatever the VMM's fate afterwards, each
 * printed record must be on the disk. The nonces come from RDRAND, not the kernel's CRNG, so
 * a guest restored many times from one snapshot writes different records each time.
 *
 * Built static by scripts/setup-guest.sh with the host's gcc (-mrdrnd).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t rdrand(void) {
    unsigned long long v;
    for (int i = 0; i < 100; i++) {
        if (_rdrand64_step(&v))
            return v;
    }
    fprintf(stderr, "rv-records: RDRAND keeps failing\n");
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 3 || atol(argv[2]) < 1) {
        fprintf(stderr, "usage: rv-records DEVICE SLOTS\n");
        return 2;
    }
    long slots = atol(argv[2]);
    int fd = open(argv[1], O_RDWR | O_DIRECT | O_SYNC);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    unsigned char *buf = aligned_alloc(4096, 4096);
    if (!buf)
        return 1;
    for (uint64_t n = 0;; n++) {
        uint64_t nonce = rdrand(), x = nonce | 1, seq = n;
        memcpy(buf, "RVREC001", 8);
        memcpy(buf + 8, &seq, 8);
        memcpy(buf + 16, &nonce, 8);
        for (int i = 24; i < 512; i += 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            memcpy(buf + i, &x, 8);
        }
        if (pwrite(fd, buf, 512, (off_t)(nonce % (uint64_t)slots) * 512) != 512) {
            perror("rv-records: pwrite");
            return 1;
        }
        printf("RV-REC %llx %016llx\n", (unsigned long long)n, (unsigned long long)nonce);
        fflush(stdout);
    }
}
