"""The per-packet batch data path: a native kernel (C, OpenSSL) beside its pure-Python reference.

Both implement the same functions over the same state buffers; the reference is what the
differential tests hold the native code to, and what runs when the extension is missing or
SHARDWG_NATIVE=0.
"""
