/* Inbound coalescing for open.c: the rules of shardwg/io/coalesce.py, in C.
 *
 * Packets that passed every check are merged into TUN super-packets exactly as
 * Coalescer(verify=False, max_segments=64, max_size=65535, max_arenas=16) merges them (the
 * checksums were verified before), and the writes are laid out back to back in `out`.
 * Only open.c includes this file.
 */
#ifndef SHARDWG_OPEN_COALESCE_H
#define SHARDWG_OPEN_COALESCE_H

#include <stdint.h>
#include <string.h>

#include "csum.h"

#define CO_MAX_SEGMENTS 64
#define CO_MAX_SIZE 65535
#define CO_MAX_ARENAS 16
#define CO_ACK 0x10
#define CO_PSH 0x08
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

typedef struct {
    uint8_t key[36], sig[64];
    uint8_t klen, slen, proto, flags, iph, v6;
    uint32_t hl, seq;
} cand_t;

/* coalesce.py _candidate: may this packet join a super-packet? */
static int co_candidate(const uint8_t *p, uint32_t n, int udp, cand_t *c) {
    if (p[0] == 0x45 && n >= 40 && p[9] == IPPROTO_TCP_) {
        uint32_t thl = (uint32_t)(p[32] >> 4) * 4, hl = 20 + thl;
        uint8_t flags = p[33];
        if (rd16(p + 2) != n || rd16(p + 6) & 0x3FFF || (flags != CO_ACK && flags != (CO_ACK | CO_PSH)) ||
            thl < 20 || hl >= n)
            return 0;
        c->slen = 0;
        c->sig[c->slen++] = p[1];
        c->sig[c->slen++] = p[8];
        memcpy(c->sig + c->slen, p + 6, 2), c->slen += 2;
        memcpy(c->sig + c->slen, p + 28, 4), c->slen += 4;  /* ack */
        memcpy(c->sig + c->slen, p + 34, 2), c->slen += 2;  /* window */
        c->sig[c->slen++] = p[32];                          /* data offset byte */
        memcpy(c->sig + c->slen, p + 40, thl - 20), c->slen += (uint8_t)(thl - 20);
        memcpy(c->key, p + 12, 12), c->klen = 12;
        c->proto = IPPROTO_TCP_, c->iph = 20, c->hl = hl, c->seq = rd32(p + 24), c->flags = flags;
        c->v6 = 0;
        return 1;
    }
    uint32_t v = p[0] >> 4, iph;
    uint8_t proto;
    c->slen = 0;
    if (v == 4) {
        if (n < 28 || p[0] != 0x45 || rd16(p + 2) != n || rd16(p + 6) & 0x3FFF) return 0;
        iph = 20, proto = p[9];
        memcpy(c->key, p + 12, 12), c->klen = 12;
        c->sig[c->slen++] = p[1];
        c->sig[c->slen++] = p[8];
        memcpy(c->sig + c->slen, p + 6, 2), c->slen += 2;
    } else if (v == 6) {
        if (n < 48) return 0;
        proto = p[6];
        if (rd16(p + 4) != n - 40) return 0;
        iph = 40;
        memcpy(c->key, p + 8, 36), c->klen = 36;
        memcpy(c->sig, p, 4), c->slen = 4;
        c->sig[c->slen++] = p[7];
    } else {
        return 0;
    }
    const uint8_t *t = p + iph;
    if (proto == IPPROTO_TCP_) {
        if (n < iph + 20) return 0;
        uint32_t thl = (uint32_t)(t[12] >> 4) * 4, hl = iph + thl;
        uint8_t flags = t[13];
        if (thl < 20 || hl >= n || (flags != CO_ACK && flags != (CO_ACK | CO_PSH))) return 0;
        memcpy(c->sig + c->slen, t + 8, 4), c->slen += 4;
        memcpy(c->sig + c->slen, t + 14, 2), c->slen += 2;
        c->sig[c->slen++] = t[12];
        memcpy(c->sig + c->slen, t + 20, thl - 20), c->slen += (uint8_t)(thl - 20);
        c->hl = hl, c->seq = rd32(t + 4), c->flags = flags;
    } else if (proto == IPPROTO_UDP_ && udp) {
        uint32_t hl = iph + 8;
        if (hl >= n || rd16(t + 4) != n - iph) return 0;
        if (v == 4 && rd16(t + 6) == 0) return 0;
        c->hl = hl, c->seq = 0, c->flags = CO_ACK;
    } else {
        return 0;
    }
    c->proto = proto, c->iph = (uint8_t)iph, c->v6 = v == 6;
    return 1;
}

/* coalesce.py _flow_key: the key a TCP/UDP packet that cannot merge would have had. */
static int co_flow_key(const uint8_t *p, uint32_t n, uint8_t *key) {
    uint32_t v = p[0] >> 4;
    if (v == 4 && n >= 24 && (p[9] == IPPROTO_TCP_ || p[9] == IPPROTO_UDP_)) {
        uint32_t ihl = (uint32_t)(p[0] & 15) * 4;
        if (ihl == 20) {
            memcpy(key, p + 12, 12);
            return 12;
        }
        if (n >= ihl + 4) {
            memcpy(key, p + 12, 8);
            memcpy(key + 8, p + ihl, 4);
            return 12;
        }
    } else if (v == 6 && n >= 44 && (p[6] == IPPROTO_TCP_ || p[6] == IPPROTO_UDP_)) {
        memcpy(key, p + 8, 36);
        return 36;
    }
    return 0;
}

#endif
