/* ppldelta._core: the Python bindings of the C core, and nothing else.
 *
 * Multi-phase init with module state.  Every function that takes arguments is METH_FASTCALL |
 * METH_KEYWORDS, parsed by pd_parse, and cleans up at one `done:` label; results are built in
 * C, so a call on ten-element lists costs about as much as the pure-Python reference.  The
 * numerics live elsewhere: reference.c (the reference's formulas, bands, round(x, 4), the fast ->
 * certificate -> exact chain), moments.c (paired moments), stats.c (bootstrap, segment sums),
 * logits.c (logits rows), input.c (reading inputs), dispatch.c (the SIMD path).
 */
#define PPLDELTA_IMPORT_ARRAY
#include "common.h"
#include "input.h"
#include "logits.h"
#include "moments.h"
#include "reference.h"
#include "stats.h"
#include "summarize.h"
#include "compare.h"
#include <limits.h>

enum { PD_K_ORIG, PD_K_QUANT, PD_K_ABS, PD_K_REL, PD_K_QUALITY, PD_NKEYS };
static const char *const pd_key_names[PD_NKEYS] = {
    "original_perplexity", "quantized_perplexity", "absolute_delta", "relative_delta_pct",
    "quality"};

typedef struct {
    PyObject *adapter;     /* ppldelta._adapt.as_array, imported on first use */
    PyObject *float_round; /* float.__round__ */
    PyObject *four;        /* 4 */
    PyObject *keys[PD_NKEYS];
    PyObject *quality[PD_NQUALITY];
    PyTypeObject *moments_type; /* PairedMoments */
    PyTypeObject *logits_type;  /* LogitsStats */
} pd_state;

static pd_state *pd_get_state(PyObject *module) { return (pd_state *)PyModule_GetState(module); }

static PyObject *pd_adapter(pd_state *st)
{
    if (st->adapter == NULL) {
        PyObject *mod = PyImport_ImportModule("ppldelta._adapt");
        if (mod == NULL)
            return NULL;
        st->adapter = PyObject_GetAttrString(mod, "as_array");
        Py_DECREF(mod);
    }
    return st->adapter;
}

/* ----------------------------------------------------------------------------- arguments */

/* Parse (positional-or-keyword names[0..npos), keyword-only names[npos..nnames)) into out[],
 * which must be pre-filled with NULL; required arguments are the first nreq. */
static int pd_parse(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames, const char *const *names, int npos, int nnames, int nreq,
                    PyObject **out)
{
    Py_ssize_t i, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int k;
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d positional arguments but %zd were given",
                     fname, npos, nargs);
        return -1;
    }
    for (i = 0; i < nargs; i++)
        out[i] = args[i];
    for (i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        for (k = 0; k < nnames; k++)
            if (PyUnicode_CompareWithASCIIString(key, names[k]) == 0)
                break;
        if (k == nnames) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname,
                         key);
            return -1;
        }
        if (out[k] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[k]);
            return -1;
        }
        out[k] = args[nargs + i];
    }
    for (k = 0; k < nreq; k++)
        if (out[k] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[k]);
            return -1;
        }
    return 0;
}

#define PD_PARSE(fname, names, npos, nreq, out)                                               \
    pd_parse(fname, args, nargs, kwnames, names, npos, (int)(sizeof(names) / sizeof(*names)), \
             nreq, out)

static int pd_arg_tol(PyObject *obj, double *tol)
{
    *tol = PD_DEFAULT_TOL;
    if (obj == NULL)
        return 0;
    *tol = PyFloat_AsDouble(obj);
    if (*tol == -1.0 && PyErr_Occurred())
        return -1;
    if (!(*tol >= 0.0)) {
        PyErr_Format(PyExc_ValueError, "positive_tolerance must be a number >= 0, got %R", obj);
        return -1;
    }
    return 0;
}

static int pd_arg_double(PyObject *obj, double *v)
{
    *v = PyFloat_AsDouble(obj);
    return *v == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* An integer argument (anything with __index__) that must be >= lo; def when absent. */
static int pd_arg_ssize(PyObject *obj, const char *name, Py_ssize_t lo, Py_ssize_t def,
                        Py_ssize_t *v)
{
    *v = def;
    if (obj == NULL)
        return 0;
    *v = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (*v == -1 && PyErr_Occurred())
        return -1;
    if (*v < lo) {
        PyErr_Format(PyExc_ValueError, "%s must be >= %zd, got %zd", name, lo, *v);
        return -1;
    }
    return 0;
}

static int pd_arg_bool(PyObject *obj, int def, int *v)
{
    *v = obj == NULL ? def : PyObject_IsTrue(obj);
    return *v < 0 ? -1 : 0;
}

/* ----------------------------------------------------------------------------- inputs */

/* Open one log-prob input (must not be empty unless allow_empty). */
static int pd_open_one(pd_state *st, PyObject *obj, const char *name, int allow_empty,
                       pd_src *src)
{
    PyObject *adapter = pd_adapter(st);
    if (adapter == NULL || pd_src_open(adapter, obj, name, src) < 0)
        return -1;
    if (src->n == 0 && !allow_empty) {
        PyErr_Format(PyExc_ValueError, "%s is empty", name);
        pd_src_close(src);
        return -1;
    }
    return 0;
}

/* Open the two inputs of a comparison: non-empty, of one size (both closed on failure). */
static int pd_open_pair(pd_state *st, PyObject *const *objs, const char *const *names,
                        pd_src *so, pd_src *sq)
{
    PyObject *adapter = pd_adapter(st);
    memset(sq, 0, sizeof *sq);
    if (adapter == NULL || pd_src_open(adapter, objs[0], names[0], so) < 0)
        return -1;
    if (pd_src_open(adapter, objs[1], names[1], sq) < 0)
        goto fail;
    if (so->n == 0 || sq->n == 0) {
        PyErr_Format(PyExc_ValueError, "%s is empty", so->n == 0 ? names[0] : names[1]);
        goto fail;
    }
    if (so->n != sq->n) {
        PyErr_Format(PyExc_ValueError,
                     "length mismatch: %s has %zd values, %s has %zd (both models must be scored "
                     "on the same tokens)",
                     names[0], (Py_ssize_t)so->n, names[1], (Py_ssize_t)sq->n);
        goto fail;
    }
    return 0;
fail:
    pd_src_close(so);
    pd_src_close(sq);
    return -1;
}

/* ----------------------------------------------------------------------------- the reference */

/* round(x, 4): pd_round4_fast, or float.__round__ itself beyond its range. */
static PyObject *pd_round4(pd_state *st, double x)
{
    PyObject *f, *args[2], *r;
    int exact;
    double v = pd_round4_fast(x, &exact);
    if (exact)
        return PyFloat_FromDouble(v);
    if ((f = PyFloat_FromDouble(x)) == NULL)
        return NULL;
    args[0] = f;
    args[1] = st->four;
    r = PyObject_Vectorcall(st->float_round, args, 2, NULL);
    Py_DECREF(f);
    return r;
}

/* The one home of the reference dict: from exactly rounded sums (or sums that the certificate
 * proved equivalent) and the count. */
static PyObject *pd_reference_dict(pd_state *st, double sum_o, double sum_q, npy_intp n)
{
    pd_fields f;
    PyObject *d, *v;
    double vals[PD_K_QUALITY];
    int k;
    pd_fields_eval(sum_o, sum_q, n, &f);
    if (isinf(f.ppl_o)) {
        char buf[40];
        PyOS_snprintf(buf, sizeof buf, "%.17g", f.avg_o);
        PyErr_Format(PyExc_ValueError,
                     "the original model's perplexity overflows a float (mean log-prob %s): "
                     "original_log_probs contains -inf or its mean is below -709.78, so a "
                     "relative delta is undefined",
                     buf);
        return NULL;
    }
    vals[PD_K_ORIG] = f.ppl_o;
    vals[PD_K_QUANT] = f.ppl_q;
    vals[PD_K_ABS] = f.abs;
    vals[PD_K_REL] = f.rel;
    if ((d = PyDict_New()) == NULL)
        return NULL;
    for (k = 0; k < PD_K_QUALITY; k++) {
        if ((v = pd_round4(st, vals[k])) == NULL || PyDict_SetItem(d, st->keys[k], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    if (PyDict_SetItem(d, st->keys[PD_K_QUALITY], st->quality[pd_quality(f.rel)]) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/* ----------------------------------------------------------------------------- log-prob functions */

static const char *const pd_delta_kw[] = {"original_log_probs", "quantized_log_probs",
                                          "positive_tolerance"};

PyDoc_STRVAR(pd_perplexity_delta_doc,
"perplexity_delta(original_log_probs, quantized_log_probs, *, positive_tolerance=1e-3)\n--\n\n"
"Perplexity of each model and the change, exactly as the reference computes them.\n\n"
"Returns {'original_perplexity', 'quantized_perplexity', 'absolute_delta',\n"
"'relative_delta_pct', 'quality'}: floats rounded with round(x, 4); quality from the\n"
"unrounded relative delta: < 1 excellent, < 5 good, < 10 acceptable, else poor.\n"
"Inputs: sequences or arrays of natural-log token probabilities (<= 0), same size.\n");

static PyObject *pd_perplexity_delta(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames)
{
    pd_state *st = pd_get_state(module);
    PyObject *a[3] = {NULL, NULL, NULL}, *res = NULL;
    pd_src so, sq;
    double tol, sum_o, sum_q;
    if (PD_PARSE("perplexity_delta", pd_delta_kw, 2, 2, a) < 0 || pd_arg_tol(a[2], &tol) < 0 ||
        pd_open_pair(st, a, pd_delta_kw, &so, &sq) < 0)
        return NULL;
    if (pd_delta_sums(&so, &sq, pd_delta_kw[0], pd_delta_kw[1], tol, &sum_o, &sum_q) < 0)
        goto done;
    res = pd_reference_dict(st, sum_o, sum_q, so.n);
done:
    pd_src_close(&so);
    pd_src_close(&sq);
    return res;
}

static const char *const pd_reference_kw[] = {"sum_o", "sum_q", "n"};

PyDoc_STRVAR(pd_reference_doc,
"reference(sum_o, sum_q, n)\n--\n\n"
"perplexity_delta's dict from the exactly rounded sums of the two models' log-probs and the\n"
"token count (the same C code; ValueError when the original perplexity overflows).\n");

static PyObject *pd_reference(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    PyObject *a[3] = {NULL, NULL, NULL};
    double so, sq;
    Py_ssize_t n;
    if (PD_PARSE("reference", pd_reference_kw, 3, 3, a) < 0 || pd_arg_double(a[0], &so) < 0 ||
        pd_arg_double(a[1], &sq) < 0 || pd_arg_ssize(a[2], "n", 1, 0, &n) < 0)
        return NULL;
    return pd_reference_dict(pd_get_state(module), so, sq, n);
}

static const char *const pd_quality_kw[] = {"relative_delta_pct"};

static PyObject *pd_quality_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[1] = {NULL}, *q;
    double rel;
    if (PD_PARSE("quality", pd_quality_kw, 1, 1, a) < 0 || pd_arg_double(a[0], &rel) < 0)
        return NULL;
    q = pd_get_state(module)->quality[pd_quality(rel)];
    return Py_NewRef(q);
}

static const char *const pd_ppl_kw[] = {"log_probs", "positive_tolerance"};

PyDoc_STRVAR(pd_perplexity_doc,
"perplexity(log_probs, *, positive_tolerance=1e-3)\n--\n\n"
"exp(-mean(log_probs)) with the exactly rounded sum (unrounded; inf when it overflows).\n");

static PyObject *pd_perplexity(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[2] = {NULL, NULL}, *res = NULL;
    pd_src src;
    double tol, sum;
    if (PD_PARSE("perplexity", pd_ppl_kw, 1, 1, a) < 0 || pd_arg_tol(a[1], &tol) < 0 ||
        pd_open_one(pd_get_state(module), a[0], pd_ppl_kw[0], 0, &src) < 0)
        return NULL;
    if (pd_exact_sum(&src, pd_ppl_kw[0], tol, &sum) == 0)
        res = PyFloat_FromDouble(exp(-(sum / (double)src.n)));
    pd_src_close(&src);
    return res;
}

PyDoc_STRVAR(pd_sum_log_probs_doc,
"sum_log_probs(log_probs, *, positive_tolerance=1e-3) -> (n, total)\n--\n\n"
"Count and exactly rounded sum (as math.fsum), with validation; -inf when a term is -inf.\n"
"Empty input gives (0, 0.0).\n");

static PyObject *pd_sum_log_probs(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    PyObject *a[2] = {NULL, NULL}, *res = NULL;
    pd_src src;
    double tol, sum = 0.0;
    if (PD_PARSE("sum_log_probs", pd_ppl_kw, 1, 1, a) < 0 || pd_arg_tol(a[1], &tol) < 0 ||
        pd_open_one(pd_get_state(module), a[0], pd_ppl_kw[0], 1, &src) < 0)
        return NULL;
    if (src.n == 0 || pd_exact_sum(&src, pd_ppl_kw[0], tol, &sum) == 0)
        res = Py_BuildValue("nd", (Py_ssize_t)src.n, sum);
    pd_src_close(&src);
    return res;
}

static const char *const pd_moments_kw[] = {"original_log_probs", "quantized_log_probs", "codes",
                                            "n_groups", "block_size", "positive_tolerance"};

static PyStructSequence_Field pd_moments_fields[] = {
    {"n", "number of token pairs"},
    {"sum_o", "exactly rounded sum of the original log-probs (math.fsum's)"},
    {"sum_q", "exactly rounded sum of the quantized log-probs"},
    {"sum_oo", "compensated sum of o * o"},
    {"sum_qq", "compensated sum of q * q"},
    {"sum_oq", "compensated sum of o * q"},
    {"sum_dp", "compensated sum of dp = exp(q) - exp(o)"},
    {"sum_dp2", "compensated sum of dp ** 2"},
    {"sum_dp4", "compensated sum of dp ** 4"},
    {"n_neginf_o", "number of -inf original log-probs"},
    {"n_neginf_q", "number of -inf quantized log-probs"},
    {"group_n", "int64 per-group token counts, or None"},
    {"group_sum_o", "float64 exactly rounded per-group sums of o, or None"},
    {"group_sum_q", "float64 exactly rounded per-group sums of q, or None"},
    {"block_d", "float64 sums of o - q over consecutive blocks of block_size, or None"},
    {NULL, NULL}};

static PyStructSequence_Desc pd_moments_desc = {
    "ppldelta._core.PairedMoments",
    "Moments of paired log-probs from one read of each input (see paired_moments).",
    pd_moments_fields, 15};

PyDoc_STRVAR(pd_paired_moments_doc,
"paired_moments(original_log_probs, quantized_log_probs, codes=None, n_groups=0, block_size=0,\n"
"               positive_tolerance=1e-3)\n--\n\n"
"PairedMoments of two log-prob inputs, validated as perplexity_delta validates them, in one\n"
"read of each: exact sums, compensated sums of products and of dp = exp(q) - exp(o), -inf\n"
"counts, per-group counts and exact sums (codes: intp in [0, n_groups)), block sums of o - q.\n");

static PyObject *pd_new_vec(npy_intp n, int type)
{
    npy_intp dims[1] = {n};
    return PyArray_ZEROS(1, dims, type, 0);
}

static void *pd_vec_data(PyObject *v) { return v ? PyArray_DATA((PyArrayObject *)v) : NULL; }

static PyObject *pd_paired_moments_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    pd_state *st = pd_get_state(module);
    PyObject *a[6] = {NULL, NULL, NULL, NULL, NULL, NULL}, *res = NULL;
    PyObject *gn = NULL, *gso = NULL, *gsq = NULL, *bd = NULL;
    PyArrayObject *codes = NULL;
    pd_src so, sq;
    pd_moments m;
    pd_moments_extra x;
    Py_ssize_t n_groups, block_size, i;
    double tol;
    int opened = 0;
    memset(&x, 0, sizeof x);
    if (PD_PARSE("paired_moments", pd_moments_kw, 6, 2, a) < 0 ||
        pd_arg_ssize(a[3], "n_groups", 0, 0, &n_groups) < 0 ||
        pd_arg_ssize(a[4], "block_size", 0, 0, &block_size) < 0 || pd_arg_tol(a[5], &tol) < 0)
        return NULL;
    if (pd_open_pair(st, a, pd_moments_kw, &so, &sq) < 0)
        return NULL;
    opened = 1;
    if (a[2] != NULL && a[2] != Py_None) {
        const npy_intp *c;
        PyArrayObject *raw = (PyArrayObject *)PyArray_FromAny(a[2], NULL, 1, 1, 0, NULL);
        if (raw == NULL)
            goto done;
        if (!PyArray_ISINTEGER(raw)) {
            PyErr_Format(PyExc_TypeError, "paired_moments: codes must be integers, got dtype %S",
                         (PyObject *)PyArray_DESCR(raw));
            Py_DECREF(raw);
            goto done;
        }
        /* our own copy: list items' __float__ could otherwise rewrite a caller's codes mid-pass */
        codes = (PyArrayObject *)PyArray_FROMANY((PyObject *)raw, NPY_INTP, 1, 1,
                                                 NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY);
        Py_DECREF(raw);
        if (codes == NULL)
            goto done;
        if (PyArray_SIZE(codes) != so.n) {
            PyErr_Format(PyExc_ValueError, "paired_moments: %zd codes for %zd values",
                         (Py_ssize_t)PyArray_SIZE(codes), (Py_ssize_t)so.n);
            goto done;
        }
        c = (const npy_intp *)PyArray_DATA(codes);
        for (i = 0; i < so.n; i++)
            if (c[i] < 0 || c[i] >= n_groups) {
                PyErr_Format(PyExc_ValueError,
                             "paired_moments: code %zd at index %zd outside [0, %zd)",
                             (Py_ssize_t)c[i], i, n_groups);
                goto done;
            }
        if (!(gn = pd_new_vec(n_groups, NPY_INT64)) || !(gso = pd_new_vec(n_groups, NPY_DOUBLE)) ||
            !(gsq = pd_new_vec(n_groups, NPY_DOUBLE)))
            goto done;
        x.codes = c;
        x.n_groups = n_groups;
    }
    if (block_size > 0 && !(bd = pd_new_vec((so.n + block_size - 1) / block_size, NPY_DOUBLE)))
        goto done;
    x.group_n = pd_vec_data(gn);
    x.group_sum_o = pd_vec_data(gso);
    x.group_sum_q = pd_vec_data(gsq);
    x.block_size = block_size;
    x.block_d = pd_vec_data(bd);
    if (pd_paired_moments(&so, &sq, pd_moments_kw[0], pd_moments_kw[1], tol, &x, &m) < 0)
        goto done;
    if ((res = PyStructSequence_New(st->moments_type)) == NULL)
        goto done;
    {
        PyObject *items[15] = {
            PyLong_FromSsize_t((Py_ssize_t)so.n), PyFloat_FromDouble(m.sum_o),
            PyFloat_FromDouble(m.sum_q), PyFloat_FromDouble(m.sum_oo),
            PyFloat_FromDouble(m.sum_qq), PyFloat_FromDouble(m.sum_oq),
            PyFloat_FromDouble(m.sum_dp), PyFloat_FromDouble(m.sum_dp2),
            PyFloat_FromDouble(m.sum_dp4), PyLong_FromSsize_t((Py_ssize_t)m.neginf_o),
            PyLong_FromSsize_t((Py_ssize_t)m.neginf_q), Py_NewRef(gn ? gn : Py_None),
            Py_NewRef(gso ? gso : Py_None), Py_NewRef(gsq ? gsq : Py_None),
            Py_NewRef(bd ? bd : Py_None)};
        int k, bad = 0;
        for (k = 0; k < 15; k++) {
            bad |= items[k] == NULL;
            PyStructSequence_SetItem(res, k, items[k] ? items[k] : Py_NewRef(Py_None));
        }
        if (bad)
            Py_CLEAR(res);
    }
done:
    if (opened) {
        pd_src_close(&so);
        pd_src_close(&sq);
    }
    Py_XDECREF(codes);
    Py_XDECREF(gn);
    Py_XDECREF(gso);
    Py_XDECREF(gsq);
    Py_XDECREF(bd);
    return res;
}

/* ----------------------------------------------------------------------------- analysis kernels */

static const char *const pd_bootstrap_kw[] = {"num", "den", "n_boot", "seed"};

static PyObject *pd_block_bootstrap_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    PyObject *a[4] = {NULL, NULL, NULL, NULL}, *res = NULL;
    PyArrayObject *num = NULL, *den = NULL, *out = NULL;
    Py_ssize_t n_boot;
    unsigned long long seed;
    npy_intp nb, dims[1];
    (void)module;
    if (PD_PARSE("block_bootstrap", pd_bootstrap_kw, 4, 4, a) < 0 ||
        ((n_boot = PyNumber_AsSsize_t(a[2], PyExc_OverflowError)) == -1 && PyErr_Occurred()) ||
        ((seed = PyLong_AsUnsignedLongLongMask(a[3])) == (unsigned long long)-1 && PyErr_Occurred()))
        return NULL;
    num = (PyArrayObject *)PyArray_FROMANY(a[0], NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY);
    den = num ? (PyArrayObject *)PyArray_FROMANY(a[1], NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY) : NULL;
    if (den == NULL)
        goto done;
    nb = PyArray_SIZE(num);
    if (nb != PyArray_SIZE(den) || nb < 1 || nb >= ((npy_intp)1 << 31) || n_boot < 0) {
        PyErr_Format(PyExc_ValueError,
                     "block_bootstrap: need 1 <= blocks < 2^31 with matching lengths (got %zd and "
                     "%zd) and n_boot >= 0",
                     (Py_ssize_t)nb, (Py_ssize_t)PyArray_SIZE(den));
        goto done;
    }
    dims[0] = n_boot;
    if ((out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_DOUBLE)) == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    pd_block_bootstrap((const double *)PyArray_DATA(num), (const double *)PyArray_DATA(den), nb,
                       n_boot, (uint64_t)seed, (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    res = Py_NewRef(out);
done:
    Py_XDECREF(num);
    Py_XDECREF(den);
    Py_XDECREF(out);
    return res;
}

static const char *const pd_segment_kw[] = {"codes", "n_groups", "values"};

static PyObject *pd_segment_sums_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    PyObject *a[3] = {NULL, NULL, NULL}, *res = NULL;
    PyArrayObject *codes = NULL, *vals = NULL, *counts = NULL, *sums = NULL;
    Py_ssize_t n_groups;
    pd_acc *acc = NULL;
    npy_intp n, i, dims[1];
    const npy_intp *c;
    int rc;
    (void)module;
    if (PD_PARSE("segment_sums", pd_segment_kw, 3, 3, a) < 0 ||
        ((n_groups = PyNumber_AsSsize_t(a[1], PyExc_OverflowError)) == -1 && PyErr_Occurred()))
        return NULL;
    codes = (PyArrayObject *)PyArray_FROMANY(a[0], NPY_INTP, 1, 1, NPY_ARRAY_IN_ARRAY);
    vals = codes ? (PyArrayObject *)PyArray_FROMANY(a[2], NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY) : NULL;
    if (vals == NULL)
        goto done;
    n = PyArray_SIZE(codes);
    if (n != PyArray_SIZE(vals) || n_groups < 0) {
        PyErr_Format(PyExc_ValueError, "segment_sums: %zd codes for %zd values",
                     (Py_ssize_t)n, (Py_ssize_t)PyArray_SIZE(vals));
        goto done;
    }
    c = (const npy_intp *)PyArray_DATA(codes);
    for (i = 0; i < n; i++)
        if (c[i] < 0 || c[i] >= n_groups) {
            PyErr_Format(PyExc_ValueError, "segment_sums: code %zd at index %zd outside [0, %zd)",
                         (Py_ssize_t)c[i], (Py_ssize_t)i, n_groups);
            goto done;
        }
    dims[0] = n_groups;
    counts = (PyArrayObject *)PyArray_ZEROS(1, dims, NPY_INTP, 0);
    sums = counts ? (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_DOUBLE) : NULL;
    acc = sums ? PyMem_Calloc((size_t)(n_groups ? n_groups : 1), sizeof(pd_acc)) : NULL;
    if (acc == NULL) {
        if (sums)
            PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = pd_segment_sums(c, (const double *)PyArray_DATA(vals), n, n_groups, acc,
                         (npy_intp *)PyArray_DATA(counts), (double *)PyArray_DATA(sums));
    Py_END_ALLOW_THREADS
    res = rc < 0 ? PyErr_NoMemory() : PyTuple_Pack(2, counts, sums);
done:
    PyMem_Free(acc);
    Py_XDECREF(codes);
    Py_XDECREF(vals);
    Py_XDECREF(counts);
    Py_XDECREF(sums);
    return res;
}

/* ----------------------------------------------------------------------------- logits */

/* A logits matrix argument: 2-D ndarray with contiguous rows, float64/32/16 or, with bf16
 * set, 16-bit integers holding bfloat16 bits. */
static int pd_mat_from(PyObject *obj, const char *name, int bf16, pd_mat *m)
{
    PyArrayObject *arr;
    int tn;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an ndarray", name);
        return -1;
    }
    arr = (PyArrayObject *)obj;
    tn = PyArray_TYPE(arr);
    if (PyArray_NDIM(arr) != 2) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D (rows, vocab)", name);
        return -1;
    }
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be in native byte order", name);
        return -1;
    }
    if (!pd_dtype_of(tn, bf16, &m->dt)) {
        PyErr_Format(PyExc_TypeError, "%s has dtype %S: logits must be float64, float32, float16 "
                     "or bfloat16", name, (PyObject *)PyArray_DESCR(arr));
        return -1;
    }
    m->rows = PyArray_DIM(arr, 0);
    m->V = PyArray_DIM(arr, 1);
    m->rstride = PyArray_STRIDE(arr, 0);
    if (m->V > 1 && m->rows > 0 && PyArray_STRIDE(arr, 1) != PyArray_ITEMSIZE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: rows must be contiguous (strides %zd, %zd)", name,
                     (Py_ssize_t)PyArray_STRIDE(arr, 0), (Py_ssize_t)PyArray_STRIDE(arr, 1));
        return -1;
    }
    if (m->V < 1) {
        PyErr_Format(PyExc_ValueError, "%s has an empty vocabulary axis", name);
        return -1;
    }
    m->base = PyArray_BYTES(arr);
    return 0;
}

enum { PD_L_LP_A, PD_L_LP_B, PD_L_KLD, PD_L_KLD_REV, PD_L_SAME, PD_L_RANK_B, PD_L_RANK_A, PD_NL };

static PyStructSequence_Field pd_logits_fields[] = {
    {"lp_a", "float64 log-softmax of a at the targets (NaN where ignored), or None"},
    {"lp_b", "float64 log-softmax of b at the targets, or None"},
    {"kld", "float64 KL(P||Q) per row, or None"},
    {"kld_rev", "float64 KL(Q||P) per row, or None"},
    {"same_top1", "bool: argmax a == argmax b, or None"},
    {"rank_b", "int64 #{j : b_j > b[argmax a]}, or None"},
    {"rank_a", "int64 #{j : a_j > a[argmax b]}, or None"},
    {NULL, NULL}};

static PyStructSequence_Desc pd_logits_desc = {
    "ppldelta._core.LogitsStats", "Per-row results of logits_stats (None where not computed).",
    pd_logits_fields, PD_NL};

static const char *const pd_logits_kw[] = {"a",    "b",    "targets", "ignore_index",
                                           "bf16", "topk", "threads"};

PyDoc_STRVAR(pd_logits_stats_doc,
"logits_stats(a, b=None, targets=None, ignore_index=-100, bf16=False, topk=True, threads=1)\n"
"--\n\nLogitsStats(lp_a, lp_b, kld, kld_rev, same_top1, rank_b, rank_a) per row; None where not\n"
"computed.");

static PyObject *pd_logits_stats(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    pd_state *st = pd_get_state(module);
    PyObject *a[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL}, *res = NULL, *v[PD_NL] = {NULL};
    PyArrayObject *tarr = NULL;
    const pd_logits_fns *fn;
    long long ignore = -100;
    long threads_l = 1;
    int bf16, topk, kind = 0, rc, k;
    pd_mat ma, mb;
    pd_logits_out out;
    const npy_int64 *tg = NULL;
    npy_intp bad = -1;
    memset(&mb, 0, sizeof mb);
    if (PD_PARSE("logits_stats", pd_logits_kw, 7, 1, a) < 0 || pd_arg_bool(a[4], 0, &bf16) < 0 ||
        pd_arg_bool(a[5], 1, &topk) < 0)
        return NULL;
    if (a[3] && (ignore = PyLong_AsLongLong(a[3])) == -1 && PyErr_Occurred())
        return NULL;
    if (a[6] && (threads_l = PyLong_AsLong(a[6])) == -1 && PyErr_Occurred())
        return NULL;
    if (threads_l > INT_MAX || threads_l < INT_MIN) {
        PyErr_SetString(PyExc_OverflowError, "threads does not fit a C int");
        return NULL;
    }
    if (pd_mat_from(a[0], "original_logits", bf16, &ma) < 0)
        return NULL;
    if (a[1] && a[1] != Py_None) {
        if (pd_mat_from(a[1], "quantized_logits", bf16, &mb) < 0)
            return NULL;
        if (mb.rows != ma.rows || mb.V != ma.V || mb.dt != ma.dt) {
            PyErr_Format(PyExc_ValueError,
                         "shape/dtype mismatch: original_logits is (%zd, %zd), quantized_logits is "
                         "(%zd, %zd)%s",
                         (Py_ssize_t)ma.rows, (Py_ssize_t)ma.V, (Py_ssize_t)mb.rows,
                         (Py_ssize_t)mb.V, mb.dt != ma.dt ? " with a different dtype" : "");
            return NULL;
        }
    }
    if (a[2] && a[2] != Py_None) {
        /* native, aligned, contiguous int64 (a copy only when the input is not) */
        tarr = (PyArrayObject *)PyArray_FROMANY(a[2], NPY_INT64, 1, 1, NPY_ARRAY_IN_ARRAY);
        if (tarr == NULL)
            goto done;
        if (PyArray_DIM(tarr, 0) != ma.rows) {
            PyErr_Format(PyExc_ValueError, "targets has %zd values for %zd logits rows",
                         (Py_ssize_t)PyArray_DIM(tarr, 0), (Py_ssize_t)ma.rows);
            goto done;
        }
        tg = (const npy_int64 *)PyArray_DATA(tarr);
        if (!(v[PD_L_LP_A] = pd_new_vec(ma.rows, NPY_DOUBLE)) ||
            (mb.base && !(v[PD_L_LP_B] = pd_new_vec(ma.rows, NPY_DOUBLE))))
            goto done;
    }
    if (mb.base) {
        if (!(v[PD_L_KLD] = pd_new_vec(ma.rows, NPY_DOUBLE)) ||
            !(v[PD_L_KLD_REV] = pd_new_vec(ma.rows, NPY_DOUBLE)) ||
            !(v[PD_L_SAME] = pd_new_vec(ma.rows, NPY_BOOL)))
            goto done;
        if (topk && (!(v[PD_L_RANK_B] = pd_new_vec(ma.rows, NPY_INT64)) ||
                     !(v[PD_L_RANK_A] = pd_new_vec(ma.rows, NPY_INT64))))
            goto done;
    }
    out = (pd_logits_out){pd_vec_data(v[PD_L_LP_A]),    pd_vec_data(v[PD_L_LP_B]),
                          pd_vec_data(v[PD_L_KLD]),     pd_vec_data(v[PD_L_KLD_REV]),
                          pd_vec_data(v[PD_L_SAME]),    pd_vec_data(v[PD_L_RANK_B]),
                          pd_vec_data(v[PD_L_RANK_A])};
    fn = pd_logits_kernel(ma.dt); /* resolved under the GIL (_set_simd may run concurrently) */
    Py_BEGIN_ALLOW_THREADS
    rc = pd_logits_run(fn, &ma, &mb, tg, (npy_int64)ignore, (int)threads_l, &out, &bad, &kind);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (kind == 1)
            PyErr_Format(PyExc_ValueError, "targets[%zd] = %lld is outside the vocabulary [0, %zd)",
                         (Py_ssize_t)bad, (long long)tg[bad], (Py_ssize_t)ma.V);
        else
            PyErr_Format(PyExc_ValueError,
                         "logits row %zd contains NaN or +inf, or is entirely -inf%s",
                         (Py_ssize_t)bad, mb.base ? " (in original_logits or quantized_logits)" : "");
        goto done;
    }
    if ((res = PyStructSequence_New(st->logits_type)) == NULL)
        goto done;
    for (k = 0; k < PD_NL; k++)
        PyStructSequence_SetItem(res, k, Py_NewRef(v[k] ? v[k] : Py_None));
done:
    for (k = 0; k < PD_NL; k++)
        Py_XDECREF(v[k]);
    Py_XDECREF(tarr);
    return res;
}

static const char *const pd_summarize_kw[] = {"rows", "k", "probes", "offsets", "bf16", "threads"};

PyDoc_STRVAR(pd_summarize_rows_doc,
"summarize_rows(rows, k, probes, offsets=None, *, bf16=False, threads=1)\n"
"--\n\nThe reference records of logits rows (refstats.RECORD_DTYPE's fields but token and lp) as a\n"
"dict of arrays: entropy, tail, lp_min (rows,), ids, lps (rows, k), pids, plps (rows, probes).\n"
"offsets: each row's probe offset u in [0, 1) (float64, (rows,); refstats.probe_offsets): probe j\n"
"is the first id whose running tail sum exceeds (j + u)/probes of the total (None: u = 1/2).");

static PyObject *pd_summarize_rows_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    static const char *const names[7] = {"entropy", "tail", "lp_min", "ids", "lps", "pids", "plps"};
    PyObject *a[6] = {NULL, NULL, NULL, NULL, NULL, NULL}, *v[7] = {NULL}, *res = NULL;
    PyArrayObject *offs = NULL;
    Py_ssize_t k, m;
    long threads_l = 1;
    int bf16, rc, kind = 0, i;
    npy_intp bad = -1;
    pd_mat mat;
    pd_summary_out out;
    pd_isa isa;
    (void)module;
    if (PD_PARSE("summarize_rows", pd_summarize_kw, 4, 3, a) < 0 ||
        pd_arg_ssize(a[1], "k", 1, 1, &k) < 0 || pd_arg_ssize(a[2], "probes", 0, 0, &m) < 0 ||
        pd_arg_bool(a[4], 0, &bf16) < 0)
        return NULL;
    if (a[5] && (threads_l = PyLong_AsLong(a[5])) == -1 && PyErr_Occurred())
        return NULL;
    if (threads_l > INT_MAX || threads_l < INT_MIN) {
        PyErr_SetString(PyExc_OverflowError, "threads does not fit a C int");
        return NULL;
    }
    if (k > 65536 || m > 65536) {
        PyErr_Format(PyExc_ValueError, "k and probes must be <= 65536, got %zd and %zd", k, m);
        return NULL;
    }
    if (pd_mat_from(a[0], "logits", bf16, &mat) < 0)
        return NULL;
    if (mat.V > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "logits: a vocabulary of %zd does not fit int32 ids",
                     (Py_ssize_t)mat.V);
        return NULL;
    }
    if (a[3] && a[3] != Py_None) { /* the probes' offsets: one per row, each in [0, 1) */
        const double *u;
        npy_intp r;
        if ((offs = (PyArrayObject *)PyArray_FROMANY(a[3], NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY)) == NULL)
            return NULL;
        if (PyArray_DIM(offs, 0) != mat.rows) {
            PyErr_Format(PyExc_ValueError, "offsets: %zd values for %zd rows", (Py_ssize_t)PyArray_DIM(offs, 0),
                         (Py_ssize_t)mat.rows);
            goto done;
        }
        for (u = (const double *)PyArray_DATA(offs), r = 0; r < mat.rows; r++)
            if (!(u[r] >= 0.0 && u[r] < 1.0)) {
                PyObject *f = PyFloat_FromDouble(u[r]);
                if (f) {
                    PyErr_Format(PyExc_ValueError, "offsets[%zd] = %R is not in [0, 1)", (Py_ssize_t)r, f);
                    Py_DECREF(f);
                }
                goto done;
            }
    }
    {
        npy_intp d1[1] = {mat.rows}, dk[2] = {mat.rows, k}, dm[2] = {mat.rows, m};
        int types[7] = {NPY_DOUBLE, NPY_DOUBLE, NPY_DOUBLE, NPY_INT32, NPY_FLOAT32, NPY_INT32, NPY_FLOAT32};
        for (i = 0; i < 7; i++)
            if ((v[i] = PyArray_SimpleNew(i < 3 ? 1 : 2, i < 3 ? d1 : i < 5 ? dk : dm, types[i])) == NULL)
                goto done;
    }
    out = (pd_summary_out){pd_vec_data(v[0]), pd_vec_data(v[1]), pd_vec_data(v[2]), pd_vec_data(v[3]),
                           pd_vec_data(v[5]), pd_vec_data(v[4]), pd_vec_data(v[6])};
    isa = pd_dispatch_current(); /* read under the GIL (_set_simd may run concurrently) */
    Py_BEGIN_ALLOW_THREADS
    rc = pd_summarize_run(isa, &mat, k, m, offs ? (const double *)PyArray_DATA(offs) : NULL, (int)threads_l,
                          &out, &bad, &kind);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (kind == 3)
            PyErr_NoMemory();
        else
            PyErr_Format(PyExc_ValueError, "logits row %zd contains NaN or +inf, or is entirely -inf",
                         (Py_ssize_t)bad);
        goto done;
    }
    if ((res = PyDict_New()) == NULL)
        goto done;
    for (i = 0; i < 7; i++)
        if (PyDict_SetItemString(res, names[i], v[i]) < 0) {
            Py_CLEAR(res);
            goto done;
        }
done:
    Py_XDECREF(offs);
    for (i = 0; i < 7; i++)
        Py_XDECREF(v[i]);
    return res;
}

/* Stored ids for compare_rows: a native, aligned, C-contiguous int32 (rows, k >= 1) ndarray
 * (records' fields are strided views: the caller makes them contiguous), every id < V. */
static int pd_ids_from(PyObject *obj, const char *name, npy_intp rows, npy_intp V, int need_k,
                       const int32_t **data, npy_intp *k)
{
    PyArrayObject *arr = (PyArrayObject *)obj;
    npy_intp i, n;
    if (!PyArray_Check(obj) || PyArray_TYPE(arr) != NPY_INT32) {
        PyErr_Format(PyExc_TypeError, "%s must be an int32 ndarray", name);
        return -1;
    }
    if (PyArray_NDIM(arr) != 2 || PyArray_DIM(arr, 0) != rows || (need_k && PyArray_DIM(arr, 1) < 1)) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, k)%s, got %d dimension(s)%s", name,
                     (Py_ssize_t)rows, need_k ? " with k >= 1" : "", PyArray_NDIM(arr),
                     PyArray_NDIM(arr) == 2 ? " of another shape" : "");
        return -1;
    }
    if (!PyArray_ISCARRAY_RO(arr) || !PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous, aligned and in native byte order", name);
        return -1;
    }
    *data = (const int32_t *)PyArray_DATA(arr);
    *k = PyArray_DIM(arr, 1);
    n = rows * *k;
    for (i = 0; i < n; i++)
        if ((*data)[i] >= V) {
            PyErr_Format(PyExc_ValueError, "%s[%zd, %zd] = %ld is outside the vocabulary [0, %zd)", name,
                         (Py_ssize_t)(i / *k), (Py_ssize_t)(i % *k), (long)(*data)[i], (Py_ssize_t)V);
            return -1;
        }
    return 0;
}

static const char *const pd_compare_kw[] = {"rows", "ids", "m", "pids", "bf16", "threads"};

PyDoc_STRVAR(pd_compare_rows_doc,
"compare_rows(rows, ids, m, pids=None, *, bf16=False, threads=1)\n"
"--\n\nStage 1 of refstats.compare (csrc/compare.c): per logits row, against the stored ids (int32,\n"
"(rows, k), -1 unused) and probe ids, the dict V, M, bS, bP (with pids), HQ, zq, bmax, nT, ninfT,\n"
"QT, sbT, qbT, top, bot (rows, m), Qbeyond, argmax_q, rank_q.");

static PyObject *pd_compare_rows_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    enum { NV = 16 };
    static const char *const names[NV] = {"bS", "bP", "top", "bot", "HQ", "zq", "bmax", "QT", "sbT",
                                          "qbT", "Qbeyond", "nT", "ninfT", "argmax_q", "rank_q", NULL};
    PyObject *a[6] = {NULL, NULL, NULL, NULL, NULL, NULL}, *v[NV] = {NULL}, *res = NULL, *iv = NULL;
    const int32_t *ids = NULL, *pids = NULL;
    Py_ssize_t m;
    npy_intp K = 0, P = 0, bad = -1;
    long threads_l = 1;
    int bf16, rc, kind = 0, i;
    pd_mat mat;
    pd_compare_out out;
    pd_isa isa;
    (void)module;
    if (PD_PARSE("compare_rows", pd_compare_kw, 4, 3, a) < 0 || pd_arg_ssize(a[2], "m", 1, 1, &m) < 0 ||
        pd_arg_bool(a[4], 0, &bf16) < 0)
        return NULL;
    if (a[5] && (threads_l = PyLong_AsLong(a[5])) == -1 && PyErr_Occurred())
        return NULL;
    if (threads_l > INT_MAX || threads_l < INT_MIN) {
        PyErr_SetString(PyExc_OverflowError, "threads does not fit a C int");
        return NULL;
    }
    if (m > 65536) {
        PyErr_Format(PyExc_ValueError, "m must be <= 65536, got %zd", m);
        return NULL;
    }
    if (pd_mat_from(a[0], "quantized_logits", bf16, &mat) < 0 ||
        pd_ids_from(a[1], "ids", mat.rows, mat.V, 1, &ids, &K) < 0 ||
        (a[3] && a[3] != Py_None && pd_ids_from(a[3], "pids", mat.rows, mat.V, 0, &pids, &P) < 0))
        return NULL;
    {
        npy_intp dk[2] = {mat.rows, K}, dp[2] = {mat.rows, P}, dm[2] = {mat.rows, m};
        for (i = 0; i < NV - 1; i++)
            if ((i != 1 || pids) &&
                (v[i] = PyArray_SimpleNew(i < 4 ? 2 : 1, i == 0 ? dk : i == 1 ? dp : i < 4 ? dm : dk,
                                          i < 11 ? NPY_DOUBLE : NPY_INT64)) == NULL)
                goto done;
    }
    out = (pd_compare_out){pd_vec_data(v[0]), pd_vec_data(v[1]), pd_vec_data(v[2]), pd_vec_data(v[3]),
                           pd_vec_data(v[4]), pd_vec_data(v[5]), pd_vec_data(v[6]), pd_vec_data(v[7]),
                           pd_vec_data(v[8]), pd_vec_data(v[9]), pd_vec_data(v[10]), pd_vec_data(v[11]),
                           pd_vec_data(v[12]), pd_vec_data(v[13]), pd_vec_data(v[14])};
    isa = pd_dispatch_current(); /* read under the GIL (_set_simd may run concurrently) */
    Py_BEGIN_ALLOW_THREADS
    rc = pd_compare_run(isa, &mat, ids, K, pids, P, m, (int)threads_l, &out, &bad, &kind);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (kind == 3)
            PyErr_NoMemory();
        else
            PyErr_Format(PyExc_ValueError,
                         "quantized_logits row %zd contains NaN or +inf, or is entirely -inf", (Py_ssize_t)bad);
        goto done;
    }
    if ((res = PyDict_New()) == NULL || (iv = PyLong_FromSsize_t((Py_ssize_t)mat.V)) == NULL ||
        PyDict_SetItemString(res, "V", iv) < 0)
        goto fail;
    Py_CLEAR(iv);
    if ((iv = PyLong_FromSsize_t(m)) == NULL || PyDict_SetItemString(res, "M", iv) < 0)
        goto fail;
    for (i = 0; i < NV - 1; i++)
        if (v[i] && PyDict_SetItemString(res, names[i], v[i]) < 0)
            goto fail;
    goto done;
fail:
    Py_CLEAR(res);
done:
    Py_XDECREF(iv);
    for (i = 0; i < NV; i++)
        Py_XDECREF(v[i]);
    return res;
}

/* ----------------------------------------------------------------------------- SIMD, testing hooks */

static const char *const pd_x_kw[] = {"x"};

static PyObject *pd_round4_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    PyObject *a[1] = {NULL};
    double x;
    if (PD_PARSE("_round4", pd_x_kw, 1, 1, a) < 0 || pd_arg_double(a[0], &x) < 0)
        return NULL;
    return pd_round4(pd_get_state(module), x);
}

static const char *const pd_runsum_kw[] = {"values", "start"};

static PyObject *pd_runsum_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    PyObject *a[2] = {NULL, NULL}, *arr = NULL, *out = NULL;
    double r, total;
    npy_intp n;
    pd_isa isa;
    (void)module;
    if (PD_PARSE("_runsum", pd_runsum_kw, 2, 2, a) < 0 || pd_arg_double(a[1], &r) < 0)
        return NULL;
    arr = PyArray_FROMANY(a[0], NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (arr == NULL)
        return NULL;
    n = PyArray_DIM((PyArrayObject *)arr, 0);
    out = PyArray_SimpleNew(1, (npy_intp[]){(n + 63) / 64}, NPY_DOUBLE);
    if (out == NULL) {
        Py_DECREF(arr);
        return NULL;
    }
    isa = pd_dispatch_current();
    total = pd_runsum(isa, (const double *)PyArray_DATA((PyArrayObject *)arr), n, r,
                      (double *)PyArray_DATA((PyArrayObject *)out));
    Py_DECREF(arr);
    return Py_BuildValue("dN", total, out);
}

static PyObject *pd_path_counts(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return Py_BuildValue("nnn", pd_n_fast, pd_n_exact, pd_n_sacc);
}

static PyObject *pd_simd(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyUnicode_FromString(pd_isa_names[pd_dispatch_current()]);
}

static PyObject *pd_supported_simd(PyObject *module, PyObject *unused)
{
    PyObject *lst = PyList_New(0), *s = NULL;
    int i;
    (void)module;
    (void)unused;
    for (i = 0; lst != NULL && i < PD_NISA; i++) {
        if (!pd_isa_supported((pd_isa)i))
            continue;
        if ((s = PyUnicode_FromString(pd_isa_names[i])) == NULL || PyList_Append(lst, s) < 0)
            Py_CLEAR(lst);
        Py_XDECREF(s);
    }
    return lst;
}

static const char *const pd_name_kw[] = {"name"};

static PyObject *pd_set_simd(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    PyObject *a[1] = {NULL};
    int i;
    (void)module;
    if (PD_PARSE("_set_simd", pd_name_kw, 1, 1, a) < 0)
        return NULL;
    if (!PyUnicode_Check(a[0])) {
        PyErr_SetString(PyExc_TypeError, "_set_simd() takes an ISA name");
        return NULL;
    }
    for (i = 0; i < PD_NISA; i++)
        if (PyUnicode_CompareWithASCIIString(a[0], pd_isa_names[i]) == 0)
            return pd_dispatch_set((pd_isa)i) < 0 ? NULL : Py_NewRef(Py_None);
    PyErr_Format(PyExc_ValueError, "unknown SIMD path %R", a[0]);
    return NULL;
}

#define PD_FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL | METH_KEYWORDS

static PyMethodDef pd_methods[] = {
    {"perplexity_delta", PD_FASTCALL(pd_perplexity_delta), pd_perplexity_delta_doc},
    {"reference", PD_FASTCALL(pd_reference), pd_reference_doc},
    {"quality", PD_FASTCALL(pd_quality_py),
     "quality(relative_delta_pct)\n--\n\nThe quality band: < 1 excellent, < 5 good, < 10 "
     "acceptable, else (and NaN) poor."},
    {"perplexity", PD_FASTCALL(pd_perplexity), pd_perplexity_doc},
    {"sum_log_probs", PD_FASTCALL(pd_sum_log_probs), pd_sum_log_probs_doc},
    {"paired_moments", PD_FASTCALL(pd_paired_moments_py), pd_paired_moments_doc},
    {"logits_stats", PD_FASTCALL(pd_logits_stats), pd_logits_stats_doc},
    {"summarize_rows", PD_FASTCALL(pd_summarize_rows_py), pd_summarize_rows_doc},
    {"compare_rows", PD_FASTCALL(pd_compare_rows_py), pd_compare_rows_doc},
    {"block_bootstrap", PD_FASTCALL(pd_block_bootstrap_py),
     "block_bootstrap(num, den, n_boot, seed)\n--\n\n"
     "Replicates sum(num[idx]) / sum(den[idx]) over blocks drawn with replacement."},
    {"segment_sums", PD_FASTCALL(pd_segment_sums_py),
     "segment_sums(codes, n_groups, values)\n--\n\n"
     "(counts, sums): per-group counts and exactly rounded sums in one pass."},
    {"_runsum", PD_FASTCALL(pd_runsum_py),
     "_runsum(values, start)\n--\n\n(total, sums after every 64 values) of the summarize kernel's running "
     "sum on the active path, values >= 0 (testing hook)."},
    {"_round4", PD_FASTCALL(pd_round4_py),
     "_round4(x)\n--\n\nround(x, 4) as the core computes it (testing hook)."},
    {"_path_counts", pd_path_counts, METH_NOARGS,
     "_path_counts()\n--\n\n(fast, exact, sacc): certified fast results of perplexity_delta, its exact\n"
     "passes, and superaccumulator passes of any exact sum (testing hook)."},
    {"simd", pd_simd, METH_NOARGS, "simd()\n--\n\nName of the active SIMD path."},
    {"supported_simd", pd_supported_simd, METH_NOARGS,
     "supported_simd()\n--\n\nSIMD paths this CPU and build can run."},
    {"_set_simd", PD_FASTCALL(pd_set_simd),
     "_set_simd(name)\n--\n\nPin the SIMD path (testing hook; process-wide)."},
    {NULL, NULL, 0, NULL}};

/* ----------------------------------------------------------------------------- module */

/* A module constant: steals value (NULL: an error already set). */
static int pd_add(PyObject *module, const char *name, PyObject *value)
{
    int rc = value ? PyModule_AddObjectRef(module, name, value) : -1;
    Py_XDECREF(value);
    return rc;
}

static int pd_exec(PyObject *module)
{
    pd_state *st = pd_get_state(module);
    PyObject *names, *thresholds;
    int k;
    if (PyArray_ImportNumPyAPI() < 0 || pd_dispatch_init() < 0)
        return -1;
    for (k = 0; k < PD_NKEYS; k++)
        if ((st->keys[k] = PyUnicode_InternFromString(pd_key_names[k])) == NULL)
            return -1;
    if ((names = PyTuple_New(PD_NQUALITY)) == NULL ||
        (thresholds = PyTuple_New(PD_NQUALITY - 1)) == NULL) {
        Py_XDECREF(names);
        return -1;
    }
    for (k = 0; k < PD_NQUALITY; k++) {
        if ((st->quality[k] = PyUnicode_InternFromString(pd_quality_names[k])) == NULL)
            break;
        PyTuple_SET_ITEM(names, k, Py_NewRef(st->quality[k]));
        if (k < PD_NQUALITY - 1) {
            PyObject *t = PyFloat_FromDouble(pd_quality_thresholds[k]);
            if (t == NULL)
                break;
            PyTuple_SET_ITEM(thresholds, k, t);
        }
    }
    if (k < PD_NQUALITY) {
        Py_DECREF(names);
        Py_DECREF(thresholds);
        return -1;
    }
    if (pd_add(module, "QUALITIES", names) < 0 || pd_add(module, "QUALITY_THRESHOLDS", thresholds) < 0 ||
        (st->four = PyLong_FromLong(4)) == NULL ||
        (st->float_round = PyObject_GetAttrString((PyObject *)&PyFloat_Type, "__round__")) == NULL ||
        (st->moments_type = PyStructSequence_NewType(&pd_moments_desc)) == NULL ||
        (st->logits_type = PyStructSequence_NewType(&pd_logits_desc)) == NULL ||
        PyModule_AddType(module, st->moments_type) < 0 ||
        PyModule_AddType(module, st->logits_type) < 0 ||
        pd_add(module, "POSITIVE_TOLERANCE", PyFloat_FromDouble(PD_DEFAULT_TOL)) < 0 ||
        PyModule_AddIntConstant(module, "BLOCK", PD_BLOCK) < 0)
        return -1;
    return 0;
}

static int pd_traverse(PyObject *module, visitproc visit, void *arg)
{
    pd_state *st = pd_get_state(module);
    if (st == NULL)
        return 0;
    Py_VISIT(st->adapter);
    Py_VISIT(st->float_round);
    Py_VISIT(st->moments_type);
    Py_VISIT(st->logits_type);
    return 0;
}

static int pd_clear(PyObject *module)
{
    pd_state *st = pd_get_state(module);
    int k;
    if (st == NULL)
        return 0;
    Py_CLEAR(st->adapter);
    Py_CLEAR(st->float_round);
    Py_CLEAR(st->four);
    Py_CLEAR(st->moments_type);
    Py_CLEAR(st->logits_type);
    for (k = 0; k < PD_NKEYS; k++)
        Py_CLEAR(st->keys[k]);
    for (k = 0; k < PD_NQUALITY; k++)
        Py_CLEAR(st->quality[k]);
    return 0;
}

static void pd_free(void *module) { pd_clear((PyObject *)module); }

static PyModuleDef_Slot pd_slots[] = {{Py_mod_exec, (void *)pd_exec}, {0, NULL}};

static struct PyModuleDef pd_module = {
    PyModuleDef_HEAD_INIT,
    "ppldelta._core",
    "C core of ppldelta: validated, compensated, SIMD reductions over log-probabilities.",
    sizeof(pd_state),
    pd_methods,
    pd_slots,
    pd_traverse,
    pd_clear,
    pd_free};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&pd_module); }
