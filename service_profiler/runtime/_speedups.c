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

static PyObject *
ProbeSwitch_descr_get(PyObject *op, PyObject *obj, PyObject *type)
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
    .tp_descr_get = ProbeSwitch_descr_get,
    .tp_dictoffset = offsetof(ProbeSwitch, dict),
    .tp_new = ProbeSwitch_new,
    .tp_free = PyObject_GC_Del,
};

static int
speedups_exec(PyObject *module)
{
    if (PyType_Ready(&ProbeSwitch_Type) < 0) {
        return -1;
    }
    return PyModule_AddType(module, &ProbeSwitch_Type);
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, (void *)speedups_exec},
    {0, NULL},
};

PyDoc_STRVAR(speedups_doc, "C helpers for service_profiler: ProbeSwitch, a near-zero-cost probe switch.");

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "service_profiler.runtime._speedups",
    .m_doc = speedups_doc,
    .m_size = 0,
    .m_methods = NULL,
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
