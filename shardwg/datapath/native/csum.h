/* Internet checksum (RFC 1071) helpers shared by the seal and open kernels.
 *
 * Sums are kept as residues modulo 0xFFFF, exactly as shardwg/io/vnet.py does (sum16/finish):
 * the ones' complement sum of 16-bit words is congruent to their plain sum mod 0xFFFF, so
 * residues add freely and `csum_finish` gives the field value (never 0, like vnet.finish).
 *
 * Data is summed in the machine's byte order, 8 bytes per load into a 64-bit accumulator with
 * the carries counted apart (2**64 == 1 mod 0xFFFF), and folded once at the end. On a
 * little-endian machine that native sum is 256x the big-endian word sum (mod 0xFFFF), and
 * 256 * 256 == 1, so one multiply by 256 turns it into the network-order residue.
 */
#ifndef SHARDWG_CSUM_H
#define SHARDWG_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Big-endian 16/32-bit reads and writes at any alignment. */
static inline uint32_t rd16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint32_t rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void wr16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Residue (mod 0xFFFF) of p[0:len] read as big-endian 16-bit words, the last byte of an odd
 * length padded with a zero (vnet.sum16). p need not be aligned. */
static inline uint64_t csum_data(const uint8_t *p, size_t len) {
    uint64_t s0 = 0, s1 = 0, c = 0;
    while (len >= 16) {
        uint64_t a, b;
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        s0 += a;
        c += s0 < a;
        s1 += b;
        c += s1 < b;
        p += 16;
        len -= 16;
    }
    uint64_t tail = 0;
    while (len >= 2) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        tail += ((uint64_t)p[0] << 8) | p[1];
#else
        tail += ((uint64_t)p[1] << 8) | p[0];
#endif
        p += 2;
        len -= 2;
    }
    if (len) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        tail += (uint64_t)p[0] << 8;
#else
        tail += p[0];
#endif
    }
    uint64_t r = s0 % 0xFFFF + s1 % 0xFFFF + c % 0xFFFF + tail % 0xFFFF;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return r % 0xFFFF;
#else
    return (r % 0xFFFF) * 256 % 0xFFFF;
#endif
}

/* Sum of the big-endian words of a short header (even length), skipping nothing. */
static inline uint64_t csum_words(const uint8_t *p, size_t len) {
    uint64_t s = 0;
    for (size_t i = 0; i + 1 < len; i += 2) s += rd16(p + i);
    if (len & 1) s += (uint64_t)p[len - 1] << 8;
    return s;
}

/* The checksum field for a residue total: never 0 (UDP's "no checksum"), as vnet.finish. */
static inline uint32_t csum_finish(uint64_t total) { return 0xFFFF - (uint32_t)(total % 0xFFFF); }

#endif
