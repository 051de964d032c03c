/* The floor: a single-threaded C server that speaks just enough of the wire
 * protocol (HELLO -> WELCOME, FILTER_STATUS) and then answers every CALL with a
 * REPLY of the size hvcproxyd sends (x0..x3), as fast as the kernel allows:
 * one recv takes every frame that is there, one send carries every reply.
 * x0 is 0x10001 (what PSCI_VERSION answers); nothing is looked up.
 *
 * usage: echo_floor SOCKET_PATH   (serves one connection after another until killed) */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "proto.h"

#define BUF (1 << 17)

static int send_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) { if (errno == EINTR) continue; return -1; }
        p += k; n -= (size_t)k;
    }
    return 0;
}

/* WELCOME: version 1 and one FORWARD range, PSCI_VERSION: the call every floor
 * run makes.  A VMM that honours the filter (QEMU, the Python simulator)
 * answers the rest itself, so a guest's SYSTEM_OFF still powers it off. */
static size_t welcome(uint8_t *out)
{
    static const uint32_t ranges[][2] = {{0x84000000u, 1}};
    size_t n = sizeof ranges / sizeof ranges[0], len = HDR + 16 + n * 12;
    memset(out, 0, len);
    put_header(out, (uint32_t)len, T_WELCOME, 0);
    put16(out + HDR, 1); put16(out + HDR + 2, (uint16_t)n);
    for (size_t i = 0; i < n; i++) {
        uint8_t *r = out + HDR + 16 + i * 12;
        put32(r, ranges[i][0]); put32(r + 4, ranges[i][1]); r[8] = 2;
    }
    return len;
}

static void serve(int fd)
{
    static uint8_t in[BUF], out[BUF];
    size_t have = 0;
    for (;;) {
        ssize_t k = recv(fd, in + have, sizeof in - have, 0);
        if (k <= 0) { if (k < 0 && errno == EINTR) continue; return; }
        have += (size_t)k;
        size_t off = 0, o = 0;
        while (have - off >= HDR) {
            uint32_t len = get32(in + off);
            if (len < HDR || len > BUF) return;
            if (have - off < len) break;
            uint16_t type = get16(in + off + 4);
            uint64_t seq = get64(in + off + 8);
            if (type == T_HELLO) {
                o += welcome(out + o);
            } else if (type == T_CALL) {
                uint8_t *r = out + o;
                const uint8_t *c = in + off + HDR;
                /* An FF-A DIRECT_REQ2 is answered as the daemon answers it: x0..x17, the
                 * payload echoed; every other call with x0..x3. */
                int wide = get32(c + 8) == 0xC400008Du;
                uint32_t n = wide ? 18 : REPLY_REGS, rlen = HDR + 8 + n * 8;
                put_header(r, rlen, T_REPLY, seq);
                r[HDR] = (uint8_t)n; r[HDR + 1] = 0; put16(r + HDR + 2, 0);
                memcpy(r + HDR + 4, c, 4);  /* vcpu */
                memset(r + HDR + 8, 0, n * 8);
                put64(r + HDR + 8, wide ? 0xC400008Eu : 0x10001);
                if (wide)
                    memcpy(r + HDR + 8 + 4 * 8, c + 16 + 3 * 8, 14 * 8);  /* x4..x17 */
                o += rlen;
            }  /* FILTER_STATUS and anything else: nothing to answer */
            off += len;
            if (o > sizeof out - 256) { if (send_all(fd, out, o)) return; o = 0; }
        }
        if (o && send_all(fd, out, o)) return;
        memmove(in, in + off, have - off);
        have -= off;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: %s SOCKET\n", argv[0]); return 2; }
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", argv[1]);
    unlink(sa.sun_path);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 16)) { perror("listen"); return 1; }
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) { if (errno == EINTR) continue; perror("accept"); return 1; }
        serve(fd);
        close(fd);
    }
}
