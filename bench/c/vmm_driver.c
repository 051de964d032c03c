/* A VMM for benchmarks: it speaks the wire protocol as patched QEMU does (one
 * I/O thread owns reading the socket; each vCPU thread writes its CALL and
 * waits on its own condition for the reply, one call in flight per vCPU), so
 * the same program drives the C echo floor and hvcproxyd and the driver's own
 * cost is the same in both.
 *
 * usage: vmm_driver -s SOCKET [-n VCPUS] [-F FLOODERS] [-k version|affinity|memshare|ffa]
 *                   [-t SECONDS] [-w WARMUP_SECONDS] [-q QUIET_PERIOD_US] [-x EXPECTED_X0] [-R]
 *
 * Without -q every vCPU (or the first FLOODERS) calls back to back.  With -q,
 * vCPU 0 is the quiet one: one call every QUIET_PERIOD_US, while vCPUs
 * 1..FLOODERS flood.  Prints one JSON line: calls and seconds in the measured
 * window, and vCPU 0's latency percentiles in microseconds.
 *
 * So that the driver never decides what a fairness run measures (issue 15):
 * no vCPU thread waits for another to write.  Each CALL is one send() of the
 * whole 168-byte frame, which the kernel queues on a UNIX stream socket as one
 * piece (a short send is an error, not a retry that could interleave); only the
 * rare MEM_READ_RESP, which may be larger than one piece, takes the write side
 * of a lock the senders share.  With -R the I/O thread and the quiet vCPU run
 * SCHED_FIFO (the flooders stay SCHED_OTHER), so a flooder that has the CPU
 * never delays a reply's delivery or the quiet vCPU's next call; if the kernel
 * refuses, the run goes on without and the JSON says "rt": 0.  The JSON also
 * has the driver's own share of vCPU 0's calls: "drv_p99" (µs from taking the
 * time to the CALL being sent, plus from the reply being read to vCPU 0 running
 * again) and "late_p99" (how late vCPU 0 woke for its next call).
 *
 * -k ffa negotiates FF-A 1.2 once, then sends FFA_MSG_SEND_DIRECT_REQ2 from VM 1
 * to partition 0x8001 with x4..x17 all carrying data, and expects x0..x17 back
 * (FFA_MSG_SEND_DIRECT_RESP2 with the payload echoed): the widest call there is. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "proto.h"

#define MAX_VCPUS 64
#define MAX_SAMPLES (1 << 21)
#define RT_PRIO_READER 10  /* SCHED_FIFO with -R: the I/O thread, and above it the quiet vCPU */
#define RT_PRIO_QUIET 11
#define RAM_BASE 0x40000000ull
#define RAM_SIZE (256ull << 20)

struct vcpu {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    uint64_t x0;
    uint64_t calls, bad;
    uint32_t *samples;  /* ns */
    uint32_t *drv, *late;  /* vCPU 0 only: the driver's own part of each call, wake-up lateness (ns) */
    double t_sent, t_seen;
    size_t n;
    int index;
    pthread_t thread;
};

static int sock;
/* CALL senders share it (never wait for each other); MEM_READ_RESP takes it alone. */
static pthread_rwlock_t write_lock;
static int want_rt;
static atomic_int rt_ok = -1;  /* -1: not asked for; 1: every -R thread got it; 0: refused */
static struct vcpu vcpus[MAX_VCPUS];
static int n_vcpus = 1, flooders = -1, quiet_us = 0;
static const char *kind = "version";
static double seconds = 1.0, warmup = 0.2;
static long long expect_x0 = -1;
static atomic_ullong next_seq = 1;
static atomic_int stop;
static struct timespec t_start, t_measure, t_end;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t mpidr(int i) { return ((uint64_t)(i / 8) << 8) | (uint64_t)(i % 8); }

/* SCHED_FIFO for the calling thread; 0 if the kernel refused (reported, not fatal). */
static int set_rt(int prio)
{
    struct sched_param sp = {.sched_priority = prio};
    int err = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
    if (err) {
        fprintf(stderr, "vmm_driver: SCHED_FIFO refused (%s): running without real-time priority\n", strerror(err));
        return 0;
    }
    return 1;
}

/* One frame, one send: the kernel keeps it whole between other threads' sends. */
static int send_frame(const uint8_t *p, size_t n)
{
    for (;;) {
        ssize_t k = send(sock, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return -1;
        if ((size_t)k != n) { fprintf(stderr, "vmm_driver: short send (%zd of %zu)\n", k, n); exit(3); }
        return 0;
    }
}

static int send_all(const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t k = send(sock, p, n, MSG_NOSIGNAL);
        if (k < 0) { if (errno == EINTR) continue; return -1; }
        p += k; n -= (size_t)k;
    }
    return 0;
}

static int recv_frame(uint8_t *buf, size_t cap)
{
    size_t have = 0, want = HDR;
    while (have < want) {
        ssize_t k = recv(sock, buf + have, want - have, 0);
        if (k <= 0) return -1;
        have += (size_t)k;
        if (have == HDR) {
            want = get32(buf);
            if (want < HDR || want > cap) return -1;
        }
    }
    return get16(buf + 4);
}

static void *reader(void *arg)
{
    (void)arg;
    if (want_rt && !set_rt(RT_PRIO_READER)) rt_ok = 0;
    static uint8_t in[1 << 17];
    static uint8_t resp[HDR + 8 + 65536];
    size_t have = 0;
    for (;;) {
        ssize_t k = recv(sock, in + have, sizeof in - have, 0);
        if (k <= 0) { if (k < 0 && errno == EINTR) continue; break; }
        have += (size_t)k;
        double t_read = now();
        size_t off = 0;
        while (have - off >= HDR) {
            uint32_t len = get32(in + off);
            if (have - off < len) break;
            uint16_t type = get16(in + off + 4);
            const uint8_t *p = in + off + HDR;
            if (type == T_REPLY) {
                uint32_t v = get32(p + 4);
                if (v < (uint32_t)n_vcpus) {
                    struct vcpu *c = &vcpus[v];
                    pthread_mutex_lock(&c->lock);
                    c->x0 = get64(p + 8);
                    c->t_seen = t_read;
                    c->done = 1;
                    pthread_cond_signal(&c->cond);  /* only the vCPU whose reply this is */
                    pthread_mutex_unlock(&c->lock);
                }
            } else if (type == T_MEM_READ) {  /* zeros: the bench's handlers never read RAM */
                uint32_t n = get32(p + 8);
                if (n > 65536) n = 65536;
                memset(resp, 0, HDR + 8 + n);
                put_header(resp, HDR + 8 + n, T_MEM_READ_RESP, get64(in + off + 8));
                pthread_rwlock_wrlock(&write_lock);
                send_all(resp, HDR + 8 + n);
                pthread_rwlock_unlock(&write_lock);
            } else if (type == T_ERROR) {
                fprintf(stderr, "vmm_driver: ERROR %u from the handler: %.*s\n", get32(p), (int)get16(p + 4),
                        (const char *)p + 8);
                exit(3);
            }
            off += len;
        }
        memmove(in, in + off, have - off);
        have -= off;
    }
    if (!atomic_load(&stop)) { fprintf(stderr, "vmm_driver: connection closed\n"); exit(3); }
    return NULL;
}

/* One call with x1..x(n): the vCPU's thread blocks until its reply; x0 back. */
static uint64_t call_args(struct vcpu *c, uint32_t fid, const uint64_t *args, int n)
{
    uint8_t f[CALL_FRAME] = {0};
    put_header(f, CALL_FRAME, T_CALL, atomic_fetch_add(&next_seq, 1));
    put32(f + HDR, (uint32_t)c->index);
    put32(f + HDR + 8, fid);
    for (int i = 0; i < n && i < 17; i++)
        put64(f + HDR + 16 + 8 * i, args[i]);
    c->done = 0;
    pthread_rwlock_rdlock(&write_lock);
    int err = send_frame(f, sizeof f);
    pthread_rwlock_unlock(&write_lock);
    c->t_sent = now();
    if (err) { if (atomic_load(&stop)) return 0; perror("vmm_driver: send"); exit(3); }
    pthread_mutex_lock(&c->lock);
    while (!c->done) pthread_cond_wait(&c->cond, &c->lock);
    uint64_t x0 = c->x0;
    pthread_mutex_unlock(&c->lock);
    return x0;
}

static uint64_t call(struct vcpu *c, uint32_t fid, uint64_t x1, uint64_t x2)
{
    const uint64_t args[2] = {x1, x2};
    return call_args(c, fid, args, 2);
}

#define FFA_VERSION 0x84000063u
#define FFA_DIRECT_REQ2 0xC400008Du
#define FFA_DIRECT_RESP2 0xC400008Eu

static void *vcpu_main(void *arg)
{
    struct vcpu *c = arg;
    int quiet = quiet_us && c->index == 0;
    if (quiet && want_rt && !set_rt(RT_PRIO_QUIET)) rt_ok = 0;
    double measure = t_measure.tv_sec + t_measure.tv_nsec * 1e-9, end = t_end.tv_sec + t_end.tv_nsec * 1e-9;
    uint64_t ipa = RAM_BASE + (uint64_t)(c->index + 1) * 4096;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t i = 0;; i++) {
        double t0 = now();
        if (t0 >= end && !(i & 1 && !strcmp(kind, "memshare"))) break;  /* end on an UNSHARE */
        uint64_t x0, want = 0;
        if (!strcmp(kind, "affinity")) {
            x0 = call(c, 0xC4000004u, mpidr((c->index + 1) % n_vcpus), 0);
        } else if (!strcmp(kind, "memshare")) {
            x0 = call(c, i & 1 ? 0xC6000004u : 0xC6000003u, ipa, 0);
        } else if (!strcmp(kind, "ffa")) {
            uint64_t args[17] = {1u << 16 | 0x8001u, 0, 0};  /* VM 1 -> echo; UUID 0: any of its services */
            for (int r = 3; r < 17; r++)
                args[r] = (i << 8) + (uint64_t)r;
            x0 = call_args(c, FFA_DIRECT_REQ2, args, 17);
            want = FFA_DIRECT_RESP2;
        } else {
            x0 = call(c, 0x84000000u, 0, 0);
            want = 0x10001;
        }
        double t1 = now();
        if (t0 >= measure) {
            c->calls++;
            if (expect_x0 >= 0 && x0 != (expect_x0 ? want : 0)) c->bad++;
            if (c->n < MAX_SAMPLES) {
                if (c->drv) c->drv[c->n] = (uint32_t)(((c->t_sent - t0) + (t1 - c->t_seen)) * 1e9);
                c->samples[c->n++] = (uint32_t)((t1 - t0) * 1e9);
            }
        }
        if (quiet) {
            next.tv_nsec += quiet_us * 1000L;
            while (next.tv_nsec >= 1000000000L) { next.tv_nsec -= 1000000000L; next.tv_sec++; }
            double due = next.tv_sec + next.tv_nsec * 1e-9;
            int slept = now() < due;
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
            double woke = now();  /* lateness of a real sleep only: a call longer than the period has none */
            if (slept && t0 >= measure && woke > due) c->late[c->n - 1] = (uint32_t)((woke - due) * 1e9);
        }
    }
    return NULL;
}

static int cmp32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint32_t *s, size_t n, double q)
{
    if (!n) return 0;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return s[i] / 1000.0;
}

static void handshake(void)
{
    uint8_t f[4096] = {0};
    const char *name = "bench";
    size_t nl = strlen(name);
    size_t len = HDR + 32 + (size_t)n_vcpus * 16 + 32 + nl;
    uint8_t *p = f + HDR;
    put_header(f, (uint32_t)len, T_HELLO, 0);
    put32(p, MAGIC); put16(p + 4, 1); put16(p + 6, 1);
    p[16] = 0; p[17] = 40; p[18] = 1;  /* TCG, 40-bit IPA, PSCI on HVC */
    put16(p + 20, (uint16_t)n_vcpus); put16(p + 22, 1); put16(p + 24, 0); put16(p + 26, (uint16_t)nl);
    p += 32;
    for (int i = 0; i < n_vcpus; i++, p += 16) { put64(p, mpidr(i)); put32(p + 8, (uint32_t)i); p[12] = 1; }
    put64(p, RAM_BASE); put64(p + 8, RAM_SIZE); put64(p + 16, 0); put32(p + 24, (uint32_t)-1);
    p += 32;
    memcpy(p, name, nl);
    if (send_all(f, len)) { perror("vmm_driver: HELLO"); exit(3); }
    int t = recv_frame(f, sizeof f);
    if (t != T_WELCOME) { fprintf(stderr, "vmm_driver: expected WELCOME, got %d\n", t); exit(3); }
    uint8_t fs[HDR + 8];
    put_header(fs, sizeof fs, T_FILTER_STATUS, 0);
    put32(fs + HDR, 0); put32(fs + HDR + 4, 0xFFFFFFFFu);
    if (send_all(fs, sizeof fs)) { perror("vmm_driver: FILTER_STATUS"); exit(3); }
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "s:n:F:k:t:w:q:x:R")) != -1) {
        switch (opt) {
        case 's': path = optarg; break;
        case 'n': n_vcpus = atoi(optarg); break;
        case 'F': flooders = atoi(optarg); break;
        case 'k': kind = optarg; break;
        case 't': seconds = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'q': quiet_us = atoi(optarg); break;
        case 'x': expect_x0 = atoll(optarg); break;
        case 'R': want_rt = 1; break;
        default: fprintf(stderr, "bad option\n"); return 2;
        }
    }
    if (!path || n_vcpus < 1 || n_vcpus > MAX_VCPUS) { fprintf(stderr, "usage: see the source\n"); return 2; }
    if (flooders < 0) flooders = quiet_us ? n_vcpus - 1 : n_vcpus;
    pthread_rwlockattr_t rwa;
    pthread_rwlockattr_init(&rwa);
    pthread_rwlockattr_setkind_np(&rwa, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&write_lock, &rwa);
    if (want_rt) rt_ok = 1;
    sock = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    if (connect(sock, (struct sockaddr *)&sa, sizeof sa)) { perror("vmm_driver: connect"); return 3; }
    handshake();
    pthread_t rt;
    pthread_create(&rt, NULL, reader, NULL);
    if (!strcmp(kind, "ffa")) {  /* FF-A calls exist only once a version is agreed */
        struct vcpu *c0 = &vcpus[0];
        pthread_mutex_init(&c0->lock, NULL);
        pthread_cond_init(&c0->cond, NULL);
        uint64_t v = call(c0, FFA_VERSION, 0x10002, 0);
        if (expect_x0 >= 0 && v >> 31) { fprintf(stderr, "vmm_driver: FFA_VERSION failed: %#llx\n", (unsigned long long)v); return 3; }
    }
    clock_gettime(CLOCK_MONOTONIC, &t_start);
    double s = t_start.tv_sec + t_start.tv_nsec * 1e-9;
    t_measure.tv_sec = (time_t)(s + warmup); t_measure.tv_nsec = (long)((s + warmup - (double)t_measure.tv_sec) * 1e9);
    t_end.tv_sec = (time_t)(s + warmup + seconds);
    t_end.tv_nsec = (long)((s + warmup + seconds - (double)t_end.tv_sec) * 1e9);
    int first = quiet_us ? 0 : 0, last = quiet_us ? flooders : flooders - 1;
    for (int i = first; i <= last && i < n_vcpus; i++) {
        struct vcpu *c = &vcpus[i];
        pthread_mutex_init(&c->lock, NULL);
        pthread_cond_init(&c->cond, NULL);
        c->index = i;
        c->samples = malloc(sizeof(uint32_t) * MAX_SAMPLES);
        if (!c->samples) { perror("vmm_driver: malloc"); return 3; }
        if (quiet_us && i == 0) {  /* touched now: no page fault inside vCPU 0's timed calls */
            size_t cap = (size_t)(seconds * 1e6 / quiet_us) + 1024;
            if (cap > MAX_SAMPLES) cap = MAX_SAMPLES;
            c->drv = calloc(MAX_SAMPLES, sizeof(uint32_t));
            c->late = calloc(MAX_SAMPLES, sizeof(uint32_t));
            if (!c->drv || !c->late) { perror("vmm_driver: calloc"); return 3; }
            memset(c->samples, 0, cap * sizeof(uint32_t));
            memset(c->drv, 0, cap * sizeof(uint32_t));
            memset(c->late, 0, cap * sizeof(uint32_t));
        }
        pthread_create(&c->thread, NULL, vcpu_main, c);
    }
    uint64_t calls = 0, bad = 0;
    for (int i = first; i <= last && i < n_vcpus; i++) {
        pthread_join(vcpus[i].thread, NULL);
        calls += vcpus[i].calls;
        bad += vcpus[i].bad;
    }
    atomic_store(&stop, 1);
    struct vcpu *c = &vcpus[0];
    qsort(c->samples, c->n, sizeof *c->samples, cmp32);
    double drv99 = 0, late99 = 0;
    if (c->drv) {
        qsort(c->drv, c->n, sizeof *c->drv, cmp32);
        qsort(c->late, c->n, sizeof *c->late, cmp32);
        drv99 = pct(c->drv, c->n, 0.99);
        late99 = pct(c->late, c->n, 0.99);
    }
    printf("{\"calls\": %llu, \"seconds\": %.6f, \"bad\": %llu, \"samples\": %zu, "
           "\"p50\": %.2f, \"p99\": %.2f, \"p999\": %.2f, \"drv_p99\": %.2f, \"late_p99\": %.2f, "
           "\"rt\": %d, \"vcpu0_calls\": %llu}\n",
           (unsigned long long)calls, seconds, (unsigned long long)bad, c->n,
           pct(c->samples, c->n, 0.5), pct(c->samples, c->n, 0.99), pct(c->samples, c->n, 0.999),
           drv99, late99, rt_ok, (unsigned long long)c->calls);
    fflush(stdout);
    shutdown(sock, SHUT_RDWR);
    close(sock);
    return 0;
}
