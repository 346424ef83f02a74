/* Paired moments: everything the analysis layer needs from two per-token log-prob inputs, in
 * one read of each.
 *
 * The two inputs are read in step, PD_BLOCK values at a time (pd_reader: in place for aligned
 * contiguous float64, else gathered into a stack buffer), and each chunk goes
 *  - through the active ISA's exact reduction kernel (reduce_template.h), which validates it
 *    (NaN, values above the tolerance) and adds it to the exact accumulator of the total;
 *  - through one scalar loop for the moments: Neumaier sums (pd_csum) of o^2, q^2, o q, dp,
 *    dp^2, dp^4 with dp = exp(q) - exp(o); the -inf counts; each value into its group's exact
 *    accumulator (pd_acc, as segment_sums); o - q into the current block's sum.
 * Afterwards the certificates: a total or a group whose pd_acc_exact fails gets the
 * superaccumulator in a second pass (exact.c; inputs built on a rounding boundary only).  So
 * sum_o, sum_q and the group sums are exactly rounded, as _core.sum_log_probs and segment_sums.
 *
 * Errors: perplexity_delta's, verbatim.  A chunk that fails validation (or a list item that is
 * not a number) stops the pass, and perplexity_delta's fast validation (the whole original, then
 * the quantized input) runs to raise exactly the error it raises.
 * The GIL is released while both inputs are native arrays read directly (signals are checked
 * every PD_SIGNAL_CHUNK values); lists and NpyIter reads keep it.
 */
#include "moments.h"
#include "reference.h"

typedef struct {
    pd_acc acc_o, acc_q;
    pd_csum oo, qq, oq, dp, dp2, dp4, blk;
    npy_intp neginf_o, neginf_q, block_pos, block_idx;
    pd_acc *gacc; /* 2 n_groups: o's, then q's */
} pd_mstate;

/* The moments of one chunk of m pairs starting at flat index i0 (already validated). */
static void pd_moments_chunk(pd_mstate *s, const pd_moments_extra *x, const double *po,
                             const double *pq, npy_intp i0, npy_intp m)
{
    npy_intp j;
    for (j = 0; j < m; j++) {
        double o = po[j], q = pq[j], dp = exp(q) - exp(o), dp2 = dp * dp;
        s->neginf_o += o == -INFINITY;
        s->neginf_q += q == -INFINITY;
        pd_csum_add(&s->oo, o * o);
        pd_csum_add(&s->qq, q * q);
        pd_csum_add(&s->oq, o * q);
        pd_csum_add(&s->dp, dp);
        pd_csum_add(&s->dp2, dp2);
        pd_csum_add(&s->dp4, dp2 * dp2);
        if (x->codes) {
            npy_intp g = x->codes[i0 + j];
            pd_acc_add(&s->gacc[g], o);
            pd_acc_add(&s->gacc[x->n_groups + g], q);
            x->group_n[g]++;
        }
        if (x->block_size) {
            pd_csum_add(&s->blk, o - q);
            if (++s->block_pos == x->block_size) {
                x->block_d[s->block_idx++] = pd_csum_value(&s->blk);
                s->blk.s = s->blk.c = 0.0;
                s->block_pos = 0;
            }
        }
    }
}

/* The one read of both inputs.  Returns 0, -1 with an exception, or 1 when a chunk failed
 * validation (no exception set). */
static int pd_moments_pass(pd_reader *ro, pd_reader *rq, double tol, const pd_moments_extra *x,
                           pd_mstate *s)
{
    double bo[PD_BLOCK], bq[PD_BLOCK];
    pd_reduce_fn kern = pd_reduce_kernel(PD_F64, PD_MODE_EXACT); /* resolved under the GIL */
    npy_intp n = ro->src->n, done = 0;
    int nogil = ro->direct && rq->direct, rc = 0;
    PyThreadState *ts = NULL;
    while (done < n && rc == 0) {
        npy_intp m = n - done < PD_BLOCK ? n - done : PD_BLOCK;
        const double *po, *pq;
        if (nogil && ts == NULL && n - done > 4096)
            ts = PyEval_SaveThread();
        if ((po = pd_reader_next(ro, bo, m)) == NULL || (pq = pd_reader_next(rq, bq, m)) == NULL)
            rc = -1; /* (never for direct readers, so the GIL is held) */
        else if (kern((const char *)po, m, sizeof(double), tol, &s->acc_o) >= 0 ||
                 kern((const char *)pq, m, sizeof(double), tol, &s->acc_q) >= 0)
            rc = 1;
        else
            pd_moments_chunk(s, x, po, pq, done, m);
        done += m;
        if (ts && (done % PD_SIGNAL_CHUNK == 0 || done == n || rc)) {
            PyEval_RestoreThread(ts);
            ts = NULL;
            if (rc == 0 && done < n && PyErr_CheckSignals() < 0)
                rc = -1;
        }
    }
    return rc;
}

/* After a failed pass: raise what perplexity_delta raises on these inputs. */
static int pd_moments_error(pd_src *so, pd_src *sq, const char *name_o, const char *name_q,
                            double tol, int rc)
{
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    pd_acc scratch_o = PD_ACC_ZERO, scratch_q = PD_ACC_ZERO;
    if (rc < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError) && !PyErr_ExceptionMatches(PyExc_TypeError))
            return -1; /* MemoryError, KeyboardInterrupt, RuntimeError: as they are */
        PyErr_Fetch(&et, &ev, &tb);
    }
    if (pd_src_sum(so, name_o, tol, PD_MODE_FAST, &scratch_o) < 0 ||
        pd_src_sum(sq, name_q, tol, PD_MODE_FAST, &scratch_q) < 0) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return -1;
    }
    if (et != NULL)
        PyErr_Restore(et, ev, tb);
    else
        PyErr_Format(PyExc_RuntimeError, "%s or %s changed during the call", name_o, name_q);
    return -1;
}

/* Groups whose certificate failed: superaccumulate their values of one input in a second read. */
static int pd_groups_sacc(pd_src *src, const char *name, const npy_intp *codes, pd_acc *gacc,
                          npy_intp n_groups, double *sums)
{
    pd_sacc *big;
    pd_reader r;
    double buf[PD_BLOCK];
    npy_intp g, nbig = 0, done = 0, n = src->n, j;
    int rc = 0;
    for (g = 0; g < n_groups; g++)
        nbig += !pd_acc_exact(&gacc[g], &sums[g]);
    if (nbig == 0)
        return 0;
    big = PyMem_Calloc((size_t)nbig, sizeof *big);
    if (big == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (g = 0, nbig = 0; g < n_groups; g++)
        if (!pd_acc_exact(&gacc[g], &sums[g]))
            gacc[g].sacc = &big[nbig++];
    if (pd_reader_open(&r, src, name) < 0)
        rc = -1;
    while (rc == 0 && done < n) {
        npy_intp m = n - done < PD_BLOCK ? n - done : PD_BLOCK;
        const double *p = pd_reader_next(&r, buf, m);
        if (p == NULL) {
            rc = -1;
            break;
        }
        for (j = 0; j < m; j++) {
            pd_acc *a = &gacc[codes[done + j]];
            if (a->sacc && isfinite(p[j])) /* (no infinities unless a list changed) */
                pd_sacc_add(a->sacc, p[j]);
        }
        done += m;
    }
    pd_reader_close(&r);
    for (g = 0; g < n_groups; g++)
        if (gacc[g].sacc) {
            if (rc == 0)
                sums[g] = pd_sacc_value(gacc[g].sacc);
            gacc[g].sacc = NULL;
        }
    PyMem_Free(big);
    return rc;
}

int pd_paired_moments(pd_src *so, pd_src *sq, const char *name_o, const char *name_q, double tol,
                      const pd_moments_extra *x, pd_moments *out)
{
    pd_mstate s;
    pd_reader ro, rq;
    int rc;
    memset(&s, 0, sizeof s);
    memset(&ro, 0, sizeof ro);
    memset(&rq, 0, sizeof rq);
    if (x->codes) {
        s.gacc = PyMem_Calloc((size_t)(x->n_groups ? 2 * x->n_groups : 1), sizeof(pd_acc));
        if (s.gacc == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (pd_reader_open(&ro, so, name_o) < 0 || pd_reader_open(&rq, sq, name_q) < 0) {
        pd_reader_close(&ro);
        pd_reader_close(&rq);
        goto fail;
    }
    rc = pd_moments_pass(&ro, &rq, tol, x, &s);
    pd_reader_close(&ro);
    pd_reader_close(&rq);
    if (rc != 0) {
        pd_moments_error(so, sq, name_o, name_q, tol, rc);
        goto fail;
    }
    if (x->block_size && s.block_pos > 0)
        x->block_d[s.block_idx] = pd_csum_value(&s.blk);
    if (pd_exact_finish(so, name_o, tol, &s.acc_o, &out->sum_o) < 0 ||
        pd_exact_finish(sq, name_q, tol, &s.acc_q, &out->sum_q) < 0)
        goto fail;
    if (x->codes && (pd_groups_sacc(so, name_o, x->codes, s.gacc, x->n_groups, x->group_sum_o) < 0 ||
                     pd_groups_sacc(sq, name_q, x->codes, s.gacc + x->n_groups, x->n_groups,
                                    x->group_sum_q) < 0))
        goto fail;
    out->sum_oo = pd_csum_value(&s.oo);
    out->sum_qq = pd_csum_value(&s.qq);
    out->sum_oq = pd_csum_value(&s.oq);
    out->sum_dp = pd_csum_value(&s.dp);
    out->sum_dp2 = pd_csum_value(&s.dp2);
    out->sum_dp4 = pd_csum_value(&s.dp4);
    out->neginf_o = s.neginf_o;
    out->neginf_q = s.neginf_q;
    PyMem_Free(s.gacc);
    return 0;
fail:
    PyMem_Free(s.gacc);
    return -1;
}
