/* Optional C speedup for the hot loop of a handoff's receiving side.
 *
 * verify_batch(raw, count, fds, mask) -> int
 *   raw   bytes-like: `count` fixed 30-byte little-endian records, as in protocol/handoff.py:
 *         <i id, B kind, B name_len, I mode, I flags, Q dev, Q ino>
 *   fds   list of `count` ints, the fds that arrived with the batch, in order
 *   mask  the open flags to compare (everything but what F_SETFL may change)
 * Returns the index of the first fd whose fstat/F_GETFL does not match its record, or -1.
 *
 * It does exactly what the pure-Python loop in cprd/handoff.py does (which stays the reference
 * and the fallback when this module is not built), without building a stat_result per fd.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

#define RECORD_SIZE 30

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

static PyObject *verify_batch(PyObject *self, PyObject *args) {
    Py_buffer raw;
    Py_ssize_t count;
    PyObject *fds;
    unsigned long mask;
    if (!PyArg_ParseTuple(args, "y*nO!k", &raw, &count, &PyList_Type, &fds, &mask))
        return NULL;
    if (count < 0 || raw.len < count * RECORD_SIZE || PyList_GET_SIZE(fds) != count) {
        PyBuffer_Release(&raw);
        PyErr_SetString(PyExc_ValueError, "verify_batch: raw, count and fds do not agree");
        return NULL;
    }
    int *ints = PyMem_Malloc(sizeof(int) * (count ? count : 1));
    if (!ints) {
        PyBuffer_Release(&raw);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        long v = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(ints);
            PyBuffer_Release(&raw);
            return NULL;
        }
        ints[i] = (int)v;
    }
    Py_ssize_t bad = -1;
    const unsigned char *base = raw.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *r = base + i * RECORD_SIZE;
        uint32_t mode = le32(r + 6), flags = le32(r + 10);
        uint64_t dev = le64(r + 14), ino = le64(r + 22);
        struct stat st;
        if (fstat(ints[i], &st) != 0 || ((st.st_mode ^ mode) & S_IFMT) || (uint64_t)st.st_dev != dev
                || (uint64_t)st.st_ino != ino) {
            bad = i;
            break;
        }
        int fl = fcntl(ints[i], F_GETFL);
        if (fl < 0 || ((uint32_t)fl & (uint32_t)mask) != flags) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(ints);
    PyBuffer_Release(&raw);
    return PyLong_FromSsize_t(bad);
}

static PyMethodDef methods[] = {
    {"verify_batch", verify_batch, METH_VARARGS, "Index of the first fd that does not match its record, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
