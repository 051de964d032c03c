/* The few frames of the hvcproxyd wire protocol (docs/protocol.md) the bench
 * needs, as little-endian byte layouts.  The sizes mirror hvcproxyd/wire.py;
 * bench/callpath_bench.py checks them against the codec before every run. */
#ifndef BENCH_PROTO_H
#define BENCH_PROTO_H

#include <stdint.h>
#include <string.h>

#define MAGIC 0x50435648u
#define HDR 16
#define T_HELLO 1
#define T_WELCOME 2
#define T_FILTER_STATUS 3
#define T_CALL 4
#define T_REPLY 5
#define T_MEM_READ 6
#define T_MEM_READ_RESP 7
#define T_ERROR 12
#define CALL_PAYLOAD (16 + 17 * 8)      /* vcpu, flags, fid, reserved, x1..x17 */
#define CALL_FRAME (HDR + CALL_PAYLOAD)  /* 168 */
#define REPLY_REGS 4
#define REPLY_FRAME (HDR + 8 + REPLY_REGS * 8)  /* 56: x0..x3, no effects */

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline void put_header(uint8_t *p, uint32_t len, uint16_t type, uint64_t seq)
{
    put32(p, len); put16(p + 4, type); put16(p + 6, 0); put64(p + 8, seq);
}

#endif
