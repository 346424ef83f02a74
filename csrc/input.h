/* Inputs of the reductions: Python lists/tuples read in place, ndarrays of any layout read
 * without copies, everything else adapted to an ndarray by ppldelta._adapt.as_array. */
#ifndef PPLDELTA_INPUT_H
#define PPLDELTA_INPUT_H
#include "common.h"

/* Long reductions run in runs of PD_SIGNAL_CHUNK values (a multiple of PD_BLOCK, so the block
 * partition and hence the sum is unchanged): the GIL is released for each run and signals are
 * checked between runs, so Ctrl-C stops a reduction of 10^9 values within a few milliseconds. */
#define PD_SIGNAL_CHUNK ((npy_intp)1 << 22)

typedef struct {
    PyObject *obj;       /* owned: the list/tuple, or the ndarray */
    PyArrayObject *arr;  /* borrowed alias of obj when it is an ndarray, else NULL */
    npy_intp n;          /* number of elements */
} pd_src;

/* Resolve `in` (named `name` in messages) into src.  TypeError for inputs that are not real
 * numbers.  `adapter` is the Python callable used for non-list, non-ndarray inputs. */
int pd_src_open(PyObject *adapter, PyObject *in, const char *name, pd_src *src);
void pd_src_close(pd_src *src);

/* Sum every value into acc (acc must start zeroed) in `mode` (PD_MODE_FAST, _EXACT, or
 * _SACC with acc->sacc set).
 * ValueError naming the first NaN or the first value above tol (flat C-order index).
 * Releases the GIL for array inputs. */
int pd_src_sum(pd_src *src, const char *name, double tol, int mode, pd_acc *acc);

/* A reader hands out the values of an opened, non-empty source in flat C order, m <= PD_BLOCK
 * at a time, as float64 (paired passes read two sources in step, one read of each).  direct:
 * a native 1-D or C-contiguous array, read without the GIL; otherwise (lists, other layouts and
 * dtypes through NpyIter's buffers) the caller holds the GIL. */
typedef struct {
    pd_src *src;
    const char *name;
    npy_intp pos;          /* values handed out so far */
    int direct;
    pd_dtype dt;           /* direct: element type, base and element stride */
    const char *p;
    npy_intp stride;
    NpyIter *iter;         /* NpyIter state, else NULL */
    NpyIter_IterNextFunc *next;
    char **dataptr;
    npy_intp *strideptr, *sizeptr, off;
} pd_reader;

int pd_reader_open(pd_reader *r, pd_src *src, const char *name); /* 0, or -1 with an exception */
/* The next m values (no more than remain): a pointer into the input (aligned contiguous
 * float64) or into buf; NULL with an exception (a list item that is not a number, a list that
 * changed size).  No validation: the caller runs a reduction kernel over them. */
const double *pd_reader_next(pd_reader *r, double *buf, npy_intp m);
void pd_reader_close(pd_reader *r);

#endif
