/* rv-xmodify: a cross-modifying-code test for the rustvisor test guest's vCPUs.
 *
 *   rv-xmodify PATCHES
 *
 * One thread (pinned to CPU 1) keeps calling a function in an executable page; another
 * (pinned to CPU 0) rewrites that function PATCHES times, each time with one aligned 8-byte
 * store, alternating between two instructions (one opcode, one 32-bit immediate, then a
 * `ret` that stays where it is):
 *   odd generation g:  mov eax, g * 0x01010101; ret; nop; nop
 *   even generation g: add eax, g * 0x01010101; ret; nop; nop   (called with eax = 0)
 * and waits until the caller has seen generation g before writing g + 1. The caller checks
 * that every value it gets is the current generation or the next one: anything else is a
 * torn instruction (an immediate half old, half new) or old code run after newer code was
 * seen. (Only one instruction changes: a patch that moved instruction boundaries could
 * legitimately be seen half old, half new at a boundary, on hardware too; Intel SDM Vol. 3
 * §8.1.3.) Prints
 *   RV-XMODIFY patches=N torn=T stale=S timeouts=O max_us=M
 * where a correct SMP CPU gives T = S = O = 0 (issue 12: code another vCPU patches is
 * retired everywhere before the next fetch of it); M is the longest time in microseconds
 * from a patch to the caller seeing it (a patch not seen within 2 s counts as a timeout).
 *
 * Built static by scripts/setup-guest.sh with the host's gcc.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t *code;       /* the function: 8 bytes in an RWX page */
static volatile long seen;            /* the newest generation the caller saw */
static volatile int stop;
static long torn, stale;

/* Generation g of the function (g in 1..126), as one little-endian 8-byte word. */
static uint64_t encode(long g) {
    unsigned char b[8] = {(g & 1) ? 0xb8 : 0x05, (unsigned char)g, (unsigned char)g, (unsigned char)g,
                          (unsigned char)g, 0xc3, 0x90, 0x90};
    uint64_t w;
    memcpy(&w, b, 8);
    return w;
}

/* The generation the function's return value `v` names, or -1 if it names none. */
static long decode(uint32_t v) {
    uint32_t g = v & 0xff;
    if (g >= 1 && g < 127 && v == g * 0x01010101u)
        return (long)g;
    return v == 0 ? 0 : -1;
}

/* Calls the function at `f` with eax = 0. */
static uint32_t call0(volatile uint64_t *f) {
    uint32_t v;
    /* Below the red zone: the call pushes a return address. */
    __asm__ volatile("sub $128, %%rsp; xor %%eax, %%eax; call *%1; add $128, %%rsp"
                     : "=&a"(v)
                     : "r"(f)
                     : "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc");
    return v;
}

/* Generation of patch number i (1-based): 1..126, then around again. */
static long gen_of(long i) { return (i - 1) % 126 + 1; }

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *caller(void *arg) {
    (void)arg;
    pin(1);
    long idx = 0; /* patch number the caller is at */
    while (!stop) {
        long g = decode(call0(code));
        if (g == gen_of(idx) || (idx == 0 && g == 0)) {
            continue;
        }
        if (g == gen_of(idx + 1)) {
            idx++;
            seen = idx;
        } else if (g < 0) {
            torn++;
        } else {
            stale++;
        }
    }
    return NULL;
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    if (argc != 2 || atol(argv[1]) < 1) {
        fprintf(stderr, "usage: rv-xmodify PATCHES\n");
        return 2;
    }
    long patches = atol(argv[1]);
    void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    /* Generation 0: `mov eax, 0; ret`, which the caller accepts before the first patch. */
    code = (volatile uint64_t *)((char *)page + 64);
    unsigned char zero[8] = {0xb8, 0, 0, 0, 0, 0xc3, 0x90, 0x90};
    uint64_t w;
    memcpy(&w, zero, 8);
    *code = w;
    pin(0);
    pthread_t t;
    if (pthread_create(&t, NULL, caller, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    long timeouts = 0;
    double max_us = 0;
    usleep(10000);
    for (long i = 1; i <= patches; i++) {
        __atomic_store_n(code, encode(gen_of(i)), __ATOMIC_SEQ_CST);
        double t0 = now_us();
        while (seen < i) {
            if (now_us() - t0 > 2e6) {
                timeouts++;
                break;
            }
        }
        double dt = now_us() - t0;
        if (dt > max_us)
            max_us = dt;
        if (seen < i)
            break;
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("RV-XMODIFY patches=%ld torn=%ld stale=%ld timeouts=%ld max_us=%.0f\n", patches, torn, stale, timeouts,
           max_us);
    return 0;
}
