/*
 * service_profiler.runtime._speedups: a C dispatcher that makes an installed-but-inactive probe almost free.
 *
 * ProbeSwitch(original, wrapper, *, active=False) is a callable that forwards every call, with the
 * exact same positional arguments and keyword names, to `wrapper` while `active` is true and to
 * `original` otherwise. The call path is one flag test and one PyObject_Vectorcall: no tuple, no
 * dict, no frame. It binds like a Python function (tp_descr_get + Py_TPFLAGS_METHOD_DESCRIPTOR), so
 * `Cls.method = switch` works as an instance method, and classmethod(switch) / staticmethod(switch)
 * work as they do for any callable. It has a __dict__ (functools.update_wrapper can copy __name__,
 * __qualname__, __doc__, __module__, __wrapped__ so inspect.signature() follows to the original),
 * weak-reference support and full cyclic-GC support.
 *
 * Thread safety: `active` is a C int read and written with the GIL held. A caller that sees the old
 * value during a toggle simply runs the other callable; the Python wrapper re-checks its own flag.
 *
 * Built with the full (non-limited) C API because vectorcall is only in the limited API from 3.12;
 * the extension is compiled per Python version (3.10 - 3.13).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h> /* offsetof */

#if PY_VERSION_HEX < 0x030C0000
/* 3.10 / 3.11: PyMemberDef's type codes and flags live in structmember.h under their old names. */
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall; /* tp_vectorcall_offset points here */
    int active;
    PyObject *original;
    PyObject *wrapper;
    PyObject *dict;        /* tp_dictoffset */
    PyObject *weakreflist; /* tp_weaklistoffset */
} ProbeSwitch;

/* ------------------------------------------------------------------------------------------------ */
/* The call path. */

static PyObject *
ProbeSwitch_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    ProbeSwitch *self = (ProbeSwitch *)op;
    /* original / wrapper are never NULL while the object is alive (tp_clear swaps in None), and the
     * caller owns a reference to `op` for the duration of the call, so borrowing them is safe.
     * nargsf is forwarded unchanged: the PY_VECTORCALL_ARGUMENTS_OFFSET permission to scribble on
     * args[-1] is the caller's, and we hand the very same vector down. */
    return PyObject_Vectorcall(self->active ? self->wrapper : self->original, args, nargsf, kwnames);
}

/* ------------------------------------------------------------------------------------------------ */
/* Construction and lifetime. */

static PyObject *
ProbeSwitch_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"original", "wrapper", "active", NULL};
    PyObject *original, *wrapper;
    int active = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$p:ProbeSwitch", kwlist, &original, &wrapper,
                                     &active)) {
        return NULL;
    }
    if (!PyCallable_Check(original)) {
        PyErr_Format(PyExc_TypeError, "ProbeSwitch: original must be callable, not %.200s",
                     Py_TYPE(original)->tp_name);
        return NULL;
    }
    if (!PyCallable_Check(wrapper)) {
        PyErr_Format(PyExc_TypeError, "ProbeSwitch: wrapper must be callable, not %.200s",
                     Py_TYPE(wrapper)->tp_name);
        return NULL;
    }

    ProbeSwitch *self = (ProbeSwitch *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = ProbeSwitch_vectorcall;
    self->active = active;
    Py_INCREF(original);
    self->original = original;
    Py_INCREF(wrapper);
    self->wrapper = wrapper;
    self->dict = NULL;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

static int
ProbeSwitch_traverse(PyObject *op, visitproc visit, void *arg)
{
    ProbeSwitch *self = (ProbeSwitch *)op;
    Py_VISIT(self->original);
    Py_VISIT(self->wrapper);
    Py_VISIT(self->dict);
    return 0;
}

static int
ProbeSwitch_clear(PyObject *op)
{
    ProbeSwitch *self = (ProbeSwitch *)op;
    /* Break reference cycles, but keep the call path free of NULL checks: a (pathological) call
     * after tp_clear finds None and raises "'NoneType' object is not callable". */
    Py_INCREF(Py_None);
    Py_SETREF(self->original, Py_None);
    Py_INCREF(Py_None);
    Py_SETREF(self->wrapper, Py_None);
    Py_CLEAR(self->dict);
    return 0;
}

static void
ProbeSwitch_dealloc(PyObject *op)
{
    ProbeSwitch *self = (ProbeSwitch *)op;
    PyObject_GC_UnTrack(op);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs(op);
    }
    Py_CLEAR(self->original);
    Py_CLEAR(self->wrapper);
    Py_CLEAR(self->dict);
    Py_TYPE(op)->tp_free(op);
}

/* ------------------------------------------------------------------------------------------------ */
/* Binding: behave like a Python function. */

/* tp_descr_get of ProbeSwitch and HandlerCall: on a class, each binds to an instance as a function does. */
static PyObject *
bind_like_function(PyObject *op, PyObject *obj, PyObject *type)
{
    (void)type;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(op);
        return op;
    }
    return PyMethod_New(op, obj);
}

/* ------------------------------------------------------------------------------------------------ */
/* Attributes. */

static PyObject *
ProbeSwitch_get_active(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((ProbeSwitch *)op)->active);
}

static int
ProbeSwitch_set_active(PyObject *op, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete the 'active' attribute of a ProbeSwitch");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0) {
        return -1;
    }
    ((ProbeSwitch *)op)->active = truth;
    return 0;
}

static PyGetSetDef ProbeSwitch_getset[] = {
    {"active", ProbeSwitch_get_active, ProbeSwitch_set_active,
     "True: calls go to `wrapper`; False: calls go straight to `original`.", NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef ProbeSwitch_members[] = {
    {"original", Py_T_OBJECT_EX, offsetof(ProbeSwitch, original), Py_READONLY,
     "The callable used while the switch is inactive."},
    {"wrapper", Py_T_OBJECT_EX, offsetof(ProbeSwitch, wrapper), Py_READONLY,
     "The callable used while the switch is active."},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
ProbeSwitch_repr(PyObject *op)
{
    ProbeSwitch *self = (ProbeSwitch *)op;
    PyObject *original = self->original;
    PyObject *result;
    /* Guard against a cycle through `original`'s own repr. */
    int status = Py_ReprEnter(op);
    if (status != 0) {
        return status > 0 ? PyUnicode_FromString("<ProbeSwitch ...>") : NULL;
    }
    Py_INCREF(original);
    result = PyUnicode_FromFormat("<ProbeSwitch active=%s for %R>", self->active ? "True" : "False",
                                  original);
    Py_DECREF(original);
    Py_ReprLeave(op);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Type and module. */

PyDoc_STRVAR(ProbeSwitch_doc,
"ProbeSwitch(original, wrapper, *, active=False)\n"
"--\n"
"\n"
"A callable that forwards each call, arguments unchanged, to `wrapper` while `active` is true\n"
"and to `original` otherwise. Binds like a function when stored on a class.\n"
"Has a __dict__ (use functools.update_wrapper) and supports weak references.");

static PyTypeObject ProbeSwitch_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "service_profiler.runtime._speedups.ProbeSwitch",
    .tp_basicsize = sizeof(ProbeSwitch),
    .tp_itemsize = 0,
    .tp_dealloc = ProbeSwitch_dealloc,
    .tp_vectorcall_offset = offsetof(ProbeSwitch, vectorcall),
    .tp_repr = ProbeSwitch_repr,
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    /* Not a base type: a subclass overriding __call__ would be silently bypassed by vectorcall. */
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = ProbeSwitch_doc,
    .tp_traverse = ProbeSwitch_traverse,
    .tp_clear = ProbeSwitch_clear,
    .tp_weaklistoffset = offsetof(ProbeSwitch, weakreflist),
    .tp_members = ProbeSwitch_members,
    .tp_getset = ProbeSwitch_getset,
    .tp_descr_get = bind_like_function,
    .tp_dictoffset = offsetof(ProbeSwitch, dict),
    .tp_new = ProbeSwitch_new,
    .tp_free = PyObject_GC_Del,
};

/* ------------------------------------------------------------------------------------------------ */
/* HandlerCall(fn, handler, probe, on_error, *, is_method): a custom handler's wrapper, in C.
 *
 * The same contract as probes.make_handler_wrapper's Python wrapper, which it replaces where the probe
 * has no caller filter: while `probe.active` is false it forwards to `fn`; otherwise it calls
 * `handler(original_func, this, *args, **kwargs)` (`this` is None for a plain function), where
 * `original_func` runs `fn` at most once and remembers its result or exception. Whatever the handler
 * raises, BaseException included, is passed to `on_error` and never reaches the caller, except the
 * original's own exception. If the handler never called the original, it is called now; if the
 * handler swallowed the original's exception, it is raised again; else the original's result is
 * returned. On the handlers' path this saves the Python wrapper's frame, the OriginalCall object's
 * construction and its __call__ frame, and two packings of *args / **kwargs. */

/* The raised exception, normalized, taken out of the thread state (new reference; NULL if none). */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise the exception instance `exc` again, with its traceback (borrows `exc`). */
static void
raise_again(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(Py_NewRef(exc));
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), Py_NewRef(exc), PyException_GetTraceback(exc));
#endif
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
    PyObject *result; /* the original's result once it returned */
    PyObject *error;  /* the original's exception once it raised */
    int done;
    int is_method;
} OriginalCall;

static PyObject *
OriginalCall_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    OriginalCall *self = (OriginalCall *)op;
    if (self->done) { /* a second call: the first one's outcome, the engine's code is not run twice */
        if (self->error != NULL) {
            raise_again(self->error);
            return NULL;
        }
        return Py_NewRef(self->result != NULL ? self->result : Py_None);
    }
    self->done = 1;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *result;
    if (self->is_method || nargs == 0) {
        result = PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    }
    else { /* called as original_func(None, *args): the rest of the vector is the original's */
        result = PyObject_Vectorcall(self->fn, args + 1, (size_t)(nargs - 1), kwnames);
    }
    if (result == NULL) {
        PyObject *exc = take_exception();
        if (exc == NULL) {
            PyErr_SetString(PyExc_SystemError, "the original returned NULL without an exception");
            exc = take_exception();
        }
        Py_XSETREF(self->error, exc);
        if (exc != NULL) {
            raise_again(exc);
        }
        return NULL;
    }
    Py_XSETREF(self->result, Py_NewRef(result));
    return result;
}

static int
OriginalCall_traverse(PyObject *op, visitproc visit, void *arg)
{
    OriginalCall *self = (OriginalCall *)op;
    Py_VISIT(self->fn);
    Py_VISIT(self->result);
    Py_VISIT(self->error); /* error -> traceback -> the handler's frame -> this object */
    return 0;
}

static int
OriginalCall_clear(PyObject *op)
{
    OriginalCall *self = (OriginalCall *)op;
    Py_CLEAR(self->result);
    Py_CLEAR(self->error);
    /* `fn` stays (None after a clear would make a later call raise): it cannot be part of a cycle
     * through this object, which is made per call and reachable only from the handler. */
    return 0;
}

static void
OriginalCall_dealloc(PyObject *op)
{
    OriginalCall *self = (OriginalCall *)op;
    PyObject_GC_UnTrack(op);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->result);
    Py_CLEAR(self->error);
    PyObject_GC_Del(op);
}

static PyTypeObject OriginalCall_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "service_profiler.runtime._speedups.OriginalCall",
    .tp_basicsize = sizeof(OriginalCall),
    .tp_dealloc = OriginalCall_dealloc,
    .tp_vectorcall_offset = offsetof(OriginalCall, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "What a handler receives as original_func: runs the original at most once.",
    .tp_traverse = OriginalCall_traverse,
    .tp_clear = OriginalCall_clear,
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
    PyObject *handler;
    PyObject *probe;
    PyObject *on_error;
    int is_method;
    PyObject *dict;
    PyObject *weakreflist;
} HandlerCall;

static PyObject *str_active; /* "active", interned at module exec */

static int
probe_is_active(PyObject *probe)
{
    PyObject *value = PyObject_GetAttr(probe, str_active);
    if (value == NULL) {
        PyErr_Clear();
        return 0;
    }
    int truth = value == Py_True ? 1 : value == Py_False ? 0 : PyObject_IsTrue(value);
    Py_DECREF(value);
    if (truth < 0) {
        PyErr_Clear();
        return 0;
    }
    return truth;
}

#define SMALL_VECTOR 8

static PyObject *
HandlerCall_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    HandlerCall *self = (HandlerCall *)op;
    if (!probe_is_active(self->probe)) {
        return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t extra = self->is_method ? 1 : 2; /* original_func, and None for `this` */
    Py_ssize_t total = nargs + nkw + extra;
    PyObject *small[SMALL_VECTOR];
    PyObject **vector = small;
    OriginalCall *original = PyObject_GC_New(OriginalCall, &OriginalCall_Type);
    if (original != NULL && total > SMALL_VECTOR) {
        vector = PyMem_Malloc((size_t)total * sizeof(PyObject *));
    }
    if (original == NULL || vector == NULL) { /* no memory for the profiler: the engine's call goes on */
        PyErr_Clear();
        if (original != NULL) {
            original->fn = original->result = original->error = NULL;
            Py_DECREF(original);
        }
        return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    }
    original->vectorcall = OriginalCall_vectorcall;
    original->fn = Py_NewRef(self->fn);
    original->result = NULL;
    original->error = NULL;
    original->done = 0;
    original->is_method = self->is_method;
    PyObject_GC_Track((PyObject *)original);

    vector[0] = (PyObject *)original;
    if (!self->is_method) {
        vector[1] = Py_None;
    }
    if (nargs + nkw > 0) {
        memcpy(vector + extra, args, (size_t)(nargs + nkw) * sizeof(PyObject *));
    }
    PyObject *handled = PyObject_Vectorcall(self->handler, vector, (size_t)(nargs + extra), kwnames);
    if (vector != small) {
        PyMem_Free(vector);
    }
    if (handled == NULL) {
        PyObject *exc = take_exception();
        if (exc != NULL && exc == original->error) { /* the engine's own exception, unchanged */
            raise_again(exc);
            Py_DECREF(exc);
            Py_DECREF(original);
            return NULL;
        }
        /* anything else the handler raised is the profiler's problem, never the host's */
        PyObject *noted = PyObject_CallOneArg(self->on_error, exc != NULL ? exc : Py_None);
        if (noted == NULL) {
            PyErr_Clear();
        }
        Py_XDECREF(noted);
        Py_XDECREF(exc);
    }
    else {
        Py_DECREF(handled);
    }
    PyObject *result;
    if (!original->done) { /* the handler failed before (or forgot) calling the original */
        result = PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    }
    else if (original->error != NULL) { /* a handler that swallowed the engine's exception */
        raise_again(original->error);
        result = NULL;
    }
    else {
        result = Py_NewRef(original->result != NULL ? original->result : Py_None);
    }
    Py_DECREF(original);
    return result;
}

static PyObject *
HandlerCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fn", "handler", "probe", "on_error", "is_method", NULL};
    PyObject *fn, *handler, *probe, *on_error;
    int is_method = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$p:HandlerCall", kwlist, &fn, &handler, &probe,
                                     &on_error, &is_method)) {
        return NULL;
    }
    if (!PyCallable_Check(fn) || !PyCallable_Check(handler) || !PyCallable_Check(on_error)) {
        PyErr_SetString(PyExc_TypeError, "HandlerCall: fn, handler and on_error must be callable");
        return NULL;
    }
    HandlerCall *self = (HandlerCall *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = HandlerCall_vectorcall;
    self->fn = Py_NewRef(fn);
    self->handler = Py_NewRef(handler);
    self->probe = Py_NewRef(probe);
    self->on_error = Py_NewRef(on_error);
    self->is_method = is_method;
    self->dict = NULL;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

static int
HandlerCall_traverse(PyObject *op, visitproc visit, void *arg)
{
    HandlerCall *self = (HandlerCall *)op;
    Py_VISIT(self->fn);
    Py_VISIT(self->handler);
    Py_VISIT(self->probe);
    Py_VISIT(self->on_error);
    Py_VISIT(self->dict);
    return 0;
}

static int
HandlerCall_clear(PyObject *op)
{
    HandlerCall *self = (HandlerCall *)op;
    /* As ProbeSwitch: None instead of NULL keeps the call path free of checks. */
    Py_SETREF(self->fn, Py_NewRef(Py_None));
    Py_SETREF(self->handler, Py_NewRef(Py_None));
    Py_SETREF(self->probe, Py_NewRef(Py_None));
    Py_SETREF(self->on_error, Py_NewRef(Py_None));
    Py_CLEAR(self->dict);
    return 0;
}

static void
HandlerCall_dealloc(PyObject *op)
{
    HandlerCall *self = (HandlerCall *)op;
    PyObject_GC_UnTrack(op);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs(op);
    }
    Py_CLEAR(self->fn);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->probe);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->dict);
    Py_TYPE(op)->tp_free(op);
}

static PyGetSetDef HandlerCall_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef HandlerCall_members[] = {
    {"fn", Py_T_OBJECT_EX, offsetof(HandlerCall, fn), Py_READONLY, "The wrapped original."},
    {"handler", Py_T_OBJECT_EX, offsetof(HandlerCall, handler), Py_READONLY, "The custom handler."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HandlerCall_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "service_profiler.runtime._speedups.HandlerCall",
    .tp_basicsize = sizeof(HandlerCall),
    .tp_dealloc = HandlerCall_dealloc,
    .tp_vectorcall_offset = offsetof(HandlerCall, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "HandlerCall(fn, handler, probe, on_error, *, is_method=False)\n--\n\n"
              "A custom handler's wrapper: handler(original_func, this, *args, **kwargs) while probe.active,\n"
              "with the host-first guarantees of probes.make_handler_wrapper. Binds like a function.",
    .tp_traverse = HandlerCall_traverse,
    .tp_clear = HandlerCall_clear,
    .tp_weaklistoffset = offsetof(HandlerCall, weakreflist),
    .tp_members = HandlerCall_members,
    .tp_getset = HandlerCall_getset,
    .tp_descr_get = bind_like_function,
    .tp_dictoffset = offsetof(HandlerCall, dict),
    .tp_new = HandlerCall_new,
    .tp_free = PyObject_GC_Del,
};

/* ------------------------------------------------------------------------------------------------ */
/* encode_rec_line(records) -> str | None: one `rec` line of the raw format, `{"t":"rec","r":[...]}`.
 *
 * The writer thread's encoding holds the GIL the engine needs; the stdlib's C encoder makes a new
 * string object for every key, number and string it writes. This one writes into one buffer. It
 * handles only what records are made of: exact dict (str keys), list, tuple, str, int (64-bit), float,
 * bool and None, nested at most MAX_DEPTH deep. For anything else it returns None and the caller encodes
 * the line with the stdlib's encoder, so every line it does write is byte for byte what
 * json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False) would write (the
 * tests compare the two). No Python code runs while it encodes (only exact built-in types are read),
 * so nothing it reads can change under it. */

#define MAX_DEPTH 32
#define UNSUPPORTED 1 /* a value the stdlib encoder must write; not an error */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buffer;

static int
buffer_reserve(Buffer *buf, Py_ssize_t extra)
{
    if (buf->len + extra <= buf->cap) {
        return 0;
    }
    Py_ssize_t cap = buf->cap ? buf->cap : 4096;
    while (cap < buf->len + extra) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *data = PyMem_Realloc(buf->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buf->data = data;
    buf->cap = cap;
    return 0;
}

static int
buffer_write(Buffer *buf, const char *bytes, Py_ssize_t n)
{
    if (buffer_reserve(buf, n) < 0) {
        return -1;
    }
    memcpy(buf->data + buf->len, bytes, (size_t)n);
    buf->len += n;
    return 0;
}

static int
encode_string(Buffer *buf, PyObject *str)
{
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(str, &n);
    if (utf8 == NULL) { /* lone surrogates: the stdlib writes them, and the file write reports it */
        PyErr_Clear();
        return UNSUPPORTED;
    }
    /* worst case: every byte a \u00XX escape */
    if (n > (PY_SSIZE_T_MAX - 2) / 6 || buffer_reserve(buf, 6 * n + 2) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        return -1;
    }
    static const char hex[] = "0123456789abcdef";
    char *out = buf->data + buf->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)utf8[i];
        switch (c) {
        case '"': *out++ = '\\'; *out++ = '"'; break;
        case '\\': *out++ = '\\'; *out++ = '\\'; break;
        case '\b': *out++ = '\\'; *out++ = 'b'; break;
        case '\f': *out++ = '\\'; *out++ = 'f'; break;
        case '\n': *out++ = '\\'; *out++ = 'n'; break;
        case '\r': *out++ = '\\'; *out++ = 'r'; break;
        case '\t': *out++ = '\\'; *out++ = 't'; break;
        default:
            if (c < 0x20) {
                *out++ = '\\'; *out++ = 'u'; *out++ = '0'; *out++ = '0';
                *out++ = hex[c >> 4]; *out++ = hex[c & 0xf];
            }
            else {
                *out++ = (char)c; /* UTF-8 passes through: ensure_ascii=False */
            }
        }
    }
    *out++ = '"';
    buf->len = out - buf->data;
    return 0;
}

static int
encode_int(Buffer *buf, PyObject *obj)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow) {
        return UNSUPPORTED;
    }
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    char digits[24];
    char *end = digits + sizeof(digits);
    char *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) {
        *--p = '-';
    }
    return buffer_write(buf, p, end - p);
}

static int
encode_float(Buffer *buf, PyObject *obj)
{
    double d = PyFloat_AS_DOUBLE(obj);
    if (Py_IS_NAN(d)) {
        return buffer_write(buf, "NaN", 3);
    }
    if (Py_IS_INFINITY(d)) {
        return d > 0 ? buffer_write(buf, "Infinity", 8) : buffer_write(buf, "-Infinity", 9);
    }
    /* float.__repr__, which the stdlib encoder calls */
    char *text = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        return -1;
    }
    int rc = buffer_write(buf, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return rc;
}

static int encode_value(Buffer *buf, PyObject *obj, int depth);

static int
encode_items(Buffer *buf, PyObject *const *items, Py_ssize_t n, int depth)
{
    if (buffer_write(buf, "[", 1) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && buffer_write(buf, ",", 1) < 0) {
            return -1;
        }
        int rc = encode_value(buf, items[i], depth + 1);
        if (rc) {
            return rc;
        }
    }
    return buffer_write(buf, "]", 1);
}

static int
encode_dict(Buffer *buf, PyObject *dict, int depth)
{
    if (buffer_write(buf, "{", 1) < 0) {
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    int first = 1;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key)) {
            return UNSUPPORTED; /* the stdlib turns numbers, bools and None into keys */
        }
        if (!first && buffer_write(buf, ",", 1) < 0) {
            return -1;
        }
        first = 0;
        int rc = encode_string(buf, key);
        if (rc) {
            return rc;
        }
        if (buffer_write(buf, ":", 1) < 0) {
            return -1;
        }
        rc = encode_value(buf, value, depth + 1);
        if (rc) {
            return rc;
        }
    }
    return buffer_write(buf, "}", 1);
}

static int
encode_value(Buffer *buf, PyObject *obj, int depth)
{
    if (depth > MAX_DEPTH) {
        return UNSUPPORTED;
    }
    if (obj == Py_None) {
        return buffer_write(buf, "null", 4);
    }
    if (obj == Py_True) {
        return buffer_write(buf, "true", 4);
    }
    if (obj == Py_False) {
        return buffer_write(buf, "false", 5);
    }
    if (PyUnicode_CheckExact(obj)) {
        return encode_string(buf, obj);
    }
    if (PyLong_CheckExact(obj)) {
        return encode_int(buf, obj);
    }
    if (PyFloat_CheckExact(obj)) {
        return encode_float(buf, obj);
    }
    if (PyTuple_CheckExact(obj)) {
        return encode_items(buf, &PyTuple_GET_ITEM(obj, 0), PyTuple_GET_SIZE(obj), depth);
    }
    if (PyList_CheckExact(obj)) {
        return encode_items(buf, PySequence_Fast_ITEMS(obj), PyList_GET_SIZE(obj), depth);
    }
    if (PyDict_CheckExact(obj)) {
        return encode_dict(buf, obj, depth);
    }
    return UNSUPPORTED;
}

static PyObject *
encode_rec_line(PyObject *module, PyObject *records)
{
    (void)module;
    if (!PyList_CheckExact(records)) {
        PyErr_Format(PyExc_TypeError, "encode_rec_line: records must be a list, not %.200s",
                     Py_TYPE(records)->tp_name);
        return NULL;
    }
    Buffer buf = {NULL, 0, 0};
    int rc = buffer_write(&buf, "{\"t\":\"rec\",\"r\":", 15);
    if (rc == 0) {
        rc = encode_items(&buf, PySequence_Fast_ITEMS(records), PyList_GET_SIZE(records), 1);
    }
    if (rc == 0) {
        rc = buffer_write(&buf, "}", 1);
    }
    PyObject *line = NULL;
    if (rc == 0) {
        line = PyUnicode_DecodeUTF8(buf.data, buf.len, "strict");
    }
    else if (rc == UNSUPPORTED) {
        line = Py_NewRef(Py_None);
    }
    PyMem_Free(buf.data);
    return line;
}

/* ------------------------------------------------------------------------------------------------ */
/* Emitter(buffer, channel_ids, declare, count_dropped, now, max_buffered): the recording API's span /
 * event / counter / enabled for the runtime's recorder, one C call each (record.set_sink installs them
 * as record.span & co. while the runtime is the sink).
 *
 * The Python path (record.span -> Runtime.domain_enabled -> Runtime.span) is three Python calls per
 * record, on the engine's thread. The same steps here: nothing while `enabled` is false or the domain is
 * not in `domains` (a frozenset; None keeps all); the channel id of (kind, domain, name) from
 * `channel_ids`, declared through `declare` the first time; the record appended to `buffer` while it
 * holds fewer than `max_buffered`, else `count_dropped()`. The records are the tuples the writer
 * thread encodes: span (chan, start_ns, end_ns, tid, attrs), event (chan, ts_ns, tid, attrs), counter
 * (chan, ts_ns, dict(values)); tid is threading.get_ident(), a missing ts_ns is now(). Nothing here
 * raises into the caller, except a TypeError for arguments that do not fit the signature (as a Python
 * function would raise). */

typedef struct {
    PyObject_HEAD
    int enabled;
    PyObject *domains;
    PyObject *buffer;
    PyObject *channel_ids;
    PyObject *declare;
    PyObject *count_dropped;
    PyObject *now;
    Py_ssize_t max_buffered;
} Emitter;

static PyObject *str_span, *str_event, *str_counter; /* the recorder's record kinds, interned */

/* Match positional and keyword arguments to `names` (borrowed references into `out`, NULL where not
 * given); a TypeError for too many, unknown, repeated or missing (the first `required`) arguments. */
static int
match_arguments(const char *function, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                const char *const *names, Py_ssize_t required, Py_ssize_t total, PyObject **out)
{
    if (nargs > total) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", function, total, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < total; i++) {
        out[i] = i < nargs ? args[i] : NULL;
    }
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        while (i < total && PyUnicode_CompareWithASCIIString(key, names[i]) != 0) {
            i++;
        }
        if (i == total || out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got %s argument %R", function,
                         i == total ? "an unexpected keyword" : "multiple values for", key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", function, names[i]);
            return -1;
        }
    }
    return 0;
}

/* 1 where a record of `domain` is kept now; 0 otherwise (also for a domain that cannot be looked up). */
static int
emitter_keeps(Emitter *self, PyObject *domain)
{
    if (!self->enabled) {
        return 0;
    }
    if (self->domains == Py_None) {
        return 1;
    }
    int found = PySet_Contains(self->domains, domain);
    if (found < 0) {
        PyErr_Clear();
        return 0;
    }
    return found;
}

/* The channel id of (kind, domain, name) (new reference), declared on first use; NULL on an error. */
static PyObject *
emitter_channel(Emitter *self, PyObject *kind, PyObject *domain, PyObject *name)
{
    PyObject *key = PyTuple_Pack(3, kind, domain, name);
    if (key == NULL) {
        return NULL;
    }
    PyObject *chan = PyDict_GetItemWithError(self->channel_ids, key);
    Py_DECREF(key);
    if (chan != NULL) {
        return Py_NewRef(chan);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *declare_args[3] = {kind, domain, name};
    return PyObject_Vectorcall(self->declare, declare_args, 3, NULL);
}

/* Append `record` (a new reference, stolen; NULL after a failure) to the buffer, or count it dropped when
 * the buffer is full. A failure costs this record only: its error is cleared. */
static void
emitter_append(Emitter *self, PyObject *record)
{
    if (record == NULL) {
        PyErr_Clear();
        return;
    }
    if (PyList_GET_SIZE(self->buffer) < self->max_buffered) {
        if (PyList_Append(self->buffer, record) < 0) {
            PyErr_Clear();
        }
    }
    else {
        PyObject *counted = PyObject_CallNoArgs(self->count_dropped);
        if (counted == NULL) {
            PyErr_Clear();
        }
        Py_XDECREF(counted);
    }
    Py_DECREF(record);
}

/* ts_ns as given, or now() (new reference; NULL on an error). */
static PyObject *
emitter_timestamp(Emitter *self, PyObject *ts_ns)
{
    if (ts_ns != NULL && ts_ns != Py_None) {
        return Py_NewRef(ts_ns);
    }
    return PyObject_CallNoArgs(self->now);
}

static const char *const span_names[] = {"domain", "name", "start_ns", "end_ns", "attrs"};
static const char *const event_names[] = {"domain", "name", "attrs", "ts_ns"};
static const char *const counter_names[] = {"domain", "name", "values", "ts_ns"};

static PyObject *
Emitter_span(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Emitter *self = (Emitter *)op;
    PyObject *a[5];
    if (match_arguments("span", args, nargs, kwnames, span_names, 4, 5, a) < 0) {
        return NULL;
    }
    if (emitter_keeps(self, a[0])) {
        PyObject *chan = emitter_channel(self, str_span, a[0], a[1]);
        PyObject *tid = chan != NULL ? PyLong_FromUnsignedLong(PyThread_get_thread_ident()) : NULL;
        emitter_append(self, tid != NULL ? PyTuple_Pack(5, chan, a[2], a[3], tid, a[4] != NULL ? a[4] : Py_None)
                                         : NULL);
        Py_XDECREF(chan);
        Py_XDECREF(tid);
    }
    Py_RETURN_NONE;
}

static PyObject *
Emitter_event(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Emitter *self = (Emitter *)op;
    PyObject *a[4];
    if (match_arguments("event", args, nargs, kwnames, event_names, 2, 4, a) < 0) {
        return NULL;
    }
    if (emitter_keeps(self, a[0])) {
        PyObject *chan = emitter_channel(self, str_event, a[0], a[1]);
        PyObject *ts = chan != NULL ? emitter_timestamp(self, a[3]) : NULL;
        PyObject *tid = ts != NULL ? PyLong_FromUnsignedLong(PyThread_get_thread_ident()) : NULL;
        emitter_append(self, tid != NULL ? PyTuple_Pack(4, chan, ts, tid, a[2] != NULL ? a[2] : Py_None) : NULL);
        Py_XDECREF(chan);
        Py_XDECREF(ts);
        Py_XDECREF(tid);
    }
    Py_RETURN_NONE;
}

static PyObject *
Emitter_counter(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Emitter *self = (Emitter *)op;
    PyObject *a[4];
    if (match_arguments("counter", args, nargs, kwnames, counter_names, 3, 4, a) < 0) {
        return NULL;
    }
    if (emitter_keeps(self, a[0])) {
        PyObject *chan = emitter_channel(self, str_counter, a[0], a[1]);
        PyObject *ts = chan != NULL ? emitter_timestamp(self, a[3]) : NULL;
        /* a copy, as the Python path's dict(values): the caller may change its mapping afterwards */
        PyObject *values = ts == NULL ? NULL
                           : PyDict_CheckExact(a[2]) ? PyDict_Copy(a[2])
                                                     : PyObject_CallOneArg((PyObject *)&PyDict_Type, a[2]);
        emitter_append(self, values != NULL ? PyTuple_Pack(3, chan, ts, values) : NULL);
        Py_XDECREF(chan);
        Py_XDECREF(ts);
        Py_XDECREF(values);
    }
    Py_RETURN_NONE;
}

static PyObject *
Emitter_enabled(PyObject *op, PyObject *domain)
{
    return PyBool_FromLong(emitter_keeps((Emitter *)op, domain));
}

static PyObject *
Emitter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "channel_ids", "declare", "count_dropped", "now", "max_buffered", NULL};
    PyObject *buffer, *channel_ids, *declare, *count_dropped, *now;
    Py_ssize_t max_buffered;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OOOn:Emitter", kwlist, &PyList_Type, &buffer, &PyDict_Type,
                                     &channel_ids, &declare, &count_dropped, &now, &max_buffered)) {
        return NULL;
    }
    if (!PyList_CheckExact(buffer) || !PyDict_CheckExact(channel_ids)) {
        PyErr_SetString(PyExc_TypeError, "Emitter: buffer must be a list and channel_ids a dict, not subclasses");
        return NULL;
    }
    if (!PyCallable_Check(declare) || !PyCallable_Check(count_dropped) || !PyCallable_Check(now)) {
        PyErr_SetString(PyExc_TypeError, "Emitter: declare, count_dropped and now must be callable");
        return NULL;
    }
    Emitter *self = (Emitter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->enabled = 0;
    self->domains = Py_NewRef(Py_None);
    self->buffer = Py_NewRef(buffer);
    self->channel_ids = Py_NewRef(channel_ids);
    self->declare = Py_NewRef(declare);
    self->count_dropped = Py_NewRef(count_dropped);
    self->now = Py_NewRef(now);
    self->max_buffered = max_buffered;
    return (PyObject *)self;
}

static int
Emitter_traverse(PyObject *op, visitproc visit, void *arg)
{
    Emitter *self = (Emitter *)op;
    Py_VISIT(self->domains);
    Py_VISIT(self->buffer);
    Py_VISIT(self->channel_ids);
    Py_VISIT(self->declare);
    Py_VISIT(self->count_dropped);
    Py_VISIT(self->now);
    return 0;
}

static int
Emitter_clear(PyObject *op)
{
    Emitter *self = (Emitter *)op;
    /* Off for good: the methods then never reach the fields cleared here. */
    self->enabled = 0;
    Py_CLEAR(self->buffer);
    Py_CLEAR(self->channel_ids);
    Py_CLEAR(self->declare);
    Py_CLEAR(self->count_dropped);
    Py_CLEAR(self->now);
    Py_INCREF(Py_None);
    Py_SETREF(self->domains, Py_None);
    return 0;
}

static void
Emitter_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    Emitter_clear(op);
    Py_CLEAR(((Emitter *)op)->domains);
    Py_TYPE(op)->tp_free(op);
}

static PyObject *
Emitter_get_enabled(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((Emitter *)op)->enabled);
}

static int
Emitter_set_enabled(PyObject *op, PyObject *value, void *closure)
{
    (void)closure;
    Emitter *self = (Emitter *)op;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete the 'enabled' attribute of an Emitter");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0) {
        return -1;
    }
    if (truth && self->buffer == NULL) {
        PyErr_SetString(PyExc_ValueError, "this Emitter was cleared");
        return -1;
    }
    self->enabled = truth;
    return 0;
}

static PyObject *
Emitter_get_domains(PyObject *op, void *closure)
{
    (void)closure;
    return Py_NewRef(((Emitter *)op)->domains);
}

static int
Emitter_set_domains(PyObject *op, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL || (value != Py_None && !PyAnySet_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "Emitter.domains must be a frozenset or None");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(((Emitter *)op)->domains, value);
    return 0;
}

static PyGetSetDef Emitter_getset[] = {
    {"enabled", Emitter_get_enabled, Emitter_set_enabled, "Records are kept (collection is on).", NULL},
    {"domains", Emitter_get_domains, Emitter_set_domains, "The domains kept (a frozenset), or None: all.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Emitter_methods[] = {
    {"span", (PyCFunction)(void (*)(void))Emitter_span, METH_FASTCALL | METH_KEYWORDS,
     "span(domain, name, start_ns, end_ns, attrs=None)"},
    {"event", (PyCFunction)(void (*)(void))Emitter_event, METH_FASTCALL | METH_KEYWORDS,
     "event(domain, name, attrs=None, ts_ns=None)"},
    {"counter", (PyCFunction)(void (*)(void))Emitter_counter, METH_FASTCALL | METH_KEYWORDS,
     "counter(domain, name, values, ts_ns=None)"},
    {"enabled_for", Emitter_enabled, METH_O, "enabled_for(domain): records of `domain` are kept now."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Emitter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "service_profiler.runtime._speedups.Emitter",
    .tp_basicsize = sizeof(Emitter),
    .tp_dealloc = Emitter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Emitter(buffer, channel_ids, declare, count_dropped, now, max_buffered): the recording API "
              "in C for the runtime's recorder.",
    .tp_traverse = Emitter_traverse,
    .tp_clear = Emitter_clear,
    .tp_methods = Emitter_methods,
    .tp_getset = Emitter_getset,
    .tp_new = Emitter_new,
    .tp_free = PyObject_GC_Del,
};

PyDoc_STRVAR(encode_rec_line_doc,
"encode_rec_line(records: list) -> str | None\n\n"
"The raw format's `rec` line of `records` ({\"t\":\"rec\",\"r\":[...]}, compact), byte for byte what the\n"
"stdlib's json encoder writes (ensure_ascii=False); None where a value is not one of the types records\n"
"are made of (exact dict with str keys, list, tuple, str, int within 64 bits, float, bool, None) or is\n"
"nested deeper than 32: the caller then encodes that line with the stdlib.");

static PyMethodDef speedups_methods[] = {
    {"encode_rec_line", encode_rec_line, METH_O, encode_rec_line_doc},
    {NULL, NULL, 0, NULL},
};

static int
speedups_exec(PyObject *module)
{
    str_active = PyUnicode_InternFromString("active");
    str_span = PyUnicode_InternFromString("span");
    str_event = PyUnicode_InternFromString("event");
    str_counter = PyUnicode_InternFromString("counter");
    if (str_active == NULL || str_span == NULL || str_event == NULL || str_counter == NULL ||
        PyType_Ready(&ProbeSwitch_Type) < 0 || PyType_Ready(&OriginalCall_Type) < 0 ||
        PyType_Ready(&HandlerCall_Type) < 0 || PyType_Ready(&Emitter_Type) < 0) {
        return -1;
    }
    if (PyModule_AddType(module, &ProbeSwitch_Type) < 0 || PyModule_AddType(module, &Emitter_Type) < 0) {
        return -1;
    }
    return PyModule_AddType(module, &HandlerCall_Type);
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, (void *)speedups_exec},
    {0, NULL},
};

PyDoc_STRVAR(speedups_doc, "C helpers for service_profiler: ProbeSwitch, a near-zero-cost probe switch; HandlerCall, a custom "
             "handler's wrapper; Emitter, the recording API for the runtime's recorder; and "
             "encode_rec_line, the writer thread's encoder of record lines.");

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "service_profiler.runtime._speedups",
    .m_doc = speedups_doc,
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
    .m_traverse = NULL,
    .m_clear = NULL,
    .m_free = NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
