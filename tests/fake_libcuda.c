/* A stand-in for libcuda.so.1 with the calls fastsafetensors/loader/driver.py makes, for
 * tests on machines without a GPU (tests/test_driver.py compiles it). "Device" memory is host
 * memory: a copy is a memcpy, done at once, or with fake_defer_copies only once an event
 * recorded after it is waited for (in queued order, every stream as one), as a GPU that has
 * not run it yet would leave it. It checks what the real driver would refuse: no
 * context current, an unknown event, a pop with nothing pushed. Knobs and counters are plain
 * globals that the tests read and set through ctypes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SUCCESS 0
#define INVALID_VALUE 1
#define INVALID_DEVICE 101
#define INVALID_CONTEXT 201
#define INVALID_HANDLE 400
#define ILLEGAL_ADDRESS 700

#define EVENT_MAGIC 0x45564e54

typedef struct { int magic; unsigned flags; int recorded; long upto; } event_t;

/* Counters. */
int fake_devices = 2;
long fake_retains, fake_copies, fake_copied_bytes, fake_records, fake_waits, fake_syncs;
long fake_events_live, fake_events_created, fake_pushes, fake_pops, fake_push_calls;
uintptr_t fake_last_stream, fake_last_context;
unsigned fake_last_flags;
/* Knobs: the copy and the context push numbers that fail (0: none), and how long a copy or a
 * sync takes (ms). */
long fake_fail_copy, fake_fail_push;
int fake_copy_ms, fake_sync_ms;
/* Copies run when an event recorded after them is synchronized, not when queued. */
int fake_defer_copies;
/* Copies are counted and not done (benchmarks/bench_ring_cpu.py: no device to copy to). */
int fake_skip_copies;

/* Counted atomically: native calls (loader/readcopy.c) make these from several threads at once,
 * without the GIL. */
#define COUNT(counter, n) __atomic_add_fetch(&(counter), (n), __ATOMIC_RELAXED)

/* Deferred copies, in queued order: those before `pending_done` ran. */
typedef struct { uint64_t dst; const void *src; size_t nbytes; } pending_t;
static pending_t *pending;
static long pending_len, pending_cap, pending_done;
static char pending_lock;

static void lock_pending(void) {
    while (__atomic_test_and_set(&pending_lock, __ATOMIC_ACQUIRE))
        ;
}

static void unlock_pending(void) { __atomic_clear(&pending_lock, __ATOMIC_RELEASE); }

/* Run the deferred copies up to number `upto`. */
static void run_pending(long upto) {
    lock_pending();
    for (; pending_done < upto; pending_done++)
        memcpy((void *)(uintptr_t)pending[pending_done].dst, pending[pending_done].src,
               pending[pending_done].nbytes);
    unlock_pending();
}

static __thread uintptr_t stack[16];
static __thread int depth;

static void pause_ms(int ms) {
    if (ms > 0) {
        struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
        nanosleep(&t, NULL);
    }
}

int cuDeviceGet(int *device, int ordinal) {
    if (ordinal < 0 || ordinal >= fake_devices) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

int cuDevicePrimaryCtxRetain(void **context, int device) {
    if (device < 0 || device >= fake_devices) return INVALID_DEVICE;
    COUNT(fake_retains, 1);
    *context = (void *)(uintptr_t)(0x1000 + device);
    return SUCCESS;
}

int cuCtxPushCurrent_v2(void *context) {
    if (!context || depth == 16) return INVALID_CONTEXT;
    if (fake_fail_push && COUNT(fake_push_calls, 1) == fake_fail_push) return INVALID_CONTEXT;
    COUNT(fake_pushes, 1);
    stack[depth++] = (uintptr_t)context;
    return SUCCESS;
}

int cuCtxPopCurrent_v2(void **context) {
    if (depth == 0) return INVALID_CONTEXT;
    COUNT(fake_pops, 1);
    *context = (void *)stack[--depth];
    return SUCCESS;
}

int cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t nbytes, void *stream) {
    if (depth == 0) return INVALID_CONTEXT;
    if (fake_fail_copy && fake_copies + 1 == fake_fail_copy) return ILLEGAL_ADDRESS;
    pause_ms(fake_copy_ms);
    if (fake_skip_copies) {
        /* counted below, not done */
    } else if (fake_defer_copies) {
        lock_pending();
        if (pending_len == pending_cap) {
            pending_cap = pending_cap ? 2 * pending_cap : 64;
            pending = realloc(pending, (size_t)pending_cap * sizeof *pending);
        }
        pending[pending_len++] = (pending_t){dst, src, nbytes};
        unlock_pending();
    } else {
        memcpy((void *)(uintptr_t)dst, src, nbytes);
    }
    COUNT(fake_copies, 1);
    COUNT(fake_copied_bytes, (long)nbytes);
    fake_last_stream = (uintptr_t)stream;
    fake_last_context = stack[depth - 1];
    return SUCCESS;
}

int cuEventCreate(void **event, unsigned flags) {
    if (depth == 0) return INVALID_CONTEXT;
    event_t *e = malloc(sizeof *e);
    e->magic = EVENT_MAGIC;
    e->flags = flags;
    e->recorded = 0;
    e->upto = 0;
    fake_last_flags = flags;
    COUNT(fake_events_live, 1);
    COUNT(fake_events_created, 1);
    *event = e;
    return SUCCESS;
}

static int valid(void *event) { return event && ((event_t *)event)->magic == EVENT_MAGIC; }

int cuEventRecord(void *event, void *stream) {
    if (depth == 0) return INVALID_CONTEXT;
    if (!valid(event)) return INVALID_HANDLE;
    ((event_t *)event)->recorded = 1;
    lock_pending();
    ((event_t *)event)->upto = pending_len;
    unlock_pending();
    COUNT(fake_records, 1);
    fake_last_stream = (uintptr_t)stream;
    return SUCCESS;
}

int cuStreamWaitEvent(void *stream, void *event, unsigned flags) {
    if (depth == 0) return INVALID_CONTEXT;
    if (!valid(event) || flags) return INVALID_HANDLE;
    COUNT(fake_waits, 1);
    fake_last_stream = (uintptr_t)stream;
    fake_last_context = stack[depth - 1];
    return SUCCESS;
}

int cuEventSynchronize(void *event) {
    if (!valid(event)) return INVALID_HANDLE;
    pause_ms(fake_sync_ms);
    run_pending(((event_t *)event)->upto);
    COUNT(fake_syncs, 1);
    return SUCCESS;
}

int cuEventDestroy_v2(void *event) {
    if (!valid(event)) return INVALID_HANDLE;
    ((event_t *)event)->magic = 0;
    free(event);
    COUNT(fake_events_live, -1);
    return SUCCESS;
}

int cuGetErrorName(int code, const char **name) {
    switch (code) {
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; return SUCCESS;
    case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; return SUCCESS;
    case INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; return SUCCESS;
    case INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; return SUCCESS;
    case ILLEGAL_ADDRESS: *name = "CUDA_ERROR_ILLEGAL_ADDRESS"; return SUCCESS;
    default: return INVALID_VALUE;
    }
}
