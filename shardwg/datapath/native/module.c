/* shardwg.datapath._native: the batch kernel's module object.
 *
 * Each concern lives in its own file and contributes a method table:
 *   open.c  - inbound: datagram batch -> replay/decrypt/check -> coalesced TUN writes
 *   seal.c  - outbound: TUN super-packets -> segments -> padded, sealed GSO batches
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "native.h"

static PyMethodDef no_methods[] = {{NULL, NULL, 0, NULL}};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "shardwg.datapath._native",
    "Batch open/seal for shardwg's data path (see shardwg/datapath).", -1, no_methods,
    NULL, NULL, NULL, NULL,
};

static int add_methods(PyObject *module, PyMethodDef *defs) {
    for (PyMethodDef *d = defs; d != NULL && d->ml_name != NULL; d++) {
        PyObject *fn = PyCFunction_NewEx(d, NULL, PyModule_GetNameObject(module));
        if (fn == NULL || PyModule_AddObject(module, d->ml_name, fn) < 0) {
            Py_XDECREF(fn);
            return -1;
        }
    }
    return 0;
}

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL) return NULL;
    if (add_methods(m, shardwg_open_methods) < 0 || add_methods(m, shardwg_seal_methods) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", shardwg_openssl_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
