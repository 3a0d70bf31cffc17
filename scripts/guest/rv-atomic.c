/* rv-atomic: an atomic-counter stress test for the rustvisor test guest's vCPUs.
 *
 *   rv-atomic THREADS COUNT
 *
 * Starts THREADS threads, thread i pinned to CPU i % nproc, each adding 1 COUNT times to
 * four shared 32-bit counters: with `lock xadd` on an aligned one, with a `lock cmpxchg`
 * loop on one that crosses a 64-byte cache line, with `lock xadd` on one that crosses a
 * 4 KiB page, and with `lock incl`. Prints
 *   RV-ATOMIC expected=N xadd=A cmpxchg=B split=C inc=D
 * where every value must equal N = THREADS * COUNT on a correct SMP CPU (issue 12: LOCK
 * read-modify-writes are atomic across vCPUs, also misaligned and page-crossing).
 *
 * Built static by scripts/setup-guest.sh with the host's gcc.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long count;
static uint32_t aligned __attribute__((aligned(64)));
static uint32_t incd __attribute__((aligned(64)));
static unsigned char line[128] __attribute__((aligned(64)));
static unsigned char page[8192] __attribute__((aligned(4096)));

static void xadd(volatile uint32_t *p) {
    uint32_t one = 1;
    __asm__ volatile("lock xaddl %0, %1" : "+r"(one), "+m"(*p) : : "memory");
}

static void cmpxchg_inc(volatile uint32_t *p) {
    uint32_t old = *p, want;
    unsigned char ok;
    do {
        want = old + 1;
        __asm__ volatile("lock cmpxchgl %3, %1; sete %2"
                         : "+a"(old), "+m"(*p), "=q"(ok)
                         : "r"(want)
                         : "memory", "cc");
    } while (!ok);
}

static void inc(volatile uint32_t *p) { __asm__ volatile("lock incl %0" : "+m"(*p) : : "memory", "cc"); }

static void *work(void *arg) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)((long)arg % (cpus > 0 ? cpus : 1)), &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    volatile uint32_t *crossing_line = (volatile uint32_t *)(line + 62);
    volatile uint32_t *crossing_page = (volatile uint32_t *)(page + 4094);
    for (long i = 0; i < count; i++) {
        xadd(&aligned);
        cmpxchg_inc(crossing_line);
        xadd(crossing_page);
        inc(&incd);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: rv-atomic THREADS COUNT\n");
        return 2;
    }
    long threads = atol(argv[1]);
    count = atol(argv[2]);
    if (threads < 1 || threads > 256 || count < 1) {
        fprintf(stderr, "rv-atomic: THREADS 1-256, COUNT 1 or more\n");
        return 2;
    }
    pthread_t t[256];
    for (long i = 0; i < threads; i++) {
        if (pthread_create(&t[i], NULL, work, (void *)i) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    for (long i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("RV-ATOMIC expected=%ld xadd=%u cmpxchg=%u split=%u inc=%u\n", threads * count, aligned,
           *(uint32_t *)(line + 62), *(uint32_t *)(page + 4094), incd);
    return 0;
}
