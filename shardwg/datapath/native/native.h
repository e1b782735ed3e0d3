/* Declarations shared by the native kernel's files. */
#ifndef SHARDWG_NATIVE_H
#define SHARDWG_NATIVE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

extern PyMethodDef shardwg_open_methods[]; /* open.c */
extern PyMethodDef shardwg_seal_methods[]; /* seal.c */
const char *shardwg_openssl_version(void); /* open.c */

#endif
