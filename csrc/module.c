/* ppldelta._core: module definition, argument parsing and the reference-compatible results.
 *
 * Multi-phase init with module state.  The functions use METH_FASTCALL and build their results
 * in C, so a call on ten-element lists costs about as much as the pure-Python reference.
 */
#define PPLDELTA_IMPORT_ARRAY
#include "common.h"
#include "input.h"
#include "stats.h"
#include "logits.h"

#define PD_DEFAULT_TOL 1e-3
#include <float.h>

/* How often perplexity_delta was certified from the fast pass or needed the exact pass, and how
 * often a sum needed the superaccumulator pass (testing hook; GIL-protected). */
static Py_ssize_t pd_n_fast, pd_n_exact;
static Py_ssize_t pd_n_sacc;

typedef struct {
    PyObject *adapter;     /* ppldelta._adapt.as_array, imported on first use */
    PyObject *float_round; /* float.__round__ */
    PyObject *four;        /* 4 */
    PyObject *k_orig, *k_quant, *k_abs, *k_rel, *k_quality;
    PyObject *q_excellent, *q_good, *q_acceptable, *q_poor;
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

/* ----------------------------------------------------------------------------- exact sums */

/* The exactly rounded sum (math.fsum's; NaN for -inf and +inf together, +-inf for finite
 * terms whose exact total is beyond DBL_MAX) of an opened, non-empty source: the exact kernels,
 * and where their certificate (common.h: pd_acc_exact) fails, the superaccumulator over the
 * raw values.  Each pass is O(1) memory; an infinite term settles the sum in the first. */
static int pd_exact_sum(pd_src *src, const char *name, double tol, double *out)
{
    pd_acc acc = PD_ACC_ZERO;
    pd_sacc big;
    if (pd_src_sum(src, name, tol, PD_MODE_EXACT, &acc) < 0)
        return -1;
    if (pd_acc_exact(&acc, out))
        return 0;
    pd_n_sacc++;
    memset(&big, 0, sizeof big);
    memset(&acc, 0, sizeof acc);
    acc.sacc = &big;
    if (pd_src_sum(src, name, tol, PD_MODE_SACC, &acc) < 0)
        return -1;
    /* (infinities here only if a list changed between the passes) */
    *out = pd_acc_inf(&acc) ? pd_acc_value(&acc) : pd_sacc_value(&big);
    return 0;
}

/* ----------------------------------------------------------------------------- arguments */

/* Parse (positional-or-keyword names[0..npos), keyword-only names[npos..nnames)).
 * out[] must be pre-filled with NULL; required arguments are the first nreq. */
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

static int pd_parse_tol(PyObject *obj, double *tol)
{
    if (obj == NULL) {
        *tol = PD_DEFAULT_TOL;
        return 0;
    }
    *tol = PyFloat_AsDouble(obj);
    if (*tol == -1.0 && PyErr_Occurred())
        return -1;
    if (!(*tol >= 0.0)) {
        PyErr_Format(PyExc_ValueError, "positive_tolerance must be a number >= 0, got %R", obj);
        return -1;
    }
    return 0;
}

/* Exactly rounded sum of one input, which must not be empty. */
static int pd_sum_one(pd_state *st, PyObject *obj, const char *name, double tol, npy_intp *n,
                      double *sum)
{
    pd_src src;
    PyObject *adapter = pd_adapter(st);
    int rc;
    if (adapter == NULL || pd_src_open(adapter, obj, name, &src) < 0)
        return -1;
    *n = src.n;
    if (src.n == 0) {
        PyErr_Format(PyExc_ValueError, "%s is empty", name);
        pd_src_close(&src);
        return -1;
    }
    rc = pd_exact_sum(&src, name, tol, sum);
    pd_src_close(&src);
    return rc;
}

/* ----------------------------------------------------------------------------- rounding */

/* round(x, 4) bit-for-bit as Python's float.__round__ (correctly rounded decimal, ties to
 * even on the exact binary value), without its dtoa round trip (~0.5 us a call).
 * For a = |x| with p = fl(a * 1e4) < 2^52: e = fma(a, 1e4, -p) is the exact rounding error, so
 * the exact product is p + e; k = floor(p) and d = p - k are exact, d - 0.5 is exact whenever it
 * can be near 0 (Sterbenz), and |e| < ulp(p) <= 0.5 decides the side of a half.  R / 1e4 is
 * then the double nearest R * 10^-4, which is what Python's strtod returns.  Anything outside
 * that range (huge values) goes to float.__round__ itself. */
static double pd_round4_fast(double x, int *exact)
{
    double a = fabs(x), p, e, k, t, r;
    *exact = 1;
    if (!isfinite(x) || x == 0.0)
        return x;
    p = a * 1e4;
    if (!(p < 4503599627370496.0)) { /* 2^52 */
        *exact = 0;
        return x;
    }
    e = fma(a, 1e4, -p);
    k = floor(p);
    t = (p - k) - 0.5;
    if (t < 0.0 || (t == 0.0 && e < 0.0))
        r = k;
    else if (t > 0.0 || e > 0.0)
        r = k + 1.0;
    else
        r = fmod(k, 2.0) == 0.0 ? k : k + 1.0; /* exact tie: to even */
    return copysign(r / 1e4, x);
}

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

static PyObject *pd_round4_py(PyObject *module, PyObject *arg)
{
    double x = PyFloat_AsDouble(arg);
    if (x == -1.0 && PyErr_Occurred())
        return NULL;
    return pd_round4(pd_get_state(module), x);
}

static int pd_dict_set_round(pd_state *st, PyObject *d, PyObject *key, double x)
{
    PyObject *v = pd_round4(st, x);
    int rc;
    if (v == NULL)
        return -1;
    rc = PyDict_SetItem(d, key, v);
    Py_DECREF(v);
    return rc;
}

/* ----------------------------------------------------------------------------- certificate */

/* The reference's formulas, in its order. */
typedef struct {
    double avg_o, ppl_o, ppl_q, abs, rel;
} pd_fields;

static void pd_fields_eval(double so, double sq, npy_intp n, pd_fields *f)
{
    double avg_q = sq / (double)n;
    f->avg_o = so / (double)n;
    f->ppl_o = exp(-f->avg_o);
    f->ppl_q = exp(-avg_q);
    f->abs = f->ppl_q - f->ppl_o;
    f->rel = f->ppl_o > 0 ? (f->abs / f->ppl_o) * 100 : 0.0;
}

/* Could round(v', 4) differ from round(v, 4) for some |v' - v| <= d? */
static int pd_near_round4(double v, double d)
{
    double y = fabs(v) * 1e4, fr;
    if (!isfinite(v) || !isfinite(d) || y >= 1e15)
        return 1;
    fr = y - floor(y);
    return fabs(fr - 0.5) * 1e-4 <= d + fabs(v) * 8 * DBL_EPSILON;
}

/* The fast kernels' sums so, sq are within PD_FAST_ERR * sum|x| of the exact ones, and
 * sum|x| <= -s + 2 n tol because every x <= tol.  Propagate that through the reference's
 * formulas (mean: e/n plus one rounding of the quotient; exp: relative error = absolute error
 * of its argument, plus its own ulps; then the subtraction and the division) and report
 * whether any rounded field or the quality band could change.  When it could, the caller
 * recomputes with the exact kernels; otherwise the fast result is provably the exact one.
 * q_neginf: sq is -inf from a -inf term (exact), so only the original's perplexity can move. */
static int pd_fields_fragile(const pd_fields *f, double so, double sq, npy_intp n, double tol,
                             int q_neginf)
{
    const double eps = DBL_EPSILON;
    double nn = (double)n, eo, eq, dmo, dmq, d_o, d_q, d_abs, d_rel;
    if (!isfinite(tol) || !isfinite(so) || !(isfinite(sq) || q_neginf))
        return 1;
    eo = PD_FAST_ERR * (-so + 2.0 * nn * tol);
    dmo = eo / nn + 2 * eps * fabs(so / nn);
    d_o = f->ppl_o * (1.01 * dmo + 4 * eps);
    if (q_neginf) /* quantized_perplexity, the deltas: inf exactly; quality: poor */
        return pd_near_round4(f->ppl_o, d_o);
    eq = PD_FAST_ERR * (-sq + 2.0 * nn * tol);
    dmq = eq / nn + 2 * eps * fabs(sq / nn);
    d_q = f->ppl_q * (1.01 * dmq + 4 * eps);
    d_abs = d_o + d_q + 4 * eps * (f->ppl_o + f->ppl_q);
    d_rel = 1.01 * 100 * (d_abs / f->ppl_o + fabs(f->abs) * d_o / (f->ppl_o * f->ppl_o)) +
            8 * eps * fabs(f->rel);
    return pd_near_round4(f->ppl_o, d_o) || pd_near_round4(f->ppl_q, d_q) ||
           pd_near_round4(f->abs, d_abs) || pd_near_round4(f->rel, d_rel) ||
           fabs(f->rel - 1.0) <= d_rel || fabs(f->rel - 5.0) <= d_rel ||
           fabs(f->rel - 10.0) <= d_rel;
}

/* ----------------------------------------------------------------------------- functions */

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
    PyObject *a[3] = {NULL, NULL, NULL}, *d = NULL, *quality;
    pd_src so, sq;
    pd_acc ao = PD_ACC_ZERO, aq = PD_ACC_ZERO;
    PyObject *adapter;
    pd_fields f;
    double tol, ppl_orig, ppl_quant, absolute, relative;
    int rc;

    if (pd_parse("perplexity_delta", args, nargs, kwnames, pd_delta_kw, 2, 3, 2, a) < 0 ||
        pd_parse_tol(a[2], &tol) < 0)
        return NULL;
    adapter = pd_adapter(st);
    if (adapter == NULL || pd_src_open(adapter, a[0], pd_delta_kw[0], &so) < 0)
        return NULL;
    if (pd_src_open(adapter, a[1], pd_delta_kw[1], &sq) < 0) {
        pd_src_close(&so);
        return NULL;
    }
    if (so.n == 0 || sq.n == 0) {
        PyErr_Format(PyExc_ValueError, "%s is empty", so.n == 0 ? pd_delta_kw[0] : pd_delta_kw[1]);
        rc = -1;
    }
    else if (so.n != sq.n) {
        PyErr_Format(PyExc_ValueError,
                     "length mismatch: original_log_probs has %zd values, quantized_log_probs "
                     "has %zd (both models must be scored on the same tokens)",
                     (Py_ssize_t)so.n, (Py_ssize_t)sq.n);
        rc = -1;
    }
    else {
        /* Fast pass (memory bandwidth); the exact pass only when the certificate fails, and
         * never over an input whose sum a -inf (or +inf) term already settles. */
        rc = (pd_src_sum(&so, pd_delta_kw[0], tol, PD_MODE_FAST, &ao) < 0 ||
              pd_src_sum(&sq, pd_delta_kw[1], tol, PD_MODE_FAST, &aq) < 0) ? -1 : 0;
        if (rc == 0) {
            double xo = pd_acc_value(&ao), xq = pd_acc_value(&aq);
            int io = pd_acc_inf(&ao), iq = pd_acc_inf(&aq);
            pd_fields_eval(xo, xq, so.n, &f);
            if ((io && (iq || xo == -INFINITY)) ||
                !pd_fields_fragile(&f, xo, xq, so.n, tol, iq && xq == -INFINITY))
                pd_n_fast++;
            else {
                rc = ((!io && pd_exact_sum(&so, pd_delta_kw[0], tol, &xo) < 0) ||
                      (!iq && pd_exact_sum(&sq, pd_delta_kw[1], tol, &xq) < 0)) ? -1 : 0;
                if (rc == 0)
                    pd_fields_eval(xo, xq, so.n, &f);
                pd_n_exact++;
            }
        }
    }
    pd_src_close(&so);
    pd_src_close(&sq);
    if (rc < 0)
        return NULL;

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
    ppl_orig = f.ppl_o;
    ppl_quant = f.ppl_q;
    absolute = f.abs;
    relative = f.rel;
    if (relative < 1.0)
        quality = st->q_excellent;
    else if (relative < 5.0)
        quality = st->q_good;
    else if (relative < 10.0)
        quality = st->q_acceptable;
    else
        quality = st->q_poor;

    d = PyDict_New();
    if (d == NULL || pd_dict_set_round(st, d, st->k_orig, ppl_orig) < 0 ||
        pd_dict_set_round(st, d, st->k_quant, ppl_quant) < 0 ||
        pd_dict_set_round(st, d, st->k_abs, absolute) < 0 ||
        pd_dict_set_round(st, d, st->k_rel, relative) < 0 ||
        PyDict_SetItem(d, st->k_quality, quality) < 0) {
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}

static const char *const pd_ppl_kw[] = {"log_probs", "positive_tolerance"};

PyDoc_STRVAR(pd_perplexity_doc,
"perplexity(log_probs, *, positive_tolerance=1e-3)\n--\n\n"
"exp(-mean(log_probs)) with the exactly rounded sum (unrounded; inf when it overflows).\n");

static PyObject *pd_perplexity(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[2] = {NULL, NULL};
    npy_intp n;
    double tol, sum;
    if (pd_parse("perplexity", args, nargs, kwnames, pd_ppl_kw, 1, 2, 1, a) < 0 ||
        pd_parse_tol(a[1], &tol) < 0 ||
        pd_sum_one(pd_get_state(module), a[0], pd_ppl_kw[0], tol, &n, &sum) < 0)
        return NULL;
    return PyFloat_FromDouble(exp(-(sum / (double)n)));
}

PyDoc_STRVAR(pd_sum_log_probs_doc,
"sum_log_probs(log_probs, *, positive_tolerance=1e-3) -> (n, total)\n--\n\n"
"Count and exactly rounded sum (as math.fsum), with validation; -inf when a term is -inf.\n"
"Empty input gives (0, 0.0).\n");

static PyObject *pd_sum_log_probs(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    pd_state *st = pd_get_state(module);
    PyObject *a[2] = {NULL, NULL}, *adapter;
    pd_src src;
    double tol, sum = 0.0;
    int rc;
    if (pd_parse("sum_log_probs", args, nargs, kwnames, pd_ppl_kw, 1, 2, 1, a) < 0 ||
        pd_parse_tol(a[1], &tol) < 0)
        return NULL;
    adapter = pd_adapter(st);
    if (adapter == NULL || pd_src_open(adapter, a[0], pd_ppl_kw[0], &src) < 0)
        return NULL;
    rc = src.n > 0 ? pd_exact_sum(&src, pd_ppl_kw[0], tol, &sum) : 0;
    pd_src_close(&src);
    if (rc < 0)
        return NULL;
    return Py_BuildValue("nd", (Py_ssize_t)src.n, sum);
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
    PyObject *lst = PyList_New(0);
    int i;
    (void)module;
    (void)unused;
    if (lst == NULL)
        return NULL;
    for (i = 0; i < PD_NISA; i++) {
        if (pd_isa_supported((pd_isa)i)) {
            PyObject *s = PyUnicode_FromString(pd_isa_names[i]);
            if (s == NULL || PyList_Append(lst, s) < 0) {
                Py_XDECREF(s);
                Py_DECREF(lst);
                return NULL;
            }
            Py_DECREF(s);
        }
    }
    return lst;
}

static PyObject *pd_set_simd(PyObject *module, PyObject *name)
{
    int i;
    (void)module;
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "_set_simd() takes an ISA name");
        return NULL;
    }
    for (i = 0; i < PD_NISA; i++)
        if (PyUnicode_CompareWithASCIIString(name, pd_isa_names[i]) == 0) {
            if (pd_dispatch_set((pd_isa)i) < 0)
                return NULL;
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "unknown SIMD path %R", name);
    return NULL;
}

/* ----------------------------------------------------------------------------- analysis kernels */

static PyObject *pd_block_bootstrap_py(PyObject *module, PyObject *args)
{
    PyObject *onum, *oden, *res = NULL;
    PyArrayObject *num = NULL, *den = NULL, *out = NULL;
    Py_ssize_t n_boot;
    unsigned long long seed;
    npy_intp nb, dims[1];
    (void)module;
    if (!PyArg_ParseTuple(args, "OOnK:block_bootstrap", &onum, &oden, &n_boot, &seed))
        return NULL;
    num = (PyArrayObject *)PyArray_FROMANY(onum, NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY);
    den = num ? (PyArrayObject *)PyArray_FROMANY(oden, NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY) : NULL;
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
    out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_DOUBLE);
    if (out == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    pd_block_bootstrap((const double *)PyArray_DATA(num), (const double *)PyArray_DATA(den), nb,
                       n_boot, (uint64_t)seed, (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(num);
    Py_XDECREF(den);
    Py_XDECREF(out);
    return res;
}

static PyObject *pd_segment_sums_py(PyObject *module, PyObject *args)
{
    PyObject *ocodes, *ovals, *res = NULL;
    PyArrayObject *codes = NULL, *vals = NULL, *counts = NULL, *sums = NULL;
    Py_ssize_t n_groups;
    pd_acc *acc = NULL;
    npy_intp n, i, dims[1];
    const npy_intp *c;
    int rc;
    (void)module;
    if (!PyArg_ParseTuple(args, "OnO:segment_sums", &ocodes, &n_groups, &ovals))
        return NULL;
    codes = (PyArrayObject *)PyArray_FROMANY(ocodes, NPY_INTP, 1, 1, NPY_ARRAY_IN_ARRAY);
    vals = codes ? (PyArrayObject *)PyArray_FROMANY(ovals, NPY_DOUBLE, 1, 1, NPY_ARRAY_IN_ARRAY) : NULL;
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
    res = rc < 0 ? PyErr_NoMemory() : Py_BuildValue("OO", counts, sums);
done:
    PyMem_Free(acc);
    Py_XDECREF(codes);
    Py_XDECREF(vals);
    Py_XDECREF(counts);
    Py_XDECREF(sums);
    return res;
}

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

static PyObject *pd_new_vec(npy_intp n, int type)
{
    npy_intp dims[1] = {n};
    return PyArray_SimpleNew(1, dims, type);
}

static PyObject *pd_logits_stats(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"a", "b", "targets", "ignore_index", "bf16", "topk", "threads", NULL};
    PyObject *oa, *ob = Py_None, *ot = Py_None, *res = NULL;
    PyObject *lp_a = NULL, *lp_b = NULL, *kld = NULL, *kld_rev = NULL, *same = NULL, *rank = NULL,
             *rank_a = NULL;
    PyArrayObject *tarr = NULL;
    const pd_logits_fns *fn;
    long long ignore = -100;
    int bf16 = 0, topk = 1, threads = 1, kind = 0, rc;
    pd_mat a, b;
    pd_logits_out out = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const npy_int64 *tg = NULL;
    npy_intp bad = -1;
    (void)module;
    memset(&b, 0, sizeof b);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOLppi:logits_stats", kwlist, &oa, &ob, &ot,
                                     &ignore, &bf16, &topk, &threads))
        return NULL;
    if (pd_mat_from(oa, "original_logits", bf16, &a) < 0)
        return NULL;
    if (ob != Py_None) {
        if (pd_mat_from(ob, "quantized_logits", bf16, &b) < 0)
            return NULL;
        if (b.rows != a.rows || b.V != a.V || b.dt != a.dt) {
            PyErr_Format(PyExc_ValueError,
                         "shape/dtype mismatch: original_logits is (%zd, %zd), quantized_logits is "
                         "(%zd, %zd)%s",
                         (Py_ssize_t)a.rows, (Py_ssize_t)a.V, (Py_ssize_t)b.rows, (Py_ssize_t)b.V,
                         b.dt != a.dt ? " with a different dtype" : "");
            return NULL;
        }
    }
    if (ot != Py_None) {
        /* native, aligned, contiguous int64 (a copy only when the input is not) */
        tarr = (PyArrayObject *)PyArray_FROMANY(ot, NPY_INT64, 1, 1, NPY_ARRAY_IN_ARRAY);
        if (tarr == NULL)
            goto done;
        if (PyArray_DIM(tarr, 0) != a.rows) {
            PyErr_Format(PyExc_ValueError, "targets has %zd values for %zd logits rows",
                         (Py_ssize_t)PyArray_DIM(tarr, 0), (Py_ssize_t)a.rows);
            goto done;
        }
        tg = (const npy_int64 *)PyArray_DATA(tarr);
        if (!(lp_a = pd_new_vec(a.rows, NPY_DOUBLE)))
            goto done;
        out.lp_a = (double *)PyArray_DATA((PyArrayObject *)lp_a);
        if (b.base) {
            if (!(lp_b = pd_new_vec(a.rows, NPY_DOUBLE)))
                goto done;
            out.lp_b = (double *)PyArray_DATA((PyArrayObject *)lp_b);
        }
    }
    if (b.base) {
        if (!(kld = pd_new_vec(a.rows, NPY_DOUBLE)) || !(kld_rev = pd_new_vec(a.rows, NPY_DOUBLE)) ||
            !(same = pd_new_vec(a.rows, NPY_BOOL)))
            goto done;
        out.kld = (double *)PyArray_DATA((PyArrayObject *)kld);
        out.kld_rev = (double *)PyArray_DATA((PyArrayObject *)kld_rev);
        out.same_top1 = (npy_bool *)PyArray_DATA((PyArrayObject *)same);
        if (topk) {
            if (!(rank = pd_new_vec(a.rows, NPY_INT64)) || !(rank_a = pd_new_vec(a.rows, NPY_INT64)))
                goto done;
            out.rank_b = (npy_int64 *)PyArray_DATA((PyArrayObject *)rank);
            out.rank_a = (npy_int64 *)PyArray_DATA((PyArrayObject *)rank_a);
        }
    }
    fn = pd_logits_kernel(a.dt); /* resolved under the GIL (_set_simd may run concurrently) */
    Py_BEGIN_ALLOW_THREADS
    rc = pd_logits_run(fn, &a, &b, tg, (npy_int64)ignore, threads, &out, &bad, &kind);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (kind == 1)
            PyErr_Format(PyExc_ValueError, "targets[%zd] = %lld is outside the vocabulary [0, %zd)",
                         (Py_ssize_t)bad, (long long)tg[bad], (Py_ssize_t)a.V);
        else
            PyErr_Format(PyExc_ValueError,
                         "logits row %zd contains NaN or +inf, or is entirely -inf%s",
                         (Py_ssize_t)bad, b.base ? " (in original_logits or quantized_logits)" : "");
        goto done;
    }
#define PD_OR_NONE(x) ((x) ? (x) : Py_None)
    res = Py_BuildValue("OOOOOOO", PD_OR_NONE(lp_a), PD_OR_NONE(lp_b), PD_OR_NONE(kld),
                        PD_OR_NONE(kld_rev), PD_OR_NONE(same), PD_OR_NONE(rank),
                        PD_OR_NONE(rank_a));
#undef PD_OR_NONE
done:
    Py_XDECREF(lp_a);
    Py_XDECREF(lp_b);
    Py_XDECREF(kld);
    Py_XDECREF(kld_rev);
    Py_XDECREF(same);
    Py_XDECREF(rank);
    Py_XDECREF(rank_a);
    Py_XDECREF(tarr);
    return res;
}

static PyMethodDef pd_methods[] = {
    {"logits_stats", (PyCFunction)(void (*)(void))pd_logits_stats, METH_VARARGS | METH_KEYWORDS,
     "logits_stats(a, b=None, targets=None, ignore_index=-100, bf16=False, topk=True, threads=1)\n"
     "--\n\n(lp_a, lp_b, kld, kld_rev, same_top1, rank_b, rank_a) per row; None where not computed."},
    {"block_bootstrap", pd_block_bootstrap_py, METH_VARARGS,
     "block_bootstrap(num, den, n_boot, seed)\n--\n\n"
     "Replicates sum(num[idx]) / sum(den[idx]) over blocks drawn with replacement."},
    {"segment_sums", pd_segment_sums_py, METH_VARARGS,
     "segment_sums(codes, n_groups, values)\n--\n\n"
     "(counts, sums): per-group counts and exactly rounded sums in one pass."},
    {"perplexity_delta", (PyCFunction)(void (*)(void))pd_perplexity_delta,
     METH_FASTCALL | METH_KEYWORDS, pd_perplexity_delta_doc},
    {"perplexity", (PyCFunction)(void (*)(void))pd_perplexity, METH_FASTCALL | METH_KEYWORDS,
     pd_perplexity_doc},
    {"sum_log_probs", (PyCFunction)(void (*)(void))pd_sum_log_probs,
     METH_FASTCALL | METH_KEYWORDS, pd_sum_log_probs_doc},
    {"_round4", pd_round4_py, METH_O,
     "_round4(x)\n--\n\nround(x, 4) as the core computes it (testing hook)."},
    {"_path_counts", pd_path_counts, METH_NOARGS,
     "_path_counts()\n--\n\n(fast, exact, sacc): certified fast results of perplexity_delta, its exact\n"
     "passes, and superaccumulator passes of any exact sum (testing hook)."},
    {"simd", pd_simd, METH_NOARGS, "simd()\n--\n\nName of the active SIMD path."},
    {"supported_simd", pd_supported_simd, METH_NOARGS,
     "supported_simd()\n--\n\nSIMD paths this CPU and build can run."},
    {"_set_simd", pd_set_simd, METH_O,
     "_set_simd(name)\n--\n\nPin the SIMD path (testing hook; process-wide)."},
    {NULL, NULL, 0, NULL}};

/* ----------------------------------------------------------------------------- module */

static int pd_exec(PyObject *module)
{
    pd_state *st = pd_get_state(module);
    if (PyArray_ImportNumPyAPI() < 0)
        return -1;
    if (pd_dispatch_init() < 0)
        return -1;
#define PD_STR(field, text)                                   \
    if ((st->field = PyUnicode_InternFromString(text)) == NULL) \
        return -1;
    PD_STR(k_orig, "original_perplexity")
    PD_STR(k_quant, "quantized_perplexity")
    PD_STR(k_abs, "absolute_delta")
    PD_STR(k_rel, "relative_delta_pct")
    PD_STR(k_quality, "quality")
    PD_STR(q_excellent, "excellent")
    PD_STR(q_good, "good")
    PD_STR(q_acceptable, "acceptable")
    PD_STR(q_poor, "poor")
#undef PD_STR
    if ((st->four = PyLong_FromLong(4)) == NULL)
        return -1;
    if ((st->float_round = PyObject_GetAttrString((PyObject *)&PyFloat_Type, "__round__")) == NULL)
        return -1;
    {
        PyObject *tol = PyFloat_FromDouble(PD_DEFAULT_TOL);
        int rc = tol ? PyModule_AddObjectRef(module, "POSITIVE_TOLERANCE", tol) : -1;
        Py_XDECREF(tol);
        if (rc < 0)
            return -1;
    }
    if (PyModule_AddIntConstant(module, "BLOCK", PD_BLOCK) < 0)
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
    return 0;
}

static int pd_clear(PyObject *module)
{
    pd_state *st = pd_get_state(module);
    if (st == NULL)
        return 0;
    Py_CLEAR(st->adapter);
    Py_CLEAR(st->float_round);
    Py_CLEAR(st->four);
    Py_CLEAR(st->k_orig);
    Py_CLEAR(st->k_quant);
    Py_CLEAR(st->k_abs);
    Py_CLEAR(st->k_rel);
    Py_CLEAR(st->k_quality);
    Py_CLEAR(st->q_excellent);
    Py_CLEAR(st->q_good);
    Py_CLEAR(st->q_acceptable);
    Py_CLEAR(st->q_poor);
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
