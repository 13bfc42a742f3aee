/* What readcopy.c and ring.c share: the CUDA driver's functions they call, handed in by Python
 * as addresses (from the libcuda.so.1 it loaded; native.py's _Calls fills the struct in this
 * order), so that neither needs CUDA headers or libraries to build; the steps a failure is
 * reported at (native.STEPS names them); and a clock. */
#include <stddef.h>
#include <stdint.h>
#include <time.h>

typedef int (*push_fn)(void *context);
typedef int (*pop_fn)(void **context);
typedef int (*sync_fn)(void *event);
typedef int (*wait_fn)(void *stream, void *event, unsigned flags);
typedef int (*copy_fn)(uint64_t dst, const void *src, size_t nbytes, void *stream);
typedef int (*create_fn)(void **event, unsigned flags);
typedef int (*record_fn)(void *event, void *stream);
typedef int (*destroy_fn)(void *event);

typedef struct {
    push_fn push;
    pop_fn pop;
    sync_fn sync;
    wait_fn wait;
    copy_fn copy;
    create_fn create;
    record_fn record;
    destroy_fn destroy;
} calls_t;

/* Which step failed. SHORT: a read ended before the bytes needed (the file is shorter than
 * its header says). */
enum { OK, PUSH, SYNC, READ, WAIT, COPY, CREATE, RECORD, POP, SHORT };

/* Linux caps one read at 0x7ffff000 bytes; ask for less. */
#define MAX_READ (1 << 30)

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}
