/* A file-to-GPU pipeline with no Python per chunk, as a reference row for bench_load.py
 * (benchmarks/sketch_ring.py): reader threads read chunks in order into a ring of pinned
 * windows, and the calling thread queues each chunk's copies on one stream, in chunk order,
 * as soon as its read is done. A window is read into again once the copy of the chunk that last
 * used it has run; the copier waits for the chunk half a ring behind the one it just queued, so
 * the readers always have free windows ahead of them while the copy engine works.
 *
 * The shape InstantTensor's buffered mode has (io_uring there, threads here): if this reaches
 * its speed on a machine where the engine does not, the engine's per-chunk work and its
 * per-reader buffers are what is left to change. The CUDA driver's functions are handed in as
 * addresses, as for fastsafetensors/loader/readcopy.c. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "driver_calls.h" /* fastsafetensors/loader's: the driver calls (native.build finds it) */

typedef struct {
    int64_t fd, offset, length, first, count; /* its pieces: pieces[first .. first+count) */
} ring_chunk_t;

typedef struct {
    uint64_t dst;         /* device address */
    int64_t src, length;  /* offset in the chunk's window, bytes */
} ring_piece_t;

typedef struct {
    const ring_chunk_t *chunks;
    int64_t n;
    char *ring;
    int64_t window, windows;
    int64_t next;          /* the next chunk to claim */
    int64_t freed;         /* chunks before this one were copied out of their windows */
    unsigned char *read;   /* per chunk: its read is done */
    int error;             /* an errno of a read, or -1 once the copier stopped */
    pthread_mutex_t lock;
    pthread_cond_t cond;
} ring_t;

static void fail(ring_t *r, int error) {
    pthread_mutex_lock(&r->lock);
    if (!r->error)
        r->error = error;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
}

static void *reader(void *arg) {
    ring_t *r = arg;
    for (;;) {
        int64_t k = __atomic_fetch_add(&r->next, 1, __ATOMIC_RELAXED);
        if (k >= r->n)
            return NULL;
        pthread_mutex_lock(&r->lock);
        while (!r->error && k - r->freed >= r->windows)
            pthread_cond_wait(&r->cond, &r->lock);
        int stop = r->error;
        pthread_mutex_unlock(&r->lock);
        if (stop)
            return NULL;
        const ring_chunk_t *c = &r->chunks[k];
        char *dest = r->ring + (k % r->windows) * r->window;
        int64_t done = 0;
        while (done < c->length) {
            ssize_t got = pread((int)c->fd, dest + done, (size_t)(c->length - done),
                                (off_t)(c->offset + done));
            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0) {
                fail(r, got < 0 ? errno : EIO); /* EIO: the file ended early */
                return NULL;
            }
            done += got;
        }
        pthread_mutex_lock(&r->lock);
        r->read[k] = 1;
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
    }
}

/* Returns 0, a read's errno (negated), or a CUDA error code. */
int sketch_ring(const calls_t *calls, void *context, void *stream,
                const ring_chunk_t *chunks, int64_t n, const ring_piece_t *pieces, char *ring,
                int64_t window, int64_t windows, int64_t readers) {
    ring_t r = {chunks, n, ring, window, windows, 0, 0, NULL, 0,
                PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    pthread_t threads[64];
    void **events = calloc((size_t)windows, sizeof(void *));
    int code = 0, started = 0, pushed = 0;
    void *popped = NULL;
    int64_t lag = windows / 2;

    r.read = calloc((size_t)(n > 0 ? n : 1), 1);
    if (!events || !r.read || readers < 1 || readers > 64 || windows < 1) {
        free(events);
        free(r.read);
        return EINVAL;
    }
    if ((code = calls->push(context)) != 0)
        goto done;
    pushed = 1;
    for (int64_t w = 0; w < windows && !code; w++)
        code = calls->create(&events[w], 0x2 /* no timing */);
    for (; !code && started < readers; started++)
        if (pthread_create(&threads[started], NULL, reader, &r) != 0)
            break;
    for (int64_t k = 0; !code && k < n; k++) {
        pthread_mutex_lock(&r.lock);
        while (!r.error && !r.read[k])
            pthread_cond_wait(&r.cond, &r.lock);
        int error = r.error;
        pthread_mutex_unlock(&r.lock);
        if (error) {
            code = -error;
            break;
        }
        const char *window_start = ring + (k % windows) * window;
        for (int64_t p = chunks[k].first; !code && p < chunks[k].first + chunks[k].count; p++)
            code = calls->copy(pieces[p].dst, window_start + pieces[p].src,
                               (size_t)pieces[p].length, stream);
        if (!code)
            code = calls->record(events[k % windows], stream);
        int64_t behind = k - lag;
        if (!code && behind >= 0 && (code = calls->sync(events[behind % windows])) == 0) {
            pthread_mutex_lock(&r.lock);
            r.freed = behind + 1;
            pthread_cond_broadcast(&r.cond);
            pthread_mutex_unlock(&r.lock);
        }
    }
    if (!code && n > 0)
        code = calls->sync(events[(n - 1) % windows]); /* stream order: every copy ran */
done:
    fail(&r, -1); /* readers still waiting for a window stop */
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    /* After an error too, no copy may still read the ring once this returns. */
    for (int64_t w = 0; w < windows; w++)
        if (events[w]) {
            calls->sync(events[w]);
            calls->destroy(events[w]);
        }
    if (pushed)
        calls->pop(&popped);
    free(events);
    free(r.read);
    return code;
}
