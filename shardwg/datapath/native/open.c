/* Inbound batch kernel: one call opens a whole receive batch (shardwg/datapath/open_ref.py
 * is the reference it must match byte for byte; openstate.py documents the buffers).
 *
 * 1. classify each datagram by (type, length); handshake messages go back to Python as
 *    (message, offset, length) rows, untouched (with `forward`, so do transport datagrams
 *    under an index we do not know: they may belong to a peer that moved to another worker);
 * 2. transport: session by receiver index (probe table), key age, replay pre-check,
 *    ChaCha20-Poly1305 (one EVP context per session, made when the session is) into `dec`,
 *    replay window update after the tag verified;
 * 3. inner IPv4/IPv6 header and length, allowed-IPs source (flattened ranges), TCP/UDP
 *    checksum;
 * 4. coalesce into TUN super-packets (open_coalesce.h) laid out back to back in `out`.
 * Every drop is counted by its DropReason. The process is single-threaded: no locks, and
 * the scratch arrays are module-level and grow as needed.
 */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#include "native.h"
#include "open_coalesce.h"

/* must match openstate.py (tests/test_datapath_open.py checks) */
#define SESSION_SIZE 1088
#define S_PEER 4
#define S_CREATED 8
#define S_TOUCH 16
#define S_REPLAY 32
#define HASH_MUL 0x9E3779B1u
#define C_RX_PACKETS 0
#define C_RX_BYTES 1
#define C_TRANSPORT 2
#define C_MERGED 3
#define C_DROPS 4
#define TOUCH_WORDS 5
/* DropReason codes (proto/constants.py) */
enum {
    D_TOO_SHORT = 0, D_BAD_TYPE = 1, D_BAD_SIZE = 2, D_INITIATION_FLOOD = 9, D_UNKNOWN_INDEX = 10, D_DECRYPT = 11,
    D_REPLAYED = 12, D_KEY_EXPIRED = 13, D_BAD_INNER = 14, D_NOT_ALLOWED = 15,
    D_INTERNAL = 24, D_BAD_CSUM = 27, D_LAST = 27
};
#define REJECT_AFTER_TIME 180.0
#define REPLAY_LIMIT 0xFFFFFFFFFFFFDFFFull /* 2**64 - 2**13 - 1 */
#define REPLAY_WINDOW 8128u
#define VNET_HDR_LEN 10

const char *shardwg_openssl_version(void) { return OpenSSL_version(OPENSSL_VERSION); }

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void add64(uint8_t *base, size_t word, uint64_t n) {
    st64(base + 8 * word, ld64(base + 8 * word) + n);
}

/* ------------------------------------------------------------------ keys (EVP contexts) */
typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX **ctx;
    Py_ssize_t cap;
} OpenKeys;

static void keys_dealloc(OpenKeys *self) {
    for (Py_ssize_t i = 0; i < self->cap; i++) EVP_CIPHER_CTX_free(self->ctx[i]);
    PyMem_Free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *keys_set(OpenKeys *self, PyObject *args) {
    Py_ssize_t slot;
    Py_buffer key;
    if (!PyArg_ParseTuple(args, "ny*", &slot, &key)) return NULL;
    if (slot < 0 || slot > (1 << 24) || key.len != 32) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "OpenKeys.set: bad slot or key size");
        return NULL;
    }
    if (slot >= self->cap) {
        Py_ssize_t cap = self->cap ? self->cap : 16;
        while (cap <= slot) cap *= 2;
        EVP_CIPHER_CTX **grown = PyMem_Realloc(self->ctx, (size_t)cap * sizeof(*grown));
        if (grown == NULL) {
            PyBuffer_Release(&key);
            return PyErr_NoMemory();
        }
        memset(grown + self->cap, 0, (size_t)(cap - self->cap) * sizeof(*grown));
        self->ctx = grown, self->cap = cap;
    }
    if (self->ctx[slot] == NULL) self->ctx[slot] = EVP_CIPHER_CTX_new();
    int ok = self->ctx[slot] != NULL &&
             EVP_DecryptInit_ex(self->ctx[slot], EVP_chacha20_poly1305(), NULL, key.buf, NULL);
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the ChaCha20-Poly1305 key");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *keys_clear(OpenKeys *self, PyObject *args) {
    Py_ssize_t slot;
    if (!PyArg_ParseTuple(args, "n", &slot)) return NULL;
    if (slot >= 0 && slot < self->cap && self->ctx[slot] != NULL) {
        EVP_CIPHER_CTX_free(self->ctx[slot]); /* wipes the key schedule */
        self->ctx[slot] = NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef keys_methods[] = {
    {"set", (PyCFunction)keys_set, METH_VARARGS, "set(slot, key): the session's cipher context"},
    {"clear", (PyCFunction)keys_clear, METH_VARARGS, "clear(slot): free the context"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject OpenKeysType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shardwg.datapath._native.OpenKeys",
    .tp_basicsize = sizeof(OpenKeys),
    .tp_dealloc = (destructor)keys_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One ChaCha20-Poly1305 decryption context per session slot.",
    .tp_methods = keys_methods,
    .tp_new = PyType_GenericNew,
};

static PyObject *open_keys_new(PyObject *mod, PyObject *noargs) {
    (void)mod, (void)noargs;
    if (PyType_Ready(&OpenKeysType) < 0) return NULL;
    return PyType_GenericNew(&OpenKeysType, NULL, NULL);
}

/* ------------------------------------------------------------------ replay (proto/replay.py) */
static int replay_check(const uint8_t *w, uint64_t c) {
    uint64_t last = ld64(w);
    if (c > last) return c < REPLAY_LIMIT;
    if (last - c > REPLAY_WINDOW) return 0;
    return !((w[8 + ((c >> 3) & 1023)] >> (c & 7)) & 1);
}

static int replay_accept(uint8_t *w, uint64_t c) {
    if (c >= REPLAY_LIMIT) return 0;
    uint64_t last = ld64(w);
    uint8_t *ring = w + 8;
    if (c > last) {
        uint64_t cur = last >> 6, diff = (c >> 6) - cur;
        if (diff > 128) diff = 128;
        for (uint64_t i = cur + 1; i <= cur + diff; i++) memset(ring + (i & 127) * 8, 0, 8);
        st64(w, c);
    } else if (last - c > REPLAY_WINDOW) {
        return 0;
    }
    uint8_t *b = ring + ((c >> 3) & 1023), bit = (uint8_t)(1u << (c & 7));
    if (*b & bit) return 0;
    *b |= bit;
    return 1;
}

static int aead_open(EVP_CIPHER_CTX *ctx, uint64_t counter, const uint8_t *ct, size_t plen,
                     uint8_t *out) {
    uint8_t nonce[12] = {0};
    int outl;
    for (int i = 0; i < 8; i++) nonce[4 + i] = (uint8_t)(counter >> (8 * i));
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1) return 0;
    if (plen && EVP_DecryptUpdate(ctx, out, &outl, ct, (int)plen) != 1) return 0;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, (void *)(ct + plen)) != 1) return 0;
    return EVP_DecryptFinal_ex(ctx, out + plen, &outl) == 1;
}

/* ------------------------------------------------------------------ lookups */
/* log2 of the probe table's entries, once per call; -1 if it is not a power of two >= 2
 * (then every lookup misses). */
static int index_bits(size_t len) {
    size_t size = len / 8;
    if (size < 2 || (size & (size - 1))) return -1;
    int bits = 0;
    while (((size_t)1 << bits) < size) bits++;
    return bits;
}

static long index_lookup(const uint8_t *tab, int bits, uint32_t receiver) {
    if (bits < 0) return -1;
    size_t size = (size_t)1 << bits;
    size_t h = (uint32_t)(receiver * HASH_MUL) >> (32 - bits);
    for (size_t i = 0; i < size; i++) {
        uint32_t idx = ld32(tab + h * 8), slot1 = ld32(tab + h * 8 + 4);
        if (!slot1) return -1;
        if (idx == receiver) return (long)slot1 - 1;
        h = (h + 1) & (size - 1);
    }
    return -1;
}

typedef struct {
    const uint8_t *s4, *i4, *hi, *lo, *i6;
    uint32_t n4, n6;
} ranges_t;

static int ranges_init(ranges_t *r, const uint8_t *buf, size_t len) {
    if (len < 8) return 0;
    r->n4 = ld32(buf), r->n6 = ld32(buf + 4);
    size_t v6 = (8 + 8 * (size_t)r->n4 + 7) / 8 * 8;
    if (8 + 8 * (size_t)r->n4 > len || v6 + 20 * (size_t)r->n6 > len) return 0;
    r->s4 = buf + 8, r->i4 = buf + 8 + 4 * (size_t)r->n4;
    r->hi = buf + v6, r->lo = buf + v6 + 8 * (size_t)r->n6, r->i6 = buf + v6 + 16 * (size_t)r->n6;
    return 1;
}

static uint32_t ranges_v4(const ranges_t *r, uint32_t a) {
    size_t lo = 0, hi = r->n4; /* first start above a */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ld32(r->s4 + 4 * mid) <= a) lo = mid + 1; else hi = mid;
    }
    return lo ? ld32(r->i4 + 4 * (lo - 1)) : 0;
}

static uint32_t ranges_v6(const ranges_t *r, uint64_t ah, uint64_t al) {
    size_t lo = 0, hi = r->n6;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        uint64_t h = ld64(r->hi + 8 * mid);
        if (h < ah || (h == ah && ld64(r->lo + 8 * mid) <= al)) lo = mid + 1; else hi = mid;
    }
    return lo ? ld32(r->i6 + 4 * (lo - 1)) : 0;
}

/* open_ref._csum_ok */
static int csum_ok(const uint8_t *p, uint32_t total) {
    uint32_t ihl;
    uint8_t proto;
    const uint8_t *addrs;
    size_t alen;
    if (p[0] >> 4 == 4) {
        ihl = (uint32_t)(p[0] & 15) * 4, proto = p[9];
        if (ihl < 20 || rd16(p + 6) & 0x3FFF) return 1;
        addrs = p + 12, alen = 8;
    } else {
        ihl = 40, proto = p[6], addrs = p + 8, alen = 32;
    }
    if (proto == IPPROTO_TCP_) {
        if (total < ihl + 20) return 1;
    } else if (proto == IPPROTO_UDP_) {
        if (total < ihl + 8 || (ihl != 40 && !p[ihl + 6] && !p[ihl + 7])) return 1;
    } else {
        return 1;
    }
    uint64_t s = csum_data(addrs, alen) + proto + (total - ihl) + csum_data(p + ihl, total - ihl);
    return s % 0xFFFF == 0;
}

/* ------------------------------------------------------------------ scratch (grows) */
typedef struct { uint32_t off, n; } pkt_t;
typedef struct {
    uint8_t sig[64];
    uint32_t head, last, total, hl, iph, mss, nseg, next_seq;
    uint8_t slen, closed, psh, proto, v6;
} group_t;
typedef struct { uint8_t key[36]; uint8_t klen; int32_t gid; } slot_t;

static pkt_t *g_pkts;
static int32_t *g_next, *g_items;
static group_t *g_groups;
static slot_t *g_table;
static size_t g_cap, g_tcap;

static int scratch(size_t n) {
    if (n > g_cap) {
        size_t cap = g_cap ? g_cap : 256;
        while (cap < n) cap *= 2;
        void *a = PyMem_Realloc(g_pkts, cap * sizeof(pkt_t));
        if (a) g_pkts = a;
        void *b = PyMem_Realloc(g_next, cap * sizeof(int32_t));
        if (b) g_next = b;
        void *c = PyMem_Realloc(g_items, cap * sizeof(int32_t));
        if (c) g_items = c;
        void *d = PyMem_Realloc(g_groups, cap * sizeof(group_t));
        if (d) g_groups = d;
        void *e = PyMem_Realloc(g_table, 2 * cap * sizeof(slot_t));
        if (e) g_table = e;
        if (!a || !b || !c || !d || !e) return 0;
        g_cap = cap, g_tcap = 2 * cap;
    }
    return 1;
}

static slot_t *table_find(const uint8_t *key, uint8_t klen, size_t tcap) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < klen; i++) h = (h ^ key[i]) * 16777619u;
    size_t at = h & (tcap - 1);
    for (;;) {
        slot_t *s = &g_table[at];
        if (s->klen == 0 || (s->klen == klen && memcmp(s->key, key, klen) == 0)) return s;
        at = (at + 1) & (tcap - 1);
    }
}

/* Group the packets (coalesce.py's loop), then write every output back to back. */
static size_t coalesce(uint8_t *dec, size_t npk, int udp, uint8_t *out, uint8_t *spans,
                       size_t max_spans, uint64_t *merged) {
    size_t tcap = 16;
    while (tcap < 2 * npk) tcap *= 2;
    memset(g_table, 0, tcap * sizeof(slot_t));
    size_t nitems = 0, ngroups = 0, used = 0;
    cand_t c;
    for (size_t i = 0; i < npk; i++) {
        const uint8_t *p = dec + g_pkts[i].off;
        uint32_t n = g_pkts[i].n;
        g_next[i] = -1;
        if (!co_candidate(p, n, udp, &c)) {
            uint8_t key[36];
            int klen = co_flow_key(p, n, key);
            if (klen) {
                slot_t *s = table_find(key, (uint8_t)klen, tcap);
                if (s->klen) s->gid = -1;
            }
            g_items[nitems++] = -(int32_t)i - 1;
            continue;
        }
        uint32_t plen = n - c.hl;
        slot_t *s = table_find(c.key, c.klen, tcap);
        if (s->klen && s->gid >= 0) {
            group_t *g = &g_groups[s->gid];
            int mismatch = g->closed || c.seq != g->next_seq || plen > g->mss ||
                           g->slen != c.slen || memcmp(g->sig, c.sig, c.slen) != 0 ||
                           g->proto != c.proto || g->nseg >= CO_MAX_SEGMENTS ||
                           g->total + plen > CO_MAX_SIZE;
            if (!mismatch && g->nseg == 1 && used >= CO_MAX_ARENAS) mismatch = 1;
            if (!mismatch) {
                if (g->nseg == 1) used++;
                g_next[g->last] = (int32_t)i;
                g->last = (uint32_t)i;
                g->total += plen;
                g->nseg++;
                g->next_seq = c.proto == IPPROTO_TCP_ ? c.seq + plen : 0;
                if ((c.flags & CO_PSH) || plen < g->mss) {
                    g->closed = 1;
                    g->psh = (c.flags & CO_PSH) != 0;
                }
                continue;
            }
        }
        group_t *g = &g_groups[ngroups];
        memcpy(g->sig, c.sig, c.slen);
        g->slen = c.slen, g->head = g->last = (uint32_t)i, g->total = n, g->hl = c.hl;
        g->iph = c.iph, g->mss = plen, g->nseg = 1;
        g->next_seq = c.proto == IPPROTO_TCP_ ? c.seq + plen : 0;
        g->closed = (c.flags & CO_PSH) != 0, g->psh = 0, g->proto = c.proto, g->v6 = c.v6;
        if (!s->klen) memcpy(s->key, c.key, c.klen), s->klen = c.klen;
        s->gid = (int32_t)ngroups;
        g_items[nitems++] = (int32_t)ngroups++;
    }
    size_t at = 0, nw = 0;
    for (size_t k = 0; k < nitems && nw < max_spans; k++) {
        int32_t item = g_items[k];
        uint8_t *w = out + at;
        size_t len;
        const group_t *g = item >= 0 ? &g_groups[item] : NULL;
        if (g == NULL || g->nseg < 2) {
            const pkt_t *pk = &g_pkts[g ? g->head : (uint32_t)(-item - 1)];
            memset(w, 0, VNET_HDR_LEN);
            memcpy(w + VNET_HDR_LEN, dec + pk->off, pk->n);
            len = VNET_HDR_LEN + pk->n;
        } else {
            *merged += g->nseg;
            uint8_t *ip = w + VNET_HDR_LEN;
            const pkt_t *head = &g_pkts[g->head];
            memcpy(ip, dec + head->off, head->n);
            size_t fill = head->n;
            for (int32_t m = g_next[g->head]; m >= 0; m = g_next[m]) {
                memcpy(ip + fill, dec + g_pkts[m].off + g->hl, g_pkts[m].n - g->hl);
                fill += g_pkts[m].n - g->hl;
            }
            uint32_t total = g->total, iph = g->iph, csum_off;
            const uint8_t *addrs;
            size_t alen;
            if (g->v6) {
                wr16(ip + 4, total - 40);
                addrs = ip + 8, alen = 32;
            } else {
                wr16(ip + 2, total);
                wr16(ip + 10, 0);
                wr16(ip + 10, csum_finish(csum_data(ip, 20)));
                addrs = ip + 12, alen = 8;
            }
            uint8_t *t = ip + iph, gso;
            if (g->proto == IPPROTO_TCP_) {
                if (g->psh) t[13] |= CO_PSH;
                gso = g->v6 ? 4 : 1;
                csum_off = 16;
            } else {
                wr16(t + 4, total - iph);
                gso = 5;
                csum_off = 6;
            }
            uint64_t r = (csum_data(addrs, alen) + g->proto + (total - iph)) % 0xFFFF;
            wr16(t + csum_off, r ? (uint32_t)r : 0xFFFF);
            uint16_t hdr[4] = {(uint16_t)g->hl, (uint16_t)g->mss, (uint16_t)iph, (uint16_t)csum_off};
            w[0] = 1, w[1] = gso; /* NEEDS_CSUM; little-endian fields follow */
            for (int f = 0; f < 4; f++) w[2 + 2 * f] = (uint8_t)hdr[f], w[3 + 2 * f] = (uint8_t)(hdr[f] >> 8);
            len = VNET_HDR_LEN + total;
        }
        st32(spans + 8 * nw, (uint32_t)at);
        st32(spans + 8 * nw + 4, (uint32_t)len);
        nw++;
        at += len;
    }
    return nw;
}

/* ------------------------------------------------------------------ open_batch */
typedef struct {
    Py_buffer sessions, index, allowed, data, dec, out, spans, touched, hs, counters;
} bufs_t;

#define DROP(r) add64(cnt, C_DROPS + (r), 1)

static PyObject *open_batch(PyObject *mod, PyObject *args) {
    (void)mod;
    OpenKeys *keys;
    PyObject *lengths, *segs;
    Py_ssize_t stride, count;
    double now;
    int udp, fwd;
    bufs_t b;
    memset(&b, 0, sizeof(b));
    if (PyType_Ready(&OpenKeysType) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "O!w*y*y*y*nO!O!nw*w*w*w*w*w*dpp", &OpenKeysType, &keys,
                          &b.sessions, &b.index, &b.allowed, &b.data, &stride, &PyList_Type,
                          &lengths, &PyList_Type, &segs, &count, &b.dec, &b.out, &b.spans,
                          &b.touched, &b.hs, &b.counters, &now, &udp, &fwd))
        return NULL;
    PyObject *result = NULL;
    ranges_t ranges;
    uint8_t *cnt = b.counters.buf, *sess = b.sessions.buf, *dec = b.dec.buf;
    const uint8_t *data = b.data.buf;
    size_t max_slot = (size_t)b.sessions.len / SESSION_SIZE;
    size_t max_rows = (size_t)b.touched.len / (8 * TOUCH_WORDS), max_hs = (size_t)b.hs.len / 12;
    size_t ntouched = 0, nhs = 0, npk = 0, pos = 0, nw = 0;
    int ibits = index_bits((size_t)b.index.len);
    if (count < 0 || count > PyList_GET_SIZE(lengths) || count > PyList_GET_SIZE(segs) ||
        stride < 0 || b.out.len < b.dec.len || b.counters.len < 8 * (C_DROPS + D_LAST + 1) ||
        !ranges_init(&ranges, b.allowed.buf, (size_t)b.allowed.len)) {
        PyErr_SetString(PyExc_ValueError, "open_batch: inconsistent buffers");
        goto done;
    }
    if (!scratch((size_t)b.data.len / 32 + 1)) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t m = 0; m < count; m++) {
        Py_ssize_t n = PyLong_AsSsize_t(PyList_GET_ITEM(lengths, m));
        Py_ssize_t seg = PyLong_AsSsize_t(PyList_GET_ITEM(segs, m));
        if (PyErr_Occurred()) goto done;
        if (n < 0) continue;
        size_t base = (size_t)m * (size_t)stride;
        if (base + (size_t)n > (size_t)b.data.len) {
            PyErr_SetString(PyExc_ValueError, "open_batch: message beyond the data buffer");
            goto done;
        }
        if (n == 0) {
            add64(cnt, C_RX_PACKETS, 1);
            DROP(D_TOO_SHORT);
            continue;
        }
        if (seg <= 0 || seg > n) seg = n;
        if (seg == 148 && n > seg) { /* a merged burst of initiation-sized datagrams */
            uint64_t k = ((uint64_t)n + 147) / 148;
            add64(cnt, C_RX_PACKETS, k);
            add64(cnt, C_RX_BYTES, (uint64_t)n);
            add64(cnt, C_DROPS + D_INITIATION_FLOOD, k);
            continue;
        }
        for (size_t off = 0; off < (size_t)n;) {
            size_t size = off + (size_t)seg <= (size_t)n ? (size_t)seg : (size_t)n - off;
            const uint8_t *dg = data + base + off;
            size_t at_in_msg = off;
            off += size;
            add64(cnt, C_RX_PACKETS, 1);
            add64(cnt, C_RX_BYTES, size);
            if (size < 4) {
                DROP(D_TOO_SHORT);
                continue;
            }
            uint32_t type = ld32(dg);
            if (type != 4) {
                size_t want = type == 1 ? 148 : type == 2 ? 92 : type == 3 ? 64 : 0;
                if (!want) {
                    DROP(D_BAD_TYPE);
                } else if (size != want) {
                    DROP(D_BAD_SIZE);
                } else if (nhs >= max_hs) {
                    DROP(D_INTERNAL);
                } else {
                    uint8_t *row = (uint8_t *)b.hs.buf + 12 * nhs++;
                    st32(row, (uint32_t)m), st32(row + 4, (uint32_t)at_in_msg), st32(row + 8, (uint32_t)size);
                }
                continue;
            }
            if (size < 32) {
                DROP(D_BAD_SIZE);
                continue;
            }
            add64(cnt, C_TRANSPORT, 1);
            uint64_t counter = ld64(dg + 8);
            long slot = index_lookup(b.index.buf, ibits, ld32(dg + 4));
            if (slot < 0) {
                if (fwd && nhs < max_hs) { /* maybe a peer that moved: Python forwards it */
                    uint8_t *row = (uint8_t *)b.hs.buf + 12 * nhs++;
                    st32(row, (uint32_t)m), st32(row + 4, (uint32_t)at_in_msg), st32(row + 8, (uint32_t)size);
                } else {
                    DROP(D_UNKNOWN_INDEX);
                }
                continue;
            }
            if ((size_t)slot >= max_slot || slot >= keys->cap || keys->ctx[slot] == NULL) {
                DROP(D_INTERNAL);
                continue;
            }
            uint8_t *s = sess + (size_t)slot * SESSION_SIZE;
            double created;
            memcpy(&created, s + S_CREATED, 8);
            if (now - created >= REJECT_AFTER_TIME) {
                DROP(D_KEY_EXPIRED);
                continue;
            }
            if (!replay_check(s + S_REPLAY, counter)) {
                DROP(D_REPLAYED);
                continue;
            }
            size_t plen = size - 32, start = pos + VNET_HDR_LEN;
            if (start + plen > (size_t)b.dec.len) {
                DROP(D_INTERNAL);
                continue;
            }
            if (!aead_open(keys->ctx[slot], counter, dg + 16, plen, dec + start)) {
                DROP(D_DECRYPT);
                continue;
            }
            if (!replay_accept(s + S_REPLAY, counter)) {
                DROP(D_REPLAYED);
                continue;
            }
            uint32_t row = ld32(s + S_TOUCH);
            uint8_t *r;
            if (row == 0) {
                if (ntouched >= max_rows) {
                    DROP(D_INTERNAL);
                    continue;
                }
                row = (uint32_t)++ntouched;
                st32(s + S_TOUCH, row);
                r = (uint8_t *)b.touched.buf + 8 * TOUCH_WORDS * (row - 1);
                memset(r, 0, 8 * TOUCH_WORDS);
                st64(r, (uint64_t)slot);
            }
            r = (uint8_t *)b.touched.buf + 8 * TOUCH_WORDS * (row - 1);
            st64(r + 8, (uint64_t)m);
            if (plen == 0) {
                add64(r, 2, size);
                add64(r, 4, 1);
                continue;
            }
            const uint8_t *p = dec + start;
            uint32_t total, pid;
            if (p[0] >> 4 == 4) {
                total = plen >= 20 ? rd16(p + 2) : 0;
                if (total < 20 || total > plen) {
                    DROP(D_BAD_INNER);
                    continue;
                }
                pid = ranges_v4(&ranges, rd32(p + 12));
            } else if (p[0] >> 4 == 6) {
                total = plen >= 40 ? 40u + rd16(p + 4) : (uint32_t)plen + 1;
                if (total > plen) {
                    DROP(D_BAD_INNER);
                    continue;
                }
                uint64_t ah = (uint64_t)rd32(p + 8) << 32 | rd32(p + 12);
                uint64_t al = (uint64_t)rd32(p + 16) << 32 | rd32(p + 20);
                pid = ranges_v6(&ranges, ah, al);
            } else {
                DROP(D_BAD_INNER);
                continue;
            }
            if (pid == 0 || pid != ld32(s + S_PEER)) {
                DROP(D_NOT_ALLOWED);
                continue;
            }
            if (!csum_ok(p, total)) {
                DROP(D_BAD_CSUM);
                continue;
            }
            add64(r, 2, size);
            add64(r, 3, 1);
            add64(r, 4, 1);
            g_pkts[npk].off = (uint32_t)start, g_pkts[npk].n = total;
            npk++;
            pos = (start + plen + 7) & ~(size_t)7;
        }
    }
    if (npk) {
        uint64_t merged = 0;
        nw = coalesce(dec, npk, udp, b.out.buf, b.spans.buf, (size_t)b.spans.len / 8, &merged);
        add64(cnt, C_MERGED, merged);
    }
    result = Py_BuildValue("nnn", (Py_ssize_t)nw, (Py_ssize_t)ntouched, (Py_ssize_t)nhs);
done:
    for (size_t k = 0; k < ntouched; k++) {
        size_t slot = (size_t)ld64((uint8_t *)b.touched.buf + 8 * TOUCH_WORDS * k);
        st32(sess + slot * SESSION_SIZE + S_TOUCH, 0);
    }
    Py_buffer *all[] = {&b.sessions, &b.index, &b.allowed, &b.data, &b.dec,
                        &b.out, &b.spans, &b.touched, &b.hs, &b.counters};
    for (size_t k = 0; k < sizeof(all) / sizeof(all[0]); k++)
        if (all[k]->obj != NULL) PyBuffer_Release(all[k]);
    return result;
}

static PyObject *open_abi(PyObject *mod, PyObject *noargs) {
    (void)mod, (void)noargs;
    return Py_BuildValue("{sisisisisisisisisisi}", "SESSION_SIZE", SESSION_SIZE, "S_PEER", S_PEER,
                         "S_CREATED", S_CREATED, "S_TOUCH", S_TOUCH, "S_REPLAY", S_REPLAY,
                         "C_DROPS", C_DROPS, "C_MERGED", C_MERGED, "TOUCH_WORDS", TOUCH_WORDS,
                         "BAD_INNER_CHECKSUM", D_BAD_CSUM, "INTERNAL_ERROR", D_INTERNAL);
}

PyMethodDef shardwg_open_methods[] = {
    {"open_batch", open_batch, METH_VARARGS,
     "open_batch(keys, sessions, index, allowed, data, stride, lengths, segs, count, dec, out,"
     " spans, touched, handshakes, counters, now, udp, forward) -> (writes, touched, handshakes)"},
    {"OpenKeys", open_keys_new, METH_NOARGS, "A new, empty set of per-session cipher contexts."},
    {"open_abi", open_abi, METH_NOARGS, "The buffer layout constants open.c was built with."},
    {NULL, NULL, 0, NULL},
};
