/* Outbound batch kernel: TUN super-packets -> segments -> padding -> nonce -> sealed GSO run.
 *
 * The same function as shardwg/datapath/seal_ref.py (read its docstring for the contract); the
 * differential tests hold the two to identical bytes, counters and counts. One call fills one
 * UDP_SEGMENT run for one endpoint; Python sends it and calls again where it stopped.
 *
 * Nonce safety: no datagram is sealed with a counter >= limit (the published reservation);
 * the call returns LIMIT there. Each Sealer owns one EVP context keyed once, at session
 * creation; per datagram only the nonce is set. Plaintext is built in place in `out` and
 * encrypted in place, so no scratch copy is made.
 */
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#include "csum.h"
#include "native.h"

#define VNET_HDR 10
#define F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define GSO_ECN 0x80
#define K_NONE 0
#define K_TCP 6
#define K_UDP 17
#define OVERHEAD 32 /* transport header + tag */
#define ST_OK 0
#define ST_LIMIT 1
#define DROP_BAD_SIZE 2
#define DROP_BAD_INNER 14
#define MALFORMED (-1 - DROP_BAD_INNER)
#define TOO_BIG (-1 - DROP_BAD_SIZE)

typedef struct {
    PyObject_HEAD EVP_CIPHER_CTX *ctx;
} Sealer;

static int sealer_init(Sealer *self, PyObject *args, PyObject *kw) {
    Py_buffer key;
    static char *kwlist[] = {"key", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*", kwlist, &key)) return -1;
    if (self->ctx != NULL) { /* re-keying an existing object is refused: one key per session */
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "a Sealer is keyed once");
        return -1;
    }
    int ok = key.len == 32;
    if (ok) self->ctx = EVP_CIPHER_CTX_new();
    if (ok) ok = self->ctx != NULL &&
                 EVP_EncryptInit_ex(self->ctx, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "a send key is 32 bytes (or OpenSSL refused it)");
        return -1;
    }
    return 0;
}

static void sealer_dealloc(Sealer *self) {
    if (self->ctx != NULL) EVP_CIPHER_CTX_free(self->ctx); /* cleanses the key schedule */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shardwg.datapath._native.Sealer",
    .tp_basicsize = sizeof(Sealer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One session's send key in an OpenSSL ChaCha20-Poly1305 context.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sealer_init,
    .tp_dealloc = (destructor)sealer_dealloc,
};

/* How to cut one packet (seal_ref._Plan). */
typedef struct {
    int kind, v4;
    Py_ssize_t start, length, cs, at, hl, mss, count;
    uint64_t ip_fixed, l4_fixed;
    uint32_t ident, seq0, offbyte, flags;
} Plan;

static int v6_transport(const uint8_t *ip, Py_ssize_t length, Py_ssize_t *off_out) {
    int nh = ip[6];
    Py_ssize_t off = 40;
    for (int k = 0; k < 8; k++) {
        if (nh != 0 && nh != 60) break;
        if (off + 2 > length) return -1;
        nh = ip[off];
        off += ((Py_ssize_t)ip[off + 1] + 1) * 8;
    }
    *off_out = off;
    return nh;
}

/* Validate p[:n] and fill pl; 0 or MALFORMED (same rules, same order of outcome as the
 * reference: every refusal is MALFORMED, so only the verdict has to agree). */
static int plan(const uint8_t *p, Py_ssize_t n, Py_ssize_t cap, int vnet, Plan *pl) {
    memset(pl, 0, sizeof *pl);
    pl->at = -1;
    if (!vnet) {
        if (n < 20 || n > cap) return MALFORMED;
        pl->kind = K_NONE, pl->start = 0, pl->length = n, pl->count = 1;
        return 0;
    }
    if (n < VNET_HDR + 20 || n > cap) return MALFORMED;
    unsigned flags = p[0], gso = p[1];
    Py_ssize_t hdr_len = p[2] | p[3] << 8, gso_size = p[4] | p[5] << 8;
    Py_ssize_t cs = p[6] | p[7] << 8, co = p[8] | p[9] << 8;
    Py_ssize_t length = n - VNET_HDR;
    const uint8_t *ip = p + VNET_HDR;
    pl->start = VNET_HDR, pl->length = length;
    if (gso == GSO_NONE) {
        pl->kind = K_NONE, pl->count = 1;
        if (flags & F_NEEDS_CSUM) {
            if (cs + co + 2 > length) return MALFORMED;
            pl->cs = cs, pl->at = cs + co;
        }
        return 0;
    }
    int proto;
    unsigned base = gso & 0x7F;
    if (gso == GSO_TCPV4 || gso == (GSO_TCPV4 | GSO_ECN) || gso == GSO_TCPV6 ||
        gso == (GSO_TCPV6 | GSO_ECN))
        proto = K_TCP;
    else if (gso == GSO_UDP_L4)
        proto = K_UDP;
    else
        return MALFORMED;
    int tcp = proto == K_TCP, version = ip[0] >> 4;
    uint64_t addrs;
    if (version == 4) {
        Py_ssize_t ihl = (ip[0] & 15) * 4;
        if (base == GSO_TCPV6 || ihl < 20 || cs != ihl || ip[9] != proto) return MALFORMED;
        if ((Py_ssize_t)rd16(ip + 2) != length || (rd16(ip + 6) & 0x3FFF)) return MALFORMED;
        addrs = csum_words(ip + 12, 8);
    } else if (version == 6) {
        if (base == GSO_TCPV4 || length < 40) return MALFORMED;
        if ((Py_ssize_t)rd16(ip + 4) != length - 40) return MALFORMED;
        Py_ssize_t off = -1;
        if (v6_transport(ip, length, &off) != proto || off != cs) return MALFORMED;
        addrs = csum_words(ip + 8, 32);
    } else {
        return MALFORMED;
    }
    if (cs + (tcp ? 20 : 8) > length) return MALFORMED;
    Py_ssize_t thl = tcp ? (ip[cs + 12] >> 4) * 4 : 8, hl = cs + thl;
    if ((tcp && thl < 20) || hl >= length || hdr_len > length) return MALFORMED;
    if ((flags & F_NEEDS_CSUM) && co != (tcp ? 16 : 6)) return MALFORMED;
    if (gso_size == 0) return MALFORMED;
    pl->kind = proto, pl->v4 = version == 4, pl->cs = cs, pl->hl = hl, pl->mss = gso_size;
    pl->count = (length - hl + gso_size - 1) / gso_size;
    if (pl->v4) {
        pl->ident = rd16(ip + 4);
        /* the header's words but total length, ID and checksum (patched per segment) */
        pl->ip_fixed = csum_words(ip, (size_t)cs) + 3 * 0xFFFFull - rd16(ip + 2) - rd16(ip + 4) -
                       rd16(ip + 10);
    }
    const uint8_t *th = ip + cs;
    if (tcp) {
        pl->seq0 = rd32(th + 4);
        pl->offbyte = (uint32_t)th[12] << 8;
        pl->flags = th[13];
        pl->l4_fixed = csum_words(th, (size_t)thl) + 4 * 0xFFFFull - rd16(th + 4) - rd16(th + 6) -
                       rd16(th + 12) - rd16(th + 16) + addrs + K_TCP;
    } else {
        pl->l4_fixed = rd16(th) + rd16(th + 2) + addrs + K_UDP;
    }
    return 0;
}

static inline Py_ssize_t seg_length(const Plan *pl, Py_ssize_t i) {
    if (pl->kind == K_NONE) return pl->length;
    Py_ssize_t left = pl->length - pl->hl - i * pl->mss;
    return pl->hl + (left < pl->mss ? left : pl->mss);
}

/* Segment i of the packet p into out (room for its length); headers fixed, sums complete. */
static void write_segment(const Plan *pl, const uint8_t *p, Py_ssize_t i, uint8_t *out) {
    if (pl->kind == K_NONE) {
        memcpy(out, p + pl->start, (size_t)pl->length);
        if (pl->at >= 0) wr16(out + pl->at, csum_finish(csum_data(out + pl->cs,
                                                                   (size_t)(pl->length - pl->cs))));
        return;
    }
    Py_ssize_t hl = pl->hl, cs = pl->cs, total = seg_length(pl, i);
    const uint8_t *ip = p + VNET_HDR;
    memcpy(out, ip, (size_t)hl);
    memcpy(out + hl, ip + hl + i * pl->mss, (size_t)(total - hl));
    uint64_t data = csum_data(out + hl, (size_t)(total - hl));
    if (pl->v4) {
        uint32_t ident = (pl->ident + (uint32_t)i) & 0xFFFF;
        wr16(out + 2, (uint32_t)total);
        wr16(out + 4, ident);
        wr16(out + 10, csum_finish(pl->ip_fixed + (uint64_t)total + ident));
    } else {
        wr16(out + 4, (uint32_t)(total - 40));
    }
    uint8_t *th = out + cs;
    if (pl->kind == K_TCP) {
        uint32_t fl = pl->flags;
        if (i > 0) fl &= ~0x80u;                  /* CWR: first segment only */
        if (i < pl->count - 1) fl &= ~0x09u;      /* FIN, PSH: last segment only */
        uint32_t seq = pl->seq0 + (uint32_t)((uint64_t)i * (uint64_t)pl->mss);
        wr32(th + 4, seq);
        th[13] = (uint8_t)fl;
        wr16(th + 16, csum_finish(pl->l4_fixed + (uint64_t)(total - cs) + (seq >> 16) +
                                  (seq & 0xFFFF) + (pl->offbyte | fl) + data));
    } else {
        uint32_t ulen = (uint32_t)(total - cs);
        wr16(th + 4, ulen);
        wr16(th + 6, csum_finish(pl->l4_fixed + 2ull * ulen + data));
    }
}

static inline Py_ssize_t padded_length(Py_ssize_t length, Py_ssize_t mtu) {
    Py_ssize_t padded = (length + 15) & ~(Py_ssize_t)15;
    if (padded > mtu) padded = length > mtu ? length : mtu;
    return padded;
}

static int seal_one(EVP_CIPHER_CTX *ctx, uint8_t *dg, Py_ssize_t padded, uint32_t remote,
                    uint64_t counter) {
    uint8_t nonce[12] = {0};
    dg[0] = 4, dg[1] = dg[2] = dg[3] = 0;
    for (int k = 0; k < 4; k++) dg[4 + k] = (uint8_t)(remote >> (8 * k));
    for (int k = 0; k < 8; k++) dg[8 + k] = nonce[4 + k] = (uint8_t)(counter >> (8 * k));
    int len = 0, fin = 0;
    uint8_t *body = dg + 16;
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(ctx, body, &len, body, (int)padded) != 1 ||
        EVP_EncryptFinal_ex(ctx, body + len, &fin) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, body + padded) != 1)
        return -1;
    return 0;
}

static PyObject *seal_run(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *sealer, *bufs, *sizes, *o_remote, *o_counter, *o_limit;
    Py_ssize_t pos, seg, end, mtu, max_count, max_bytes;
    int vnet;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "OOOnnnpnOOOw*nn", &sealer, &bufs, &sizes, &pos, &seg, &end,
                          &vnet, &mtu, &o_remote, &o_counter, &o_limit, &out, &max_count,
                          &max_bytes))
        return NULL;
    PyObject *result = NULL;
    /* Out of range is an error, never a silent wrap (a wrapped counter is a reused nonce). */
    unsigned long remote = PyLong_AsUnsignedLong(o_remote);
    unsigned long long counter = PyLong_AsUnsignedLongLong(o_counter);
    unsigned long long limit = PyLong_AsUnsignedLongLong(o_limit);
    if (PyErr_Occurred() || remote > 0xFFFFFFFFul) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "remote index, counter or limit out of range");
        PyBuffer_Release(&out);
        return NULL;
    }
    EVP_CIPHER_CTX *ctx = NULL;
    Py_buffer pkt = {0};
    int have = 0; /* pkt holds the buffer of bufs[pos] */
    if (sealer != Py_None) {
        if (!PyObject_TypeCheck(sealer, &SealerType)) {
            PyErr_SetString(PyExc_TypeError, "sealer must be a _native.Sealer or None");
            goto done;
        }
        ctx = ((Sealer *)sealer)->ctx;
        if (ctx == NULL) {
            PyErr_SetString(PyExc_ValueError, "sealer has no key");
            goto done;
        }
    }
    Py_ssize_t nb = PySequence_Size(bufs), ns = PySequence_Size(sizes);
    if (nb < 0 || ns < 0) goto done;
    if (pos < 0 || pos > end || end > nb || end > ns || seg < 0 || mtu < 0 || max_count < 1) {
        PyErr_SetString(PyExc_ValueError, "bad batch bounds");
        goto done;
    }
    uint8_t *dst = out.buf;
    Py_ssize_t cap = out.len, count = 0, size = 0, used = 0;
    if (max_bytes > cap) max_bytes = cap;
    int closed = 0, status = ST_OK;
    Plan pl;
    while (pos < end) {
        if (!have) {
            PyObject *b = PySequence_GetItem(bufs, pos), *s = PySequence_GetItem(sizes, pos);
            Py_ssize_t n = s != NULL ? PyLong_AsSsize_t(s) : -1;
            Py_XDECREF(s);
            if (b == NULL || (n == -1 && PyErr_Occurred()) ||
                PyObject_GetBuffer(b, &pkt, PyBUF_SIMPLE) < 0) {
                Py_XDECREF(b);
                goto done;
            }
            Py_DECREF(b);
            have = 1;
            int verdict = plan(pkt.buf, n, pkt.len, vnet, &pl);
            if (verdict < 0) {
                PyBuffer_Release(&pkt);
                have = 0;
                if (count) break;
                status = verdict, pos++, seg = 0;
                break;
            }
            if (seg >= pl.count) {
                PyBuffer_Release(&pkt);
                have = 0, pos++, seg = 0;
                continue;
            }
        }
        Py_ssize_t seglen = seg_length(&pl, seg), padded = 0, dlen;
        if (ctx == NULL) {
            dlen = seglen;
        } else {
            padded = padded_length(seglen, mtu);
            dlen = OVERHEAD + padded;
        }
        if (count && (count >= max_count || closed || dlen > size || used + dlen > max_bytes))
            break;
        if (!count && dlen > cap) {
            status = TOO_BIG, pos++, seg = 0;
            break;
        }
        if (ctx == NULL) {
            write_segment(&pl, pkt.buf, seg, dst + used);
        } else {
            if (counter >= limit) {
                status = ST_LIMIT;
                break;
            }
            write_segment(&pl, pkt.buf, seg, dst + used + 16);
            memset(dst + used + 16 + seglen, 0, (size_t)(padded - seglen));
            if (seal_one(ctx, dst + used, padded, (uint32_t)remote, counter) < 0) {
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused to seal");
                goto done;
            }
            counter++;
        }
        if (!count)
            size = dlen;
        else if (dlen < size)
            closed = 1;
        count++, used += dlen, seg++;
        if (seg >= pl.count) {
            PyBuffer_Release(&pkt);
            have = 0, pos++, seg = 0;
        }
    }
    if (status < 0) count = size = used = 0;
    result = Py_BuildValue("(innKnnn)", status, pos, seg, counter, count, size, used);
done:
    if (have) PyBuffer_Release(&pkt);
    PyBuffer_Release(&out);
    return result;
}

/* Sealer(key): exposed as a function of the methods table (module.c only collects tables);
 * the type is readied on first use. */
static PyObject *new_sealer(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    if (!(SealerType.tp_flags & Py_TPFLAGS_READY) && PyType_Ready(&SealerType) < 0) return NULL;
    return PyObject_Call((PyObject *)&SealerType, args, kw);
}

PyMethodDef shardwg_seal_methods[] = {
    {"Sealer", (PyCFunction)(void (*)(void))new_sealer, METH_VARARGS | METH_KEYWORDS,
     "Sealer(key): one session's send key in an OpenSSL ChaCha20-Poly1305 context."},
    {"seal_run", seal_run, METH_VARARGS,
     "seal_run(sealer, bufs, sizes, pos, seg, end, vnet, mtu, remote_index, counter, limit, "
     "out, max_count, max_bytes) -> (status, pos, seg, counter, count, size, used); "
     "see shardwg/datapath/seal_ref.py."},
    {NULL, NULL, 0, NULL},
};
