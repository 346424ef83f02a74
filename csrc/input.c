/* Reading inputs for the reductions.  See input.h. */
#include "input.h"

/* ----------------------------------------------------------------------------- errors */

static void pd_report_bad(const char *name, npy_intp index, const char *where, double v, double tol)
{
    if (isnan(v))
        PyErr_Format(PyExc_ValueError, "%s contains NaN at index %zd%s", name, (Py_ssize_t)index,
                     where);
    else {
        char vbuf[40], tbuf[40];
        PyOS_snprintf(vbuf, sizeof vbuf, "%.6g", v);
        PyOS_snprintf(tbuf, sizeof tbuf, "%.3g", tol);
        PyErr_Format(PyExc_ValueError,
                     "%s[%zd]%s = %s is positive (above the tolerance %s): log-probabilities "
                     "must be <= 0. These look like negative log-likelihoods (losses) or raw "
                     "logits: pass log-softmax values, or negate the NLLs.",
                     name, (Py_ssize_t)index, where, vbuf, tbuf);
    }
}

/* ----------------------------------------------------------------------------- open */

int pd_src_open(PyObject *adapter, PyObject *in, const char *name, pd_src *src)
{
    PyObject *arr;
    char kind;
    memset(src, 0, sizeof *src);
    if (PyList_Check(in) || PyTuple_Check(in)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(in);
        PyObject *first = n > 0 ? PySequence_Fast_GET_ITEM(in, 0) : NULL;
        /* Nested sequences (2-D data) go through the array path. */
        if (first == NULL ||
            !(PyList_Check(first) || PyTuple_Check(first) || PyArray_Check(first))) {
            Py_INCREF(in);
            src->obj = in;
            src->n = n;
            return 0;
        }
    }
    if (PyArray_CheckExact(in)) {
        Py_INCREF(in);
        arr = in;
    }
    /* ndarray subclasses go through the adapter too: it refuses masked arrays (whose mask would
     * be ignored) and returns a plain view of the others (memmap, matrix) without a copy. */
    else {
        arr = PyObject_CallFunction(adapter, "Os", in, name);
        if (arr == NULL)
            return -1;
        if (!PyArray_Check(arr)) {
            PyErr_Format(PyExc_TypeError, "%s: adapter returned %.100s, not an ndarray", name,
                         Py_TYPE(arr)->tp_name);
            Py_DECREF(arr);
            return -1;
        }
    }
    kind = PyArray_DESCR((PyArrayObject *)arr)->kind;
    if (kind != 'f' && kind != 'i' && kind != 'u' && kind != 'b') {
        if (kind == 'c')
            PyErr_Format(PyExc_TypeError,
                         "%s has complex dtype %S: log-probabilities must be real", name,
                         (PyObject *)PyArray_DESCR((PyArrayObject *)arr));
        else if (kind == 'O')
            PyErr_Format(PyExc_TypeError,
                         "%s is an object array: convert it with np.asarray(x, dtype=float)",
                         name);
        else
            PyErr_Format(PyExc_TypeError,
                         "%s has dtype %S: expected real numbers (float64, float32, float16, "
                         "bfloat16 tensors, integers)",
                         name, (PyObject *)PyArray_DESCR((PyArrayObject *)arr));
        Py_DECREF(arr);
        return -1;
    }
    src->obj = arr;
    src->arr = (PyArrayObject *)arr;
    src->n = PyArray_SIZE(src->arr);
    return 0;
}

void pd_src_close(pd_src *src)
{
    Py_CLEAR(src->obj);
    src->arr = NULL;
}

/* ----------------------------------------------------------------------------- lists */

/* A list item that is not an exact float: ints and bools (as Python's sum() takes them),
 * float subclasses and anything with __float__/__index__ (NumPy scalars). */
static int pd_item_to_double(PyObject *it, const char *name, npy_intp i, double *out)
{
    double d;
    if (PyComplex_Check(it) || PyUnicode_Check(it) || PyBytes_Check(it) || it == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s[%zd] is %.100s, expected a real number", name,
                     (Py_ssize_t)i, Py_TYPE(it)->tp_name);
        return -1;
    }
    Py_INCREF(it); /* __float__ may run Python code that drops the list's reference */
    d = PyFloat_AsDouble(it);
    Py_DECREF(it);
    if (d == -1.0 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] is an integer too large for a float", name,
                         (Py_ssize_t)i);
        }
        else if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s[%zd] is %.100s, expected a real number", name,
                         (Py_ssize_t)i, Py_TYPE(it)->tp_name);
        }
        return -1;
    }
    *out = d;
    return 0;
}

/* The list's items, after checking it still holds n of them: Python code may have run since it
 * was sized (the other input's __array__, an item's __float__, a signal handler). */
static PyObject **pd_seq_items(PyObject *seq, npy_intp n, const char *name)
{
    if (PySequence_Fast_GET_SIZE(seq) < n) {
        PyErr_Format(PyExc_RuntimeError, "%s changed size during the call", name);
        return NULL;
    }
    return PySequence_Fast_ITEMS(seq);
}

/* Items [i, i + m) of the list as doubles into buf (m <= PD_BLOCK): the one conversion loop of
 * list inputs.  All m items are converted before any value is checked. */
static int pd_seq_fill(PyObject *seq, npy_intp n, const char *name, npy_intp i, npy_intp m,
                       double *buf)
{
    PyObject **items = pd_seq_items(seq, n, name); /* checked before every block */
    npy_intp j;
    if (items == NULL)
        return -1;
    for (j = 0; j < m; j++) {
        PyObject *it = items[i + j];
#if defined(__GNUC__)
        /* The float objects are scattered in the heap: fetch ahead, as the loop only needs
         * their 8-byte payloads. */
        if (j + 32 < m)
            __builtin_prefetch(items[i + j + 32]);
#endif
        if (PyFloat_Check(it)) /* float and subclasses (np.float64) */
            buf[j] = PyFloat_AS_DOUBLE(it);
        else {
            /* __float__ may run Python code that resizes the list */
            if (pd_item_to_double(it, name, i + j, &buf[j]) < 0 ||
                (items = pd_seq_items(seq, n, name)) == NULL)
                return -1;
        }
    }
    return 0;
}

/* Values are gathered into a stack block and summed by the float64 kernel: one kernel home. */
static int pd_seq_sum(PyObject *seq, npy_intp n, const char *name, double tol, int mode,
                      pd_acc *acc)
{
    double buf[PD_BLOCK];
    pd_reduce_fn kern = pd_reduce_kernel(PD_F64, mode);
    npy_intp i = 0;
    while (i < n) {
        npy_intp m = n - i < PD_BLOCK ? n - i : PD_BLOCK, r;
        if (pd_seq_fill(seq, n, name, i, m, buf) < 0)
            return -1;
        r = kern((const char *)buf, m, sizeof(double), tol, acc);
        if (r >= 0) {
            pd_report_bad(name, i + r, "", buf[r], tol);
            return -1;
        }
        i += m;
    }
    return 0;
}

/* ----------------------------------------------------------------------------- arrays */

static int pd_native_dtype(PyArrayObject *arr, pd_dtype *dt)
{
    return PyArray_ISNOTSWAPPED(arr) && pd_dtype_of(PyArray_TYPE(arr), 0, dt);
}

/* Kernel calls are cut into runs of PD_SIGNAL_CHUNK values (input.h).  Returns the first bad
 * index, -1, or -2 when a signal handler raised. */

static npy_intp pd_run(pd_reduce_fn kern, pd_dtype dt, int mode, const char *p, npy_intp n,
                       npy_intp s, npy_intp isz, double tol, pd_acc *acc, int nogil)
{
    npy_intp done = 0;
    while (done < n) {
        npy_intp m = n - done < PD_SIGNAL_CHUNK ? n - done : PD_SIGNAL_CHUNK, r;
        PyThreadState *ts = NULL;
        if (nogil && m > 4096)
            ts = PyEval_SaveThread();
        r = s == isz ? kern(p + done * s, m, s, tol, acc)
                     : pd_reduce_strided(dt, mode, p + done * s, m, s, tol, acc);
        if (ts)
            PyEval_RestoreThread(ts);
        if (r >= 0)
            return done + r;
        done += m;
        if (done < n && nogil && PyErr_CheckSignals() < 0)
            return -2;
    }
    return -1;
}

/* Reduce arr with NpyIter in the given order (K for speed, C to locate an error by its flat
 * C-order index).  cast: read through small float64 buffers (byte-swapped, integer, bool,
 * long double).  *bad receives the first bad index in iteration order, or -1. */
static int pd_iter_sum(PyArrayObject *arr, NPY_ORDER order, int cast, pd_dtype dt, double tol,
                       int mode, pd_acc *acc, npy_intp *bad)
{
    npy_uint32 flags = NPY_ITER_EXTERNAL_LOOP | NPY_ITER_ZEROSIZE_OK | NPY_ITER_READONLY;
    PyArray_Descr *dtype = NULL;
    NpyIter *iter;
    NpyIter_IterNextFunc *iternext;
    char **dataptr;
    npy_intp *strideptr, *sizeptr, done = 0, isz;
    pd_reduce_fn kern;
    int needs_api;

    *bad = -1;
    if (cast) {
        flags |= NPY_ITER_BUFFERED | NPY_ITER_GROWINNER | NPY_ITER_NBO | NPY_ITER_ALIGNED;
        dtype = PyArray_DescrFromType(NPY_DOUBLE);
        dt = PD_F64;
    }
    iter = NpyIter_New(arr, flags, order, cast ? NPY_UNSAFE_CASTING : NPY_NO_CASTING, dtype);
    Py_XDECREF(dtype);
    if (iter == NULL)
        return -1;
    if (NpyIter_GetIterSize(iter) == 0)
        return NpyIter_Deallocate(iter) == NPY_SUCCEED ? 0 : -1;
    iternext = NpyIter_GetIterNext(iter, NULL);
    if (iternext == NULL) {
        NpyIter_Deallocate(iter);
        return -1;
    }
    dataptr = NpyIter_GetDataPtrArray(iter);
    strideptr = NpyIter_GetInnerStrideArray(iter);
    sizeptr = NpyIter_GetInnerLoopSizePtr(iter);
    isz = cast ? (npy_intp)sizeof(double) : (npy_intp)PyArray_ITEMSIZE(arr);
    kern = pd_reduce_kernel(dt, mode);
    needs_api = NpyIter_IterationNeedsAPI(iter);
    do {
        npy_intp cnt = *sizeptr, r;
        /* many short inner loops (each too short to release the GIL): every PD_SIGNAL_CHUNK
         * values, let other threads run and check signals */
        if (done / PD_SIGNAL_CHUNK != (done + cnt) / PD_SIGNAL_CHUNK) {
            if (!needs_api)
                PyEval_RestoreThread(PyEval_SaveThread());
            if (PyErr_CheckSignals() < 0) {
                NpyIter_Deallocate(iter);
                return -1;
            }
        }
        r = pd_run(kern, dt, mode, dataptr[0], cnt, strideptr[0], isz, tol, acc, !needs_api);
        if (r == -2) {
            NpyIter_Deallocate(iter);
            return -1;
        }
        if (r >= 0) {
            *bad = done + r;
            break;
        }
        done += cnt;
    } while (iternext(iter));
    if (NpyIter_Deallocate(iter) != NPY_SUCCEED || (needs_api && PyErr_Occurred()))
        return -1;
    return 0;
}

/* Name the element at flat C-order index `index` of arr (its value, and its position when the
 * array has more than one dimension). */
static void pd_report_array(PyArrayObject *arr, const char *name, npy_intp index, double tol)
{
    int nd = PyArray_NDIM(arr), k;
    npy_intp rem = index, coord[NPY_MAXDIMS];
    char *ptr = PyArray_BYTES(arr), where[256] = "";
    PyObject *item;
    double v;
    for (k = nd - 1; k >= 0; k--) {
        npy_intp dim = PyArray_DIM(arr, k);
        coord[k] = rem % dim;
        rem /= dim;
        ptr += coord[k] * PyArray_STRIDE(arr, k);
    }
    if (nd > 1) {
        size_t len = 0;
        len += (size_t)PyOS_snprintf(where, sizeof where, " (flat C-order index; position [");
        for (k = 0; k < nd && len < sizeof where - 24; k++)
            len += (size_t)PyOS_snprintf(where + len, sizeof where - len, "%s%zd",
                                         k ? ", " : "", (Py_ssize_t)coord[k]);
        PyOS_snprintf(where + len, sizeof where - len, "])");
    }
    item = PyArray_GETITEM(arr, ptr);
    if (item == NULL)
        return;
    v = PyFloat_AsDouble(item);
    Py_DECREF(item);
    if (v == -1.0 && PyErr_Occurred())
        return;
    pd_report_bad(name, index, where, v, tol);
}

static int pd_array_sum(PyArrayObject *arr, const char *name, double tol, int mode,
                        pd_acc *acc)
{
    pd_dtype dt;
    npy_intp n = PyArray_SIZE(arr), bad = -1;
    int nd = PyArray_NDIM(arr);

    if (!pd_native_dtype(arr, &dt)) {
        /* Cast on the fly, in C order so the index of an error is the flat C index. */
        if (pd_iter_sum(arr, NPY_CORDER, 1, PD_F64, tol, mode, acc, &bad) < 0)
            return -1;
    }
    else if (nd <= 1 || PyArray_IS_C_CONTIGUOUS(arr)) {
        /* One run: contiguous, or 1-D with any stride (negative, zero). */
        npy_intp isz = PyArray_ITEMSIZE(arr);
        npy_intp s = (nd == 1 && !PyArray_IS_C_CONTIGUOUS(arr)) ? PyArray_STRIDE(arr, 0) : isz;
        bad = pd_run(pd_reduce_kernel(dt, mode), dt, mode, PyArray_BYTES(arr), n, s, isz, tol,
                     acc, 1);
        if (bad == -2)
            return -1;
    }
    else {
        /* Any other layout, in memory order; an error is located again in C order. */
        if (pd_iter_sum(arr, NPY_KEEPORDER, 0, dt, tol, mode, acc, &bad) < 0)
            return -1;
        if (bad >= 0) {
            pd_acc scratch = PD_ACC_ZERO;
            if (pd_iter_sum(arr, NPY_CORDER, 0, dt, tol, 0, &scratch, &bad) < 0)
                return -1;
        }
    }
    if (bad >= 0) {
        pd_report_array(arr, name, bad, tol);
        return -1;
    }
    return 0;
}

int pd_src_sum(pd_src *src, const char *name, double tol, int mode, pd_acc *acc)
{
    if (src->arr)
        return pd_array_sum(src->arr, name, tol, mode, acc);
    return pd_seq_sum(src->obj, src->n, name, tol, mode, acc);
}

/* ----------------------------------------------------------------------------- readers */

int pd_reader_open(pd_reader *r, pd_src *src, const char *name)
{
    PyArrayObject *arr = src->arr;
    PyArray_Descr *f64;
    memset(r, 0, sizeof *r);
    r->src = src;
    r->name = name;
    if (arr == NULL)
        return 0; /* a list or tuple: pd_seq_fill */
    if (pd_native_dtype(arr, &r->dt) && (PyArray_NDIM(arr) <= 1 || PyArray_IS_C_CONTIGUOUS(arr))) {
        r->direct = 1;
        r->p = PyArray_BYTES(arr);
        r->stride = (PyArray_NDIM(arr) == 1 && !PyArray_IS_C_CONTIGUOUS(arr))
                        ? PyArray_STRIDE(arr, 0)
                        : (npy_intp)PyArray_ITEMSIZE(arr);
        return 0;
    }
    /* any other layout or dtype: C order through NpyIter's buffers, cast to float64 */
    f64 = PyArray_DescrFromType(NPY_DOUBLE);
    r->iter = NpyIter_New(arr,
                          NPY_ITER_READONLY | NPY_ITER_EXTERNAL_LOOP | NPY_ITER_BUFFERED |
                              NPY_ITER_NBO | NPY_ITER_ALIGNED,
                          NPY_CORDER, NPY_UNSAFE_CASTING, f64);
    Py_DECREF(f64);
    if (r->iter == NULL || (r->next = NpyIter_GetIterNext(r->iter, NULL)) == NULL)
        return -1;
    r->dataptr = NpyIter_GetDataPtrArray(r->iter);
    r->strideptr = NpyIter_GetInnerStrideArray(r->iter);
    r->sizeptr = NpyIter_GetInnerLoopSizePtr(r->iter);
    return 0;
}

const double *pd_reader_next(pd_reader *r, double *buf, npy_intp m)
{
    npy_intp i = r->pos, j = 0;
    r->pos += m;
    if (r->direct) {
        const char *p = r->p + i * r->stride;
        if (r->dt == PD_F64 && r->stride == sizeof(double) && ((uintptr_t)p % sizeof(double)) == 0)
            return (const double *)p; /* in place */
        for (; j < m; j++)
            buf[j] = pd_load(r->dt, p + j * r->stride);
        return buf;
    }
    if (r->iter == NULL)
        return pd_seq_fill(r->src->obj, r->src->n, r->name, i, m, buf) < 0 ? NULL : buf;
    while (j < m) {
        npy_intp avail = *r->sizeptr - r->off, take = avail < m - j ? avail : m - j, k;
        const char *p = r->dataptr[0] + r->off * r->strideptr[0];
        for (k = 0; k < take; k++)
            buf[j + k] = pd_load_f64(p + k * r->strideptr[0]);
        j += take;
        r->off += take;
        if (r->off == *r->sizeptr) {
            r->off = 0;
            if (!r->next(r->iter) && j < m) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_RuntimeError, "%s ended early", r->name);
                return NULL;
            }
        }
    }
    return buf;
}

void pd_reader_close(pd_reader *r)
{
    if (r->iter)
        NpyIter_Deallocate(r->iter);
    r->iter = NULL;
}
