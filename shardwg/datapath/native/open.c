/* Inbound batch kernel (placeholder until the open path lands). */
#include <openssl/crypto.h>

#include "native.h"

const char *shardwg_openssl_version(void) { return OpenSSL_version(OPENSSL_VERSION); }

PyMethodDef shardwg_open_methods[] = {{NULL, NULL, 0, NULL}};
