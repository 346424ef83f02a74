/* The logits row loop: validation, targets, outputs, threads.  The per-row arithmetic lives in
 * logits_template.h; this file only decides which rows go where.  Memory: the outputs, O(rows);
 * no temporary of (rows x vocab).  Runs without the GIL. */
#include "logits.h"

#if !defined(_WIN32)
#include <pthread.h>
#define PD_HAVE_PTHREADS 1
#endif

typedef struct {
    const pd_mat *a, *b;
    const npy_int64 *targets;
    npy_int64 ignore;
    const pd_logits_out *out;
    const pd_logits_fns *fn;
} pd_job;

static void pd_job_rows(void *ctx, npy_intp r0, npy_intp r1, npy_intp *bad_row, int *bad_kind)
{
    const pd_job *j = (const pd_job *)ctx;
    const pd_mat *a = j->a, *b = j->b;
    const pd_logits_out *o = j->out;
    npy_intp isz = pd_itemsize[a->dt], r;
    int pair = b != NULL && b->base != NULL;
    for (r = r0; r < r1; r++) {
        const char *ra = a->base + r * a->rstride;
        const char *rb = pair ? b->base + r * b->rstride : NULL;
        npy_int64 t = j->targets ? j->targets[r] : -1;
        int scored = j->targets != NULL && t != j->ignore;
        pd_kl_row k;
        if (scored && (t < 0 || t >= a->V)) {
            *bad_row = r;
            *bad_kind = 1;
            return;
        }
        if (pair) {
            if (j->fn->kl(ra, rb, a->V, &k) < 0 || !isfinite(k.lse_a) || !isfinite(k.lse_b)) {
                *bad_row = r;
                *bad_kind = 2;
                return;
            }
            /* KL >= 0: tiny negatives are float rounding of near-identical rows (NaN stays) */
            if (o->kld)
                o->kld[r] = k.kld < 0 ? 0.0 : k.kld;
            if (o->kld_rev)
                o->kld_rev[r] = k.kld_rev < 0 ? 0.0 : k.kld_rev;
            if (o->same_top1)
                o->same_top1[r] = k.argmax_a == k.argmax_b;
            if (o->rank_b)
                o->rank_b[r] = j->fn->count_gt(rb, a->V, pd_load(b->dt, rb + k.argmax_a * isz));
            if (o->rank_a)
                o->rank_a[r] = j->fn->count_gt(ra, a->V, pd_load(a->dt, ra + k.argmax_b * isz));
        }
        else if (j->fn->lse(ra, a->V, &k.lse_a, &k.argmax_a) < 0 || !isfinite(k.lse_a)) {
            *bad_row = r;
            *bad_kind = 2;
            return;
        }
        if (o->lp_a)
            o->lp_a[r] = scored ? pd_load(a->dt, ra + t * isz) - k.lse_a : NAN;
        if (o->lp_b && pair)
            o->lp_b[r] = scored ? pd_load(b->dt, rb + t * isz) - k.lse_b : NAN;
    }
}

typedef struct {
    pd_rows_fn run;
    void *ctx;
    npy_intp r0, r1, bad_row;
    int bad_kind;
} pd_share;

static void pd_share_run(pd_share *sh)
{
    sh->bad_row = -1;
    sh->bad_kind = 0;
    sh->run(sh->ctx, sh->r0, sh->r1, &sh->bad_row, &sh->bad_kind);
}

#ifdef PD_HAVE_PTHREADS
static void *pd_share_thread(void *arg)
{
    pd_share_run((pd_share *)arg);
    return NULL;
}
#endif

#define PD_MAX_THREADS 256

int pd_run_rows(pd_rows_fn run, void *ctx, npy_intp rows, int threads, npy_intp *bad_row, int *bad_kind)
{
    pd_share sh[PD_MAX_THREADS];
    int t, nt = threads < 1 ? 1 : threads > PD_MAX_THREADS ? PD_MAX_THREADS : threads;
#ifdef PD_HAVE_PTHREADS
    pthread_t tid[PD_MAX_THREADS];
    int started[PD_MAX_THREADS] = {0};
#endif
    if (nt > rows)
        nt = rows > 0 ? (int)rows : 1;
    for (t = 0; t < nt; t++)
        sh[t] = (pd_share){run, ctx, rows * t / nt, rows * (t + 1) / nt, -1, 0};
#ifdef PD_HAVE_PTHREADS
    for (t = 1; t < nt; t++)
        started[t] = pthread_create(&tid[t], NULL, pd_share_thread, &sh[t]) == 0;
    pd_share_run(&sh[0]);
    for (t = 1; t < nt; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            pd_share_run(&sh[t]); /* could not start a thread: do its rows here */
    }
#else
    for (t = 0; t < nt; t++)
        pd_share_run(&sh[t]);
#endif
    /* report the first bad row in row order */
    for (t = 0; t < nt; t++)
        if (sh[t].bad_row >= 0) {
            *bad_row = sh[t].bad_row;
            *bad_kind = sh[t].bad_kind;
            return -1;
        }
    return 0;
}

int pd_logits_run(const pd_logits_fns *fn, const pd_mat *a, const pd_mat *b,
                  const npy_int64 *targets, npy_int64 ignore, int threads,
                  const pd_logits_out *out, npy_intp *bad_row, int *bad_kind)
{
    pd_job j = {a, b, targets, ignore, out, fn};
    return pd_run_rows(pd_job_rows, &j, a->rows, threads, bad_row, bad_kind);
}
