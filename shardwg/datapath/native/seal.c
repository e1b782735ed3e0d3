/* Outbound batch kernel (placeholder until the seal path lands). */
#include "native.h"

PyMethodDef shardwg_seal_methods[] = {{NULL, NULL, 0, NULL}};
