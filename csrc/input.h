/* Inputs of the reductions: Python lists/tuples read in place, ndarrays of any layout read
 * without copies, everything else adapted to an ndarray by ppldelta._adapt.as_array. */
#ifndef PPLDELTA_INPUT_H
#define PPLDELTA_INPUT_H
#include "common.h"

typedef struct {
    PyObject *obj;       /* owned: the list/tuple, or the ndarray */
    PyArrayObject *arr;  /* borrowed alias of obj when it is an ndarray, else NULL */
    npy_intp n;          /* number of elements */
} pd_src;

/* Resolve `in` (named `name` in messages) into src.  TypeError for inputs that are not real
 * numbers.  `adapter` is the Python callable used for non-list, non-ndarray inputs. */
int pd_src_open(PyObject *adapter, PyObject *in, const char *name, pd_src *src);
void pd_src_close(pd_src *src);

/* Sum every value into acc (acc must start zeroed) in mode `exact` (PD_MODE_FAST, _EXACT, or
 * _SACC with acc->sacc set).
 * ValueError naming the first NaN or the first value above tol (flat C-order index).
 * Releases the GIL for array inputs. */
int pd_src_sum(pd_src *src, const char *name, double tol, int exact, pd_acc *acc);

#endif
