/*
 * service_profiler.rawdata._records: the raw reader's per-record loop in C (see service_profiler/rawdata/rawentries.py).
 *
 * add_records(records, chans, offset, proc, spans, events, counters, classes, shared, dropped)
 *
 * does what rawentries.add_records_py does for one `rec` line, at a fraction of its cost (a long run
 * holds millions of records and, in its batch and tokens records, millions of per-request entries):
 * each record becomes a SpanRecord / EventRecord / CounterRecord (classes[0..2], tuple subclasses
 * without a __dict__, allocated here as the tuple type's own tp_new would) appended to its list,
 * with the file's clock offset added to its timestamps; the per-request entries of the channels that
 * carry them are checked, made tuples and (with `shared`, a dict) interned / shared, exactly as
 * rawentries.clean_attrs does; each dropped entry is counted in dropped[0].
 *
 * A record that rawentries.valid_record would reject (or an unknown channel) raises ValueError (or
 * KeyError): the caller removes what this line appended and re-reads it record by record. What was
 * done to the entries of the records before it stays done, and is counted: cleaning is idempotent.
 *
 * chans: {channel id: (kind code 0/1/2, domain, name, entry fields 0..3)} as built by the reader.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

enum { SPAN = 0, EVENT = 1, COUNTER = 2 };
enum { NO_IDS = 0, RID = 1, TOKEN_REQS = 2, BATCH_REQS = 3 };

static PyObject *str_rid;           /* "rid" */
static PyObject *str_reqs;          /* "reqs" */
static PyObject *str_batch_id;      /* "batch_id" */
static PyObject *str_schedule_span; /* "batchFrameworkProcessing" */

/* Exact int (JSON integer), not bool. */
/* a timestamp: an int (not a bool) in [0, 2^62) (rawentries.MAX_TS); a tid: an int64 */
static int
ts_value(PyObject *o, long long *out)
{
    int overflow = 0;
    if (!PyLong_CheckExact(o)) {
        return 0;
    }
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0 || v < 0 || v >= (1LL << 62)) {
        return 0;
    }
    *out = v;
    return 1;
}

static int
is_tid(PyObject *o)
{
    int overflow = 0;
    if (!PyLong_Check(o)) {
        return 0;
    }
    (void)PyLong_AsLongLongAndOverflow(o, &overflow);
    return overflow == 0;
}

/* int or bool, as JSON gives them. */
#define IS_INT(o) (PyLong_CheckExact(o) || PyBool_Check(o))
#define IS_OPT_INT(o) ((o) == Py_None || IS_INT(o))
#define IS_OPT_NUM(o) ((o) == Py_None || PyLong_CheckExact(o) || PyFloat_CheckExact(o))
#define IS_OPT_STR(o) ((o) == Py_None || PyUnicode_CheckExact(o))
#define IS_RID(o) (PyUnicode_CheckExact(o) || PyLong_CheckExact(o))

static int
valid_entry(PyObject *const *e, Py_ssize_t n, int fields)
{
    if (n < 3 || !IS_RID(e[0]) || !IS_INT(e[1])) {
        return 0;
    }
    if (fields == BATCH_REQS) {
        return IS_INT(e[2]) && (n < 4 || IS_OPT_NUM(e[3])) && (n < 5 || IS_OPT_NUM(e[4]))
               && (n < 6 || IS_OPT_INT(e[5]));
    }
    return IS_OPT_INT(e[2]) && (n < 4 || IS_OPT_STR(e[3]));
}

/* New reference: `value` itself, or the object shared for its value (dict.setdefault). */
static PyObject *
share_int(PyObject *shared, PyObject *value)
{
    if (shared != NULL && PyLong_CheckExact(value)) {
        PyObject *kept = PyDict_SetDefault(shared, value, value); /* borrowed */
        if (kept == NULL) {
            return NULL;
        }
        value = kept;
    }
    Py_INCREF(value);
    return value;
}

static int
add_dropped(PyObject *dropped, Py_ssize_t count)
{
    if (count == 0) {
        return 0;
    }
    PyObject *old = PyList_GetItem(dropped, 0); /* borrowed */
    if (old == NULL) {
        return -1;
    }
    PyObject *delta = PyLong_FromSsize_t(count);
    if (delta == NULL) {
        return -1;
    }
    PyObject *sum = PyNumber_Add(old, delta);
    Py_DECREF(delta);
    if (sum == NULL) {
        return -1;
    }
    return PyList_SetItem(dropped, 0, sum); /* steals sum */
}

/* rawentries.clean_attrs. `shared`: NULL for a stream (check only). Returns -1 on error. */
static int
clean_attrs(PyObject *attrs, int fields, PyObject *shared, PyObject *dropped)
{
    if (!PyDict_CheckExact(attrs)) {
        return 0;
    }
    if (fields == RID) {
        if (shared == NULL) {
            return 0;
        }
        PyObject *rid = PyDict_GetItemWithError(attrs, str_rid); /* borrowed */
        if (rid == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        if (!PyUnicode_CheckExact(rid)) {
            return 0;
        }
        Py_INCREF(rid);
        PyUnicode_InternInPlace(&rid);
        int rc = PyDict_SetItem(attrs, str_rid, rid);
        Py_DECREF(rid);
        return rc;
    }
    PyObject *reqs = PyDict_GetItemWithError(attrs, str_reqs); /* borrowed */
    if (reqs == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (reqs == Py_None) {
        return 0;
    }
    if (!PyList_CheckExact(reqs)) {
        PyObject *empty = PyList_New(0);
        if (empty == NULL) {
            return -1;
        }
        int rc = PyDict_SetItem(attrs, str_reqs, empty);
        Py_DECREF(empty);
        return rc < 0 ? -1 : add_dropped(dropped, 1);
    }
    Py_ssize_t n = PyList_GET_SIZE(reqs);
    if (shared == NULL) {
        /* A stream only checks: a list of good entries stays as it is. */
        Py_ssize_t i = 0;
        for (; i < n; i++) {
            PyObject *entry = PyList_GET_ITEM(reqs, i);
            if (PyList_CheckExact(entry)) {
                if (!valid_entry(((PyListObject *)entry)->ob_item, PyList_GET_SIZE(entry), fields)) {
                    break;
                }
            } else if (!PyTuple_CheckExact(entry)
                       || !valid_entry(((PyTupleObject *)entry)->ob_item, PyTuple_GET_SIZE(entry), fields)) {
                break;
            }
        }
        if (i == n) {
            return 0;
        }
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        return -1;
    }
    Py_ssize_t kept = 0, bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(reqs, i);
        PyObject *const *items;
        Py_ssize_t size;
        if (PyList_CheckExact(entry)) {
            items = ((PyListObject *)entry)->ob_item;
            size = PyList_GET_SIZE(entry);
        } else if (PyTuple_CheckExact(entry)) {
            items = ((PyTupleObject *)entry)->ob_item;
            size = PyTuple_GET_SIZE(entry);
        } else {
            bad++;
            continue;
        }
        if (!valid_entry(items, size, fields)) {
            bad++;
            continue;
        }
        PyObject *tup = PyTuple_New(size);
        if (tup == NULL) {
            goto error;
        }
        PyList_SET_ITEM(out, kept++, tup); /* owned by `out` from here on, even if filling fails */
        for (Py_ssize_t k = 0; k < size; k++) {
            PyObject *item = items[k];
            if (shared != NULL && k == 0 && PyUnicode_CheckExact(item)) {
                Py_INCREF(item);
                PyUnicode_InternInPlace(&item);
            } else if (fields == BATCH_REQS && (k == 3 || k == 4) && size > 4) {
                item = share_int(shared, item);
                if (item == NULL) {
                    goto error;
                }
            } else {
                Py_INCREF(item);
            }
            PyTuple_SET_ITEM(tup, k, item);
        }
    }
    /* The unused tail holds NULLs: the list ends at what was kept before anyone sees it. */
    Py_SET_SIZE(out, kept);
    int rc = PyDict_SetItem(attrs, str_reqs, out);
    Py_DECREF(out);
    return rc < 0 ? -1 : add_dropped(dropped, bad);
error:
    /* Py_SIZE(out) is n and the unfilled slots (of `out` and of the last tuple) are NULL, which
     * list and tuple deallocation skip. */
    Py_DECREF(out);
    add_dropped(dropped, bad);
    return -1;
}

static void
release(PyObject **items, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_XDECREF(items[k]);
    }
}

/* A new tuple holding the n new references in `items` (stolen, also on failure). */
static PyObject *
make_row(PyObject **items, Py_ssize_t n)
{
    PyObject *row = PyTuple_New(n);
    if (row == NULL) {
        release(items, n);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyTuple_SET_ITEM(row, k, items[k]);
    }
    return row;
}

/* A new instance of the tuple subclass `cls` holding the n new references in `items` (stolen, also on
 * failure). NamedTuple classes have __slots__ = (): the layout is a tuple's, as tuple.__new__ makes it. */
static PyObject *
make_record(PyTypeObject *cls, PyObject **items, Py_ssize_t n)
{
#if PY_VERSION_HEX >= 0x030E0000
    /* 3.14 tuples cache their hash in the object: let tuple.__new__ set them up. */
    PyObject *plain = make_row(items, n);
    if (plain == NULL) {
        return NULL;
    }
    PyObject *rec = PyObject_CallMethod((PyObject *)&PyTuple_Type, "__new__", "OO", (PyObject *)cls, plain);
    Py_DECREF(plain);
    return rec;
#else
    PyObject *rec = cls->tp_alloc(cls, n);
    if (rec == NULL) {
        release(items, n);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyTuple_SET_ITEM(rec, k, items[k]);
    }
    return rec;
#endif
}

static int
append_new(PyObject *list, PyObject *rec)
{
    if (rec == NULL) {
        return -1;
    }
    int rc = PyList_Append(list, rec);
    Py_DECREF(rec);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* add_raw_rows: SQLite rows instead of records (sqlite_export._span_rows / _event_rows / _counter_rows). */

typedef struct {
    PyObject *encode;   /* value -> bytes or str; TypeError when it cannot */
    PyObject *fallback; /* value -> str, for what `encode` refused */
    PyObject *scalar;   /* a non-scalar batch_id / rid -> what the column stores */
} Encoders;

/* New reference: the JSON text of `value`, as fastjson.json_text makes it. */
static PyObject *
json_text(Encoders *enc, PyObject *value)
{
    PyObject *out = PyObject_CallOneArg(enc->encode, value);
    if (out == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            return NULL;
        }
        PyErr_Clear();
        return PyObject_CallOneArg(enc->fallback, value);
    }
    if (PyBytes_CheckExact(out)) {
        PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out), NULL);
        Py_DECREF(out);
        return text;
    }
    return out;
}

/* New reference: attrs[key] when it is None or a scalar (exact int, float, str, bool), else
 * scalar(attrs[key]); None when absent. */
static PyObject *
scalar_attr(Encoders *enc, PyObject *attrs, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(attrs, key); /* borrowed */
    if (v == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (v == Py_None || PyLong_CheckExact(v) || PyFloat_CheckExact(v) || PyUnicode_CheckExact(v) || PyBool_Check(v)) {
        return Py_NewRef(v);
    }
    return PyObject_CallOneArg(enc->scalar, v);
}

static int
is_schedule_span(PyObject *name)
{
    return name == str_schedule_span
           || (PyUnicode_Check(name) && PyUnicode_Compare(name, str_schedule_span) == 0);
}

/* The row's text and batch_id / rid columns from `attrs` (items[k] .. new references). */
static int
attrs_columns(Encoders *enc, PyObject *attrs, PyObject *name, int code, PyObject **bid, PyObject **rid,
              PyObject **text)
{
    *bid = *rid = *text = NULL;
    if (attrs == Py_None) {
        *bid = Py_NewRef(Py_None);
        *rid = Py_NewRef(Py_None);
        *text = Py_NewRef(Py_None);
        return 0;
    }
    if (PyDict_GET_SIZE(attrs) == 0) {
        *bid = Py_NewRef(Py_None);
        *rid = Py_NewRef(Py_None);
        *text = json_text(enc, attrs);
        return *text == NULL ? -1 : 0;
    }
    if (code == EVENT && (*rid = scalar_attr(enc, attrs, str_rid)) == NULL) {
        return -1;
    }
    if ((*bid = scalar_attr(enc, attrs, str_batch_id)) == NULL) {
        return -1;
    }
    int strip = 0;
    if (code == SPAN && is_schedule_span(name)) {
        /* the per-request entries are the batch_req table, row for row: not stored twice */
        strip = PyDict_Contains(attrs, str_reqs);
        if (strip < 0) {
            return -1;
        }
    }
    if (strip) {
        PyObject *copy = PyDict_Copy(attrs);
        if (copy == NULL || PyDict_DelItem(copy, str_reqs) < 0) {
            Py_XDECREF(copy);
            return -1;
        }
        *text = json_text(enc, copy);
        Py_DECREF(copy);
    } else {
        *text = json_text(enc, attrs);
    }
    return *text == NULL ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* The loop, shared: records (classes != NULL) or rows (enc != NULL). */

static PyObject *
malformed(void)
{
    PyErr_SetString(PyExc_ValueError, "malformed record");
    return NULL;
}

static PyObject *
build_line(PyObject *const *args, PyTypeObject **cls, Encoders *enc)
{
    PyObject *records = args[0], *chans = args[1], *offset = args[2], *proc = args[3];
    PyObject *lists[3] = {args[4], args[5], args[6]};
    PyObject *shared = args[8], *dropped = args[9];
    PyObject *shared_or_null = shared == Py_None ? NULL : shared;

    Py_ssize_t n = PyList_GET_SIZE(records);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = PyList_GET_ITEM(records, i);
        if (!PyList_CheckExact(rec) || PyList_GET_SIZE(rec) < 1) {
            return malformed();
        }
        PyObject **r = ((PyListObject *)rec)->ob_item;
        Py_ssize_t size = PyList_GET_SIZE(rec);
        PyObject *chan = PyDict_GetItemWithError(chans, r[0]); /* borrowed */
        if (chan == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, r[0]);
            }
            return NULL;
        }
        if (!PyTuple_CheckExact(chan) || PyTuple_GET_SIZE(chan) != 4) {
            PyErr_SetString(PyExc_TypeError, "a channel must be (code, domain, name, fields)");
            return NULL;
        }
        long code = PyLong_AsLong(PyTuple_GET_ITEM(chan, 0));
        long fields = PyLong_AsLong(PyTuple_GET_ITEM(chan, 3));
        if ((code == -1 || fields == -1) && PyErr_Occurred()) {
            return NULL;
        }
        PyObject *domain = PyTuple_GET_ITEM(chan, 1), *name = PyTuple_GET_ITEM(chan, 2);
        PyObject *attrs;
        long long t0, t1;
        if (code == SPAN) {
            if (size != 5 || !ts_value(r[1], &t0) || !ts_value(r[2], &t1) || t1 < t0 || !is_tid(r[3])
                || !(r[4] == Py_None || PyDict_Check(r[4]))) {
                return malformed();
            }
            attrs = r[4];
        } else if (code == EVENT) {
            if (size != 4 || !ts_value(r[1], &t0) || !is_tid(r[2]) || !(r[3] == Py_None || PyDict_Check(r[3]))) {
                return malformed();
            }
            attrs = r[3];
        } else if (code == COUNTER) {
            if (size != 3 || !ts_value(r[1], &t0) || !PyDict_Check(r[2])) {
                return malformed();
            }
            attrs = r[2];
        } else {
            return malformed();
        }
        if (code != COUNTER && fields != NO_IDS && clean_attrs(attrs, (int)fields, shared_or_null, dropped) < 0) {
            return NULL;
        }

        PyObject *items[9];
        Py_ssize_t nitems = 0;
        items[nitems++] = Py_NewRef(proc);
        items[nitems++] = Py_NewRef(domain);
        items[nitems++] = Py_NewRef(name);
        PyObject *start = PyNumber_Add(r[1], offset);
        if (start == NULL) {
            goto fail;
        }
        items[nitems++] = start;
        if (code == SPAN) {
            PyObject *end = PyNumber_Add(r[2], offset);
            if (end == NULL) {
                goto fail;
            }
            items[nitems++] = end;
            if (enc != NULL) {
                PyObject *dur = PyNumber_Subtract(end, start);
                if (dur == NULL) {
                    goto fail;
                }
                items[nitems++] = dur;
            }
            items[nitems++] = Py_NewRef(r[3]);
        } else if (code == EVENT) {
            items[nitems++] = Py_NewRef(r[2]);
        }
        if (enc == NULL) {
            items[nitems++] = Py_NewRef(attrs);
            if (append_new(lists[code], make_record(cls[code], items, nitems)) < 0) {
                return NULL;
            }
            continue;
        }
        if (code == COUNTER) {
            PyObject *text = json_text(enc, attrs);
            if (text == NULL) {
                goto fail;
            }
            items[nitems++] = text;
        } else {
            PyObject *bid, *rid, *text;
            int rc = attrs_columns(enc, attrs, name, (int)code, &bid, &rid, &text);
            if (code == EVENT) {
                items[nitems++] = rid;
                items[nitems++] = bid;
            } else {
                Py_XDECREF(rid);
                items[nitems++] = bid;
            }
            items[nitems++] = text;
            if (rc < 0) {
                goto fail;
            }
        }
        if (append_new(lists[code], make_row(items, nitems)) < 0) {
            return NULL;
        }
        continue;
    fail:
        release(items, nitems);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
check_common(PyObject *const *args, Py_ssize_t nargs, const char *fname)
{
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "%s() takes 10 arguments", fname);
        return -1;
    }
    if (!PyList_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) || !PyLong_CheckExact(args[2])
        || !PyList_CheckExact(args[4]) || !PyList_CheckExact(args[5]) || !PyList_CheckExact(args[6])
        || !(args[8] == Py_None || PyDict_CheckExact(args[8])) || !PyList_CheckExact(args[9])
        || PyList_GET_SIZE(args[9]) != 1) {
        PyErr_Format(PyExc_TypeError, "%s(): unexpected argument types", fname);
        return -1;
    }
    return 0;
}

static PyObject *
add_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_common(args, nargs, "add_records") < 0) {
        return NULL;
    }
    PyObject *classes = args[7];
    if (!PyTuple_CheckExact(classes) || PyTuple_GET_SIZE(classes) != 3) {
        PyErr_SetString(PyExc_TypeError, "add_records(): classes must be a tuple of 3 classes");
        return NULL;
    }
    PyTypeObject *cls[3];
    for (int k = 0; k < 3; k++) {
        PyObject *c = PyTuple_GET_ITEM(classes, k);
        if (!PyType_Check(c) || !PyType_IsSubtype((PyTypeObject *)c, &PyTuple_Type)
            || ((PyTypeObject *)c)->tp_basicsize != PyTuple_Type.tp_basicsize
            || ((PyTypeObject *)c)->tp_itemsize != PyTuple_Type.tp_itemsize) {
            PyErr_SetString(PyExc_TypeError, "add_records(): classes must be tuple subclasses without __dict__");
            return NULL;
        }
        cls[k] = (PyTypeObject *)c;
    }
    return build_line(args, cls, NULL);
}

static PyObject *
add_raw_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_common(args, nargs, "add_raw_rows") < 0) {
        return NULL;
    }
    PyObject *encoders = args[7];
    if (!PyTuple_CheckExact(encoders) || PyTuple_GET_SIZE(encoders) != 3) {
        PyErr_SetString(PyExc_TypeError, "add_raw_rows(): encoders must be (encode, fallback, scalar)");
        return NULL;
    }
    Encoders enc = {PyTuple_GET_ITEM(encoders, 0), PyTuple_GET_ITEM(encoders, 1), PyTuple_GET_ITEM(encoders, 2)};
    return build_line(args, NULL, &enc);
}

static PyMethodDef records_methods[] = {
    {"add_records", (PyCFunction)(void (*)(void))add_records, METH_FASTCALL,
     "add_records(records, chans, offset, proc, spans, events, counters, classes, shared, dropped)\n--\n\n"
     "Append one raw line's records to spans/events/counters (see service_profiler/rawdata/rawentries.py)."},
    {"add_raw_rows", (PyCFunction)(void (*)(void))add_raw_rows, METH_FASTCALL,
     "add_raw_rows(records, chans, offset, proc, spans, events, counters, encoders, shared, dropped)\n--\n\n"
     "add_records, but SQLite rows of the raw tables (see service_profiler/analyze/sqlite_export.py)."},
    {NULL, NULL, 0, NULL},
};

static int
records_exec(PyObject *module)
{
    str_rid = PyUnicode_InternFromString("rid");
    str_reqs = PyUnicode_InternFromString("reqs");
    str_batch_id = PyUnicode_InternFromString("batch_id");
    str_schedule_span = PyUnicode_InternFromString("batchFrameworkProcessing");
    return (str_rid == NULL || str_reqs == NULL || str_batch_id == NULL || str_schedule_span == NULL) ? -1 : 0;
}

static PyModuleDef_Slot records_slots[] = {
    {Py_mod_exec, (void *)records_exec},
    {0, NULL},
};

PyDoc_STRVAR(records_doc, "C fast path of the raw reader's per-record loop (service_profiler/rawdata/rawentries.py).");

static struct PyModuleDef records_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "service_profiler.rawdata._records",
    .m_doc = records_doc,
    .m_size = 0,
    .m_methods = records_methods,
    .m_slots = records_slots,
};

PyMODINIT_FUNC
PyInit__records(void)
{
    return PyModuleDef_Init(&records_module);
}
