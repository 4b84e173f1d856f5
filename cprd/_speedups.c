/* Optional C speedups for the hot loops of a handoff. cprd works without them (the pure-Python
 * code in protocol/handoff.py and handoff.py is the reference and the fallback); tests check that
 * both give the same answers.
 *
 * The record layout is protocol version 1's (protocol/handoff.py): `count` fixed 30-byte
 * little-endian records <i id, B kind, B name_len, I mode, I flags, Q dev, Q ino>, then the
 * `count` names, concatenated.
 *
 * simple_records(raw, count, allowed) -> bool
 *   True when the record bytes are well formed in the common way: lengths that add up exactly,
 *   every kind allowed (allowed[kind] != 0, a 256-byte table), every name 1..255 bytes of
 *   printable ASCII. False means "let the Python decoder look" (it accepts other valid UTF-8 and
 *   names what is wrong otherwise). No objects are built.
 *
 * verify_batch(raw, count, fds, mask) -> int
 *   Index of the first fd whose fstat/F_GETFL does not match its record, or -1.
 *
 * absorb(raw, count, fds, table, mask, kinds, Identity, Entry, names, verify=True) -> int
 *   The receiving side of a snapshot batch in one call, for records simple_records() accepted:
 *   verify every fd (as verify_batch; verify=False leaves that to a Verifier, below), then build Identity(kind, mode, dev, ino, flags) and
 *   Entry(name, id, fd, ident) and insert table[(name, id)] = entry. All or nothing. Returns -1
 *   when every entry went in; the index of the first fd that failed verification (nothing
 *   inserted); -2 when a key was already in the table or repeats in the batch (nothing inserted);
 *   -3 when the records are not simple (nothing done). `kinds[code]` is the Kind member for a
 *   code; `names` is a dict used to share one str object among entries of the same name.
 *
 * encode_records(entries) -> bytes, encode_keys(entries) -> bytes
 *   The sending side: the record bytes of a batch, and the keys of a Manifest or Delete
 *   (<iB id, name_len> + name each), from tuples whose items 0 and 1 are name and id and, for
 *   records, whose last item is an Identity (a table's Entry, or a protocol Record).
 *
 * Verifier: verify_batch on a helper thread, batch after batch (see below).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define RECORD_SIZE 30
#define KEY_SIZE 5
#define NAMES_CACHE_MAX 65536

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v & 0xff;
    p[1] = (v >> 8) & 0xff;
    p[2] = (v >> 16) & 0xff;
    p[3] = (v >> 24) & 0xff;
}

static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* The checks of simple_records; 1 if simple. */
static int records_simple(const unsigned char *raw, Py_ssize_t len, Py_ssize_t count, const unsigned char *allowed) {
    if (count < 0 || len < count * RECORD_SIZE)
        return 0;
    const unsigned char *names = raw + count * RECORD_SIZE;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *r = raw + i * RECORD_SIZE;
        unsigned nlen = r[5];
        if (nlen == 0 || !allowed[r[4]])
            return 0;
        total += nlen;
    }
    if (total != len - count * RECORD_SIZE)
        return 0;
    for (Py_ssize_t i = 0; i < total; i++)
        if (names[i] < 0x20 || names[i] > 0x7e)
            return 0;
    return 1;
}

static PyObject *simple_records(PyObject *self, PyObject *args) {
    Py_buffer raw, allowed;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "y*ny*", &raw, &count, &allowed))
        return NULL;
    int ok = allowed.len == 256 && records_simple(raw.buf, raw.len, count, allowed.buf);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&allowed);
    return PyBool_FromLong(ok);
}

/* fds (a list of `count` ints) as a C array; NULL with an exception set on failure. */
static int *int_array(PyObject *fds, Py_ssize_t count) {
    if (PyList_GET_SIZE(fds) != count) {
        PyErr_SetString(PyExc_ValueError, "raw, count and fds do not agree");
        return NULL;
    }
    int *ints = PyMem_Malloc(sizeof(int) * (count ? count : 1));
    if (!ints)
        return (int *)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < count; i++) {
        long v = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(ints);
            return NULL;
        }
        ints[i] = (int)v;
    }
    return ints;
}

/* Index of the first fd of fds[0..count) that does not match its record, or -1. */
static Py_ssize_t verify_range(const unsigned char *raw, const int *fds, Py_ssize_t count, uint32_t mask) {
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *r = raw + i * RECORD_SIZE;
        uint32_t mode = le32(r + 6), flags = le32(r + 10);
        uint64_t dev = le64(r + 14), ino = le64(r + 22);
        struct stat st;
        if (fstat(fds[i], &st) != 0 || ((st.st_mode ^ mode) & S_IFMT) || (uint64_t)st.st_dev != dev
                || (uint64_t)st.st_ino != ino)
            return i;
        int fl = fcntl(fds[i], F_GETFL);
        if (fl < 0 || ((uint32_t)fl & mask) != flags)
            return i;
    }
    return -1;
}

/* Index of the first fd that does not match its record, or -1. Runs without the GIL. */
static Py_ssize_t verify_fds(const unsigned char *raw, const int *fds, Py_ssize_t count, uint32_t mask) {
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = verify_range(raw, fds, count, mask);
    Py_END_ALLOW_THREADS
    return bad;
}

/* -- Verifier: verification on a helper thread ----------------------------------------------
 *
 * Verifying a batch is two syscalls an fd (about 0.5 us together): most of what a receiving
 * target does. A Verifier lets the target go on receiving while a helper thread verifies what
 * arrived, one batch after another, in order. The target owns the fds meanwhile and must not
 * close any of them before the Verifier is idle (completed() has returned every job) or closed.
 *
 *   Verifier(mask)
 *   submit(raw: bytes, count, fds: list[int], tag: int)   queue a batch (verified at once, on the
 *                                                          calling thread, when there is no helper)
 *   completed(block: bool) -> list[(tag, bad)]            finished batches, in submission order;
 *                                                          bad is -1 or the index of the first fd
 *                                                          that failed; block: wait for at least
 *                                                          one if any is pending, and meanwhile
 *                                                          verify queued batches on the calling
 *                                                          thread (two cores on the backlog
 *                                                          instead of one core and a sleeper)
 *   pending -> int                                         batches submitted and not yet returned
 *   threaded -> bool                                       whether a helper thread does the work
 *   helped -> int                                          batches completed(True) verified itself
 *   close()                                                stop the helper (after the batch it is
 *                                                          on) and drop what is queued; idempotent
 *
 * There is a helper only with two or more CPUs and without CPRD_NO_THREADS in the environment.
 * It blocks every signal (they stay with the main thread) and lives until close(): a target
 * is multithreaded only while it receives. A forked child has no helper: do not use a Verifier
 * across fork() (cprd's daemons fork only to exec). */
typedef struct job {
    struct job *next;
    PyObject *raw; /* the bytes the records live in (a reference) */
    int *fds;
    Py_ssize_t count, bad;
    long tag;
    int state; /* QUEUED, RUNNING or DONE */
} job;

enum { QUEUED, RUNNING, DONE };

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job *jobs, *jobs_tail; /* every job not yet returned by completed(), in submission order */
    Py_ssize_t pending, helped;
    uint32_t mask;
    int state; /* 0 no helper yet, 1 helper running, -1 no helper (inline), 2 closed */
    int stop;
    pthread_t thread;
} Verifier;

static void jobs_free(job *j) {
    while (j) {
        job *next = j->next;
        Py_DECREF(j->raw);
        PyMem_RawFree(j->fds);
        PyMem_RawFree(j);
        j = next;
    }
}

/* The oldest queued job, now marked running (NULL if none); the caller holds v->mu. */
static job *take_queued(Verifier *v) {
    for (job *j = v->jobs; j; j = j->next)
        if (j->state == QUEUED) {
            j->state = RUNNING;
            return j;
        }
    return NULL;
}

/* Verify a job taken with take_queued; called and returns with v->mu held, drops it meanwhile. */
static void run_job(Verifier *v, job *j) {
    pthread_mutex_unlock(&v->mu);
    Py_ssize_t bad = verify_range((const unsigned char *)PyBytes_AS_STRING(j->raw), j->fds, j->count, v->mask);
    pthread_mutex_lock(&v->mu);
    j->bad = bad;
    j->state = DONE;
    pthread_cond_broadcast(&v->cv);
}

static void *verifier_main(void *arg) {
    Verifier *v = arg;
    pthread_mutex_lock(&v->mu);
    while (!v->stop) {
        job *j = take_queued(v);
        if (j)
            run_job(v, j);
        else
            pthread_cond_wait(&v->cv, &v->mu);
    }
    pthread_mutex_unlock(&v->mu);
    return NULL;
}

static int verifier_start(Verifier *v) {
    cpu_set_t cpus;
    v->state = -1;
    const char *off = getenv("CPRD_NO_THREADS");
    if ((off && *off) || sched_getaffinity(0, sizeof cpus, &cpus) != 0 || CPU_COUNT(&cpus) < 2)
        return 0;
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (pthread_create(&v->thread, &attr, verifier_main, v) == 0)
        v->state = 1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return v->state == 1;
}

static int Verifier_init(Verifier *v, PyObject *args, PyObject *kwds) {
    unsigned long mask;
    if (!PyArg_ParseTuple(args, "k", &mask))
        return -1;
    if (v->state != 0 || v->pending) {
        PyErr_SetString(PyExc_RuntimeError, "Verifier already initialised");
        return -1;
    }
    v->mask = (uint32_t)mask;
    return 0;
}

static PyObject *Verifier_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Verifier *v = (Verifier *)type->tp_alloc(type, 0);
    if (!v)
        return NULL;
    pthread_mutex_init(&v->mu, NULL);
    pthread_cond_init(&v->cv, NULL);
    return (PyObject *)v;
}

static void verifier_close(Verifier *v) {
    if (v->state == 1) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&v->mu);
        v->stop = 1;
        pthread_cond_broadcast(&v->cv);
        pthread_mutex_unlock(&v->mu);
        pthread_join(v->thread, NULL);
        Py_END_ALLOW_THREADS
    }
    v->state = 2;
    jobs_free(v->jobs);
    v->jobs = v->jobs_tail = NULL;
    v->pending = 0;
}

static PyObject *Verifier_close(Verifier *v, PyObject *unused) {
    verifier_close(v);
    Py_RETURN_NONE;
}

static void Verifier_dealloc(Verifier *v) {
    verifier_close(v);
    pthread_mutex_destroy(&v->mu);
    pthread_cond_destroy(&v->cv);
    Py_TYPE(v)->tp_free((PyObject *)v);
}

static PyObject *Verifier_submit(Verifier *v, PyObject *args) {
    PyObject *raw, *fds;
    Py_ssize_t count;
    long tag;
    if (!PyArg_ParseTuple(args, "O!nO!l", &PyBytes_Type, &raw, &count, &PyList_Type, &fds, &tag))
        return NULL;
    if (v->state == 2) {
        PyErr_SetString(PyExc_RuntimeError, "Verifier is closed");
        return NULL;
    }
    if (count < 0 || PyBytes_GET_SIZE(raw) < count * RECORD_SIZE || PyList_GET_SIZE(fds) != count) {
        PyErr_SetString(PyExc_ValueError, "submit: raw, count and fds do not agree");
        return NULL;
    }
    job *j = PyMem_RawCalloc(1, sizeof(job));
    int *ints = j ? PyMem_RawMalloc(sizeof(int) * (count ? count : 1)) : NULL;
    if (!ints) {
        PyMem_RawFree(j);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred()) {
            PyMem_RawFree(ints);
            PyMem_RawFree(j);
            return NULL;
        }
        ints[i] = (int)fd;
    }
    Py_INCREF(raw);
    j->raw = raw;
    j->fds = ints;
    j->count = count;
    j->tag = tag;
    j->bad = -1;
    j->state = QUEUED;
    if (v->state == 0)
        verifier_start(v);
    if (v->state != 1) { /* no helper: verify now, on this thread */
        j->bad = verify_fds((const unsigned char *)PyBytes_AS_STRING(raw), ints, count, v->mask);
        j->state = DONE;
    }
    pthread_mutex_lock(&v->mu);
    if (v->jobs_tail)
        v->jobs_tail->next = j;
    else
        v->jobs = j;
    v->jobs_tail = j;
    v->pending++;
    if (j->state == QUEUED)
        pthread_cond_broadcast(&v->cv);
    pthread_mutex_unlock(&v->mu);
    Py_RETURN_NONE;
}

static PyObject *Verifier_completed(Verifier *v, PyObject *args) {
    int block;
    if (!PyArg_ParseTuple(args, "p", &block))
        return NULL;
    job *got = NULL, *last = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&v->mu);
    for (;;) {
        for (job *j = v->jobs; j && j->state == DONE; j = j->next)
            last = j;
        if (last || !block || !v->jobs)
            break;
        /* Rather than sleep until the helper is done, verify the next queued batch here. */
        job *j = take_queued(v);
        if (j) {
            run_job(v, j);
            v->helped++;
        } else {
            pthread_cond_wait(&v->cv, &v->mu);
        }
    }
    if (last) { /* hand back the finished prefix; acks go in order */
        got = v->jobs;
        v->jobs = last->next;
        if (!v->jobs)
            v->jobs_tail = NULL;
        last->next = NULL;
    }
    pthread_mutex_unlock(&v->mu);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(0);
    for (job *j = got; j && out; j = j->next) {
        PyObject *item = Py_BuildValue("(ln)", j->tag, j->bad);
        if (!item || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
    for (job *j = got; j; j = j->next)
        v->pending--;
    jobs_free(got);
    return out;
}

static PyObject *Verifier_pending(Verifier *v, void *closure) { return PyLong_FromSsize_t(v->pending); }

static PyObject *Verifier_threaded(Verifier *v, void *closure) { return PyBool_FromLong(v->state == 1); }

static PyObject *Verifier_helped(Verifier *v, void *closure) { return PyLong_FromSsize_t(v->helped); }

static PyMethodDef Verifier_methods[] = {
    {"submit", (PyCFunction)Verifier_submit, METH_VARARGS, "Queue a batch for verification."},
    {"completed", (PyCFunction)Verifier_completed, METH_VARARGS, "Finished batches: [(tag, bad)]."},
    {"close", (PyCFunction)Verifier_close, METH_NOARGS, "Stop the helper and drop what is queued."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Verifier_getset[] = {
    {"pending", (getter)Verifier_pending, NULL, "batches submitted and not yet returned", NULL},
    {"threaded", (getter)Verifier_threaded, NULL, "whether a helper thread verifies", NULL},
    {"helped", (getter)Verifier_helped, NULL, "batches that completed(True) verified on the calling thread", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject VerifierType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cprd._speedups.Verifier",
    .tp_basicsize = sizeof(Verifier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Verifier_new,
    .tp_init = (initproc)Verifier_init,
    .tp_dealloc = (destructor)Verifier_dealloc,
    .tp_methods = Verifier_methods,
    .tp_getset = Verifier_getset,
    .tp_doc = "Verifies batches of a handoff on a helper thread, in order.",
};

static PyObject *verify_batch(PyObject *self, PyObject *args) {
    Py_buffer raw;
    Py_ssize_t count;
    PyObject *fds;
    unsigned long mask;
    if (!PyArg_ParseTuple(args, "y*nO!k", &raw, &count, &PyList_Type, &fds, &mask))
        return NULL;
    if (count < 0 || raw.len < count * RECORD_SIZE) {
        PyBuffer_Release(&raw);
        PyErr_SetString(PyExc_ValueError, "verify_batch: raw, count and fds do not agree");
        return NULL;
    }
    int *ints = int_array(fds, count);
    if (!ints) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    Py_ssize_t bad = verify_fds(raw.buf, ints, count, (uint32_t)mask);
    PyMem_Free(ints);
    PyBuffer_Release(&raw);
    return PyLong_FromSsize_t(bad);
}

/* A new instance of a tuple subclass (a NamedTuple) from n new references (stolen, even on failure). */
static PyObject *make_tuple(PyTypeObject *type, Py_ssize_t n, PyObject **items) {
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!items[i])
            goto fail;
    t = type == &PyTuple_Type ? PyTuple_New(n) : type->tp_alloc(type, n);
    if (!t)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

/* One str for each distinct name (the cache shares it among entries); a new reference. */
static PyObject *shared_name(PyObject *cache, const unsigned char *p, Py_ssize_t n) {
    PyObject *s = PyUnicode_DecodeASCII((const char *)p, n, "strict");
    if (!s)
        return NULL;
    PyObject *have = PyDict_GetItemWithError(cache, s);
    if (have) {
        Py_INCREF(have);
        Py_DECREF(s);
        return have;
    }
    if (PyErr_Occurred() || (PyDict_GET_SIZE(cache) < NAMES_CACHE_MAX && PyDict_SetItem(cache, s, s) < 0)) {
        Py_DECREF(s);
        return NULL;
    }
    return s;
}

static PyObject *absorb(PyObject *self, PyObject *args) {
    Py_buffer raw;
    Py_ssize_t count;
    PyObject *fds, *table, *kinds, *names;
    PyTypeObject *ident_type, *entry_type;
    unsigned long mask;
    int check = 1;
    if (!PyArg_ParseTuple(args, "y*nO!O!kO!O!O!O!|p", &raw, &count, &PyList_Type, &fds, &PyDict_Type, &table, &mask,
                          &PyTuple_Type, &kinds, &PyType_Type, &ident_type, &PyType_Type, &entry_type, &PyDict_Type,
                          &names, &check))
        return NULL;
    PyObject *result = NULL, **keys = NULL;
    PyObject *last[5] = {NULL, NULL, NULL, NULL, NULL}, *last_ident = NULL; /* the previous Identity, its items */
    PyObject *last_nm = NULL; /* the previous record's name, as a str, and its bytes */
    const unsigned char *last_name = NULL;
    unsigned last_nlen = 0;
    int *ints = NULL;
    Py_ssize_t inserted = 0;
    if (!PyType_IsSubtype(ident_type, &PyTuple_Type) || !PyType_IsSubtype(entry_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "absorb: Identity and Entry must be tuple types");
        goto done;
    }
    unsigned char allowed[256] = {0};
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kinds) && k < 256; k++)
        allowed[k] = PyTuple_GET_ITEM(kinds, k) != Py_None;
    if (!records_simple(raw.buf, raw.len, count, allowed)) {
        result = PyLong_FromLong(-3);
        goto done;
    }
    if (!(ints = int_array(fds, count)))
        goto done;
    Py_ssize_t bad = check ? verify_fds(raw.buf, ints, count, (uint32_t)mask) : -1;
    if (bad >= 0) {
        result = PyLong_FromSsize_t(bad);
        goto done;
    }
    if (!(keys = PyMem_Calloc(count ? count : 1, sizeof(PyObject *)))) {
        PyErr_NoMemory();
        goto done;
    }
    /* Records come grouped (a device's fds, a run of eventfds): an Identity equal to the previous
     * record's is shared (every eventfd has the same one), and so are equal mode, dev and flags
     * ints. Fewer objects: less memory for the table and less time building it. */
    const unsigned char *base = raw.buf, *name = base + count * RECORD_SIZE, *prev = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *r = base + i * RECORD_SIZE;
        unsigned nlen = r[5];
        PyObject *ident;
        if (prev && prev[4] == r[4] && memcmp(prev + 6, r + 6, RECORD_SIZE - 6) == 0) {
            ident = last_ident;
            Py_INCREF(ident);
        } else {
            PyObject *iv[5] = {PyTuple_GET_ITEM(kinds, r[4]), NULL, NULL, NULL, NULL};
            Py_INCREF(iv[0]);
            iv[1] = prev && !memcmp(prev + 6, r + 6, 4) ? Py_NewRef(last[1]) : PyLong_FromUnsignedLong(le32(r + 6));
            iv[2] = prev && !memcmp(prev + 14, r + 14, 8) ? Py_NewRef(last[2])
                                                          : PyLong_FromUnsignedLongLong(le64(r + 14));
            iv[3] = PyLong_FromUnsignedLongLong(le64(r + 22));
            iv[4] = prev && !memcmp(prev + 10, r + 10, 4) ? Py_NewRef(last[4]) : PyLong_FromUnsignedLong(le32(r + 10));
            ident = make_tuple(ident_type, 5, iv);
            if (ident) {
                Py_XSETREF(last_ident, Py_NewRef(ident));
                for (int k = 0; k < 5; k++)
                    Py_XSETREF(last[k], Py_NewRef(PyTuple_GET_ITEM(ident, k)));
                prev = r;
            }
        }
        PyObject *nm;
        if (last_nm && nlen == last_nlen && memcmp(name, last_name, nlen) == 0) { /* a run of one name */
            nm = Py_NewRef(last_nm);
        } else if ((nm = shared_name(names, name, nlen))) {
            Py_XSETREF(last_nm, Py_NewRef(nm));
            last_name = name;
            last_nlen = nlen;
        }
        PyObject *id = PyLong_FromLong((int32_t)le32(r));
        name += nlen;
        if (!ident || !nm || !id) {
            Py_XDECREF(ident);
            Py_XDECREF(nm);
            Py_XDECREF(id);
            goto done;
        }
        Py_INCREF(nm);
        Py_INCREF(id);
        PyObject *kv[2] = {nm, id};
        PyObject *key = make_tuple(&PyTuple_Type, 2, kv);
        PyObject *eitems[4] = {nm, id, PyLong_FromLong(ints[i]), ident};
        PyObject *entry = make_tuple(entry_type, 4, eitems);
        if (!key || !entry) {
            Py_XDECREF(key);
            Py_XDECREF(entry);
            goto done;
        }
        PyObject *held = PyDict_SetDefault(table, key, entry); /* one lookup: inserts unless the key is there */
        if (held == entry) {
            keys[inserted++] = key;
            Py_DECREF(entry);
            continue;
        }
        Py_DECREF(key);
        Py_DECREF(entry);
        if (held)
            result = PyLong_FromLong(-2);
        goto done;
    }
    result = PyLong_FromLong(-1);
    inserted = 0; /* keep them */
done:
    for (int k = 0; k < 5; k++)
        Py_XDECREF(last[k]);
    Py_XDECREF(last_ident);
    Py_XDECREF(last_nm);
    if (keys) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        for (Py_ssize_t i = 0; i < count && keys[i]; i++) {
            if (i < inserted && PyDict_DelItem(table, keys[i]) < 0)
                PyErr_Clear();
            Py_DECREF(keys[i]);
        }
        PyErr_Restore(et, ev, tb);
        PyMem_Free(keys);
    }
    PyMem_Free(ints);
    PyBuffer_Release(&raw);
    return result;
}

/* name (item 0, str), id (item 1, int) and the Identity (last item) of one entry; 0 on success. */
static int entry_parts(PyObject *e, const char **name, Py_ssize_t *nlen, long *id, PyObject **ident) {
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) < (ident ? 3 : 2)) {
        PyErr_SetString(PyExc_TypeError, "expected an Entry or a Record");
        return -1;
    }
    PyObject *n = PyTuple_GET_ITEM(e, 0);
    if (!PyUnicode_Check(n)) {
        PyErr_SetString(PyExc_TypeError, "entry name must be a str");
        return -1;
    }
    if (!(*name = PyUnicode_AsUTF8AndSize(n, nlen)))
        return -1;
    if (*nlen < 1 || *nlen > 255) {
        PyErr_Format(PyExc_ValueError, "entry name of %zd bytes does not fit a record", *nlen);
        return -1;
    }
    *id = PyLong_AsLong(PyTuple_GET_ITEM(e, 1));
    if (*id == -1 && PyErr_Occurred())
        return -1;
    if (*id < INT32_MIN || *id > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "entry id %ld is not a signed 32-bit integer", *id);
        return -1;
    }
    if (!ident)
        return 0;
    *ident = PyTuple_GET_ITEM(e, PyTuple_GET_SIZE(e) - 1);
    if (!PyTuple_Check(*ident) || PyTuple_GET_SIZE(*ident) != 5) {
        PyErr_SetString(PyExc_TypeError, "expected an Identity (kind, mode, dev, ino, flags)");
        return -1;
    }
    return 0;
}

static int ulong_item(PyObject *t, Py_ssize_t i, unsigned long long max, unsigned long long *out) {
    *out = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, i));
    if (*out == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (*out > max) {
        PyErr_SetString(PyExc_OverflowError, "identity field out of range");
        return -1;
    }
    return 0;
}

static PyObject *encode(PyObject *entries, int records) {
    if (!PyList_Check(entries)) {
        PyErr_SetString(PyExc_TypeError, "expected a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(entries), fixed = records ? RECORD_SIZE : KEY_SIZE;
    Py_ssize_t names = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *n = PyList_GET_ITEM(entries, i);
        n = PyTuple_Check(n) && PyTuple_GET_SIZE(n) ? PyTuple_GET_ITEM(n, 0) : NULL;
        Py_ssize_t len;
        if (!n || !PyUnicode_Check(n) || !PyUnicode_AsUTF8AndSize(n, &len)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "expected an Entry or a Record");
            return NULL;
        }
        names += len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * fixed + names);
    if (!out)
        return NULL;
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(out), *np = buf + (records ? count * fixed : 0);
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *name;
        Py_ssize_t nlen;
        long id;
        PyObject *ident = NULL;
        if (entry_parts(PyList_GET_ITEM(entries, i), &name, &nlen, &id, records ? &ident : NULL) < 0)
            goto fail;
        if (records) {
            unsigned long long kind, mode, dev, ino, flags;
            if (ulong_item(ident, 0, 255, &kind) < 0 || ulong_item(ident, 1, UINT32_MAX, &mode) < 0
                    || ulong_item(ident, 2, UINT64_MAX, &dev) < 0 || ulong_item(ident, 3, UINT64_MAX, &ino) < 0
                    || ulong_item(ident, 4, UINT32_MAX, &flags) < 0)
                goto fail;
            unsigned char *r = buf + i * RECORD_SIZE;
            put32(r, (uint32_t)id);
            r[4] = (unsigned char)kind;
            r[5] = (unsigned char)nlen;
            put32(r + 6, (uint32_t)mode);
            put32(r + 10, (uint32_t)flags);
            put64(r + 14, dev);
            put64(r + 22, ino);
        } else {
            put32(np, (uint32_t)id);
            np[4] = (unsigned char)nlen;
            np += KEY_SIZE;
        }
        memcpy(np, name, nlen);
        np += nlen;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *encode_records(PyObject *self, PyObject *entries) { return encode(entries, 1); }

static PyObject *encode_keys(PyObject *self, PyObject *entries) { return encode(entries, 0); }

static PyMethodDef methods[] = {
    {"simple_records", simple_records, METH_VARARGS, "Whether record bytes are well formed the common way."},
    {"verify_batch", verify_batch, METH_VARARGS, "Index of the first fd that does not match its record, or -1."},
    {"absorb", absorb, METH_VARARGS, "Verify a batch and insert its entries into a table's dict."},
    {"encode_records", encode_records, METH_O, "The record bytes of a batch."},
    {"encode_keys", encode_keys, METH_O, "The key bytes of a Manifest."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&VerifierType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "Verifier", (PyObject *)&VerifierType) < 0)
        Py_CLEAR(m);
    return m;
}
