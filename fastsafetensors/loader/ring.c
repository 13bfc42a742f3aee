/* A GPU load with no Python per chunk (cuda_calls="ring", see ring.py): reader threads read the
 * submitted chunks, in order, into a ring of pinned windows, and a copier thread queues each
 * chunk's copies on one stream, in chunk order, as soon as its read is done. A window is read
 * into again once the copies of the chunk that last used it have run: the copier waits for the
 * chunk half a ring behind the one it just queued, so the readers have free windows ahead of
 * them while the copy engine works.
 *
 * Python's part: one thread submits the chunks (fst_ring_submit, keeping the GIL unless the ring
 * is full and it must wait), one takes the reports (fst_ring_next, without the GIL: these
 * chunks' copies are queued, here is the event after the last of them, owned by the caller
 * from then on).
 *
 * Every chunk's copies go on one stream in chunk order, so an event recorded after chunk k marks
 * the end of every chunk up to k: a report hands over one event for all its chunks, and the
 * others' events are recorded again for later chunks (Python would wrap and destroy each one).
 * The CUDA driver's functions are handed in as addresses (driver_calls.h): no CUDA headers or
 * libraries are needed to build this. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "driver_calls.h"

enum { SUBMITTED, READ_DONE, QUEUED, FAILED };

#define MAX_READERS 64

typedef struct {
    int64_t fd, offset, length, needed;
    void *allocated; /* the copies wait for it on the stream (NULL: nothing) */
    int64_t count;
    uint64_t *dst;
    int64_t *src, *len;
    int state, code, step;
    int64_t got;
    void *event; /* recorded after its copies; a spare again once reported, unless last */
} slot_t;

typedef struct {
    const calls_t *calls;
    void *context, *stream;
    char *base;
    int64_t stride, windows, capacity, lag;
    /* The caller's Python threads wake for this many chunks at once: a report waits until as
     * many are ready (or all submitted ones are), a submit waiting for room until as many slots
     * are free. Each wake needs Python's GIL back, which a thread running Python meanwhile
     * (transformers building the model) keeps for up to a switch interval. */
    int64_t batch;
    unsigned flags;
    slot_t *slots; /* chunk k in slots[k % capacity] */
    void **marks;  /* per window: recorded after the copies of the chunk that used it last */
    /* Events of reported chunks that no report handed over, to record again (at most
     * `capacity`: each one left a slot, and a slot takes one only when none is left). */
    void **spare;
    int64_t spares;
    int64_t submitted, claimed, freed, queued, reported;
    int ended, cancelled, copier_done;
    /* One lock; a condition per kind of waiter, so that a chunk's progress wakes the one thread
     * that waits for it rather than every thread: readers wait for a chunk to read (`work`),
     * the copier for a read (`read`), the reporting caller for queued copies (`copied`), the
     * submitting caller for room (`room`). */
    pthread_mutex_t lock;
    pthread_cond_t work, read, copied, room;
    pthread_t readers[MAX_READERS];
    int started;
    pthread_t copier;
    int copier_started;
    /* Seconds: readers reading (summed over them), readers waiting for a free window, the
     * copier waiting for reads, queuing copies, and waiting for windows' copies to run. */
    double spent[5];
} ring_t;

static slot_t *slot(ring_t *r, int64_t k) { return &r->slots[k % r->capacity]; }

/* Chunks a report waits for: `batch`, or every chunk submitted and not reported if fewer (at
 * least one). */
static int64_t wanted(ring_t *r) {
    int64_t pending = r->submitted - r->reported;
    return pending >= r->batch ? r->batch : pending > 1 ? pending : 1;
}

/* A reader may take the next chunk: it was submitted, and the chunk a ring before it, which
 * used its window last, was copied out. */
static int claimable(ring_t *r) {
    return r->claimed < r->submitted && r->claimed - r->freed < r->windows;
}

/* Everyone: the ring ended, was cancelled, or the copier stopped (the caller holds the lock). */
static void wake_all(ring_t *r) {
    pthread_cond_broadcast(&r->work);
    pthread_cond_broadcast(&r->read);
    pthread_cond_broadcast(&r->copied);
    pthread_cond_broadcast(&r->room);
}

static void *reader(void *arg) {
    ring_t *r = arg;
    pthread_mutex_lock(&r->lock);
    for (;;) {
        double t0 = now();
        while (!r->cancelled && !r->copier_done && !claimable(r) &&
               !(r->ended && r->claimed >= r->submitted))
            pthread_cond_wait(&r->work, &r->lock);
        r->spent[1] += now() - t0;
        if (r->cancelled || r->copier_done || r->claimed >= r->submitted)
            break;
        int64_t k = r->claimed++;
        if (claimable(r)) /* each wake-up lets one reader in: pass it on */
            pthread_cond_signal(&r->work);
        slot_t *s = slot(r, k);
        int fd = (int)s->fd;
        int64_t offset = s->offset, length = s->length, done = 0;
        char *dest = r->base + (k % r->windows) * r->stride;
        int code = 0;
        pthread_mutex_unlock(&r->lock);
        t0 = now();
        while (done < length) {
            int64_t want = length - done < MAX_READ ? length - done : MAX_READ;
            ssize_t n = pread(fd, dest + done, (size_t)want, (off_t)(offset + done));
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                code = errno;
                break;
            }
            if (n == 0)
                break; /* end of file: the copier decides whether that is short */
            done += n;
        }
        double t1 = now();
        pthread_mutex_lock(&r->lock);
        r->spent[0] += t1 - t0;
        s->got = done;
        if (s->state == SUBMITTED) { /* not failed meanwhile by a copier that cannot start */
            if (code) {
                s->code = code;
                s->step = READ;
            }
            s->state = READ_DONE;
        }
        pthread_cond_signal(&r->read);
    }
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

/* Queue chunk k's copies and the events after them; 0 or the failed step (code in *code). */
static int queue_copies(ring_t *r, int64_t k, slot_t *s, int *code) {
    const calls_t *c = r->calls;
    const char *window = r->base + (k % r->windows) * r->stride;
    if (s->allocated && (*code = c->wait(r->stream, s->allocated, 0)) != 0)
        return WAIT;
    for (int64_t i = 0; i < s->count; i++)
        if ((*code = c->copy(s->dst[i], window + s->src[i], (size_t)s->len[i], r->stream)))
            return COPY;
    if (!s->event && (*code = c->create(&s->event, r->flags)) != 0) {
        s->event = NULL;
        return CREATE;
    }
    if ((*code = c->record(s->event, r->stream)) != 0)
        return RECORD;
    if ((*code = c->record(r->marks[k % r->windows], r->stream)) != 0)
        return RECORD;
    return OK;
}

static void *copier(void *arg) {
    ring_t *r = arg;
    const calls_t *c = r->calls;
    void *popped = NULL;
    int code = c->push(r->context);
    int64_t k = 0;
    pthread_mutex_lock(&r->lock);
    if (code) {
        /* Reported as chunk 0's failure, or lost when nothing is ever submitted. */
        while (!r->cancelled && r->submitted == 0 && !r->ended)
            pthread_cond_wait(&r->read, &r->lock);
        if (r->submitted > 0) {
            slot(r, 0)->state = FAILED;
            slot(r, 0)->code = code;
            slot(r, 0)->step = PUSH;
            r->queued = 1;
        }
        r->copier_done = 1;
        wake_all(r);
        pthread_mutex_unlock(&r->lock);
        return NULL;
    }
    for (;; k++) {
        double t0 = now();
        while (!r->cancelled && !(k < r->submitted && slot(r, k)->state != SUBMITTED) &&
               !(r->ended && k >= r->submitted))
            pthread_cond_wait(&r->read, &r->lock);
        if (r->cancelled || k >= r->submitted)
            break;
        slot_t *s = slot(r, k);
        if (r->spares)
            s->event = r->spare[--r->spares];
        pthread_mutex_unlock(&r->lock);
        double t1 = now();
        int step = s->step;
        if (step == OK && s->got < s->needed)
            step = SHORT;
        if (step == OK)
            step = queue_copies(r, k, s, &code);
        else
            code = s->code;
        /* The pieces are not needed once queued: freed now, not when the slot is reused, which
         * with a slot per chunk of the load (stream.RING_SLOTS) would be at the end. No other
         * thread touches a slot between its read and its report. */
        free(s->dst);
        free(s->src);
        free(s->len);
        s->dst = NULL;
        s->src = s->len = NULL;
        s->count = 0;
        double t2 = now();
        /* The window of the chunk `lag` behind this one is free once its copies ran. */
        int64_t behind = k - r->lag;
        if (step == OK && behind >= 0 && (code = c->sync(r->marks[behind % r->windows])))
            step = SYNC;
        double t3 = now();
        pthread_mutex_lock(&r->lock);
        r->spent[2] += t1 - t0;
        r->spent[3] += t2 - t1;
        r->spent[4] += t3 - t2;
        s->state = step == OK ? QUEUED : FAILED;
        s->code = code;
        s->step = step;
        r->queued = k + 1;
        if (step == OK && behind >= 0) {
            r->freed = behind + 1;
            pthread_cond_signal(&r->work); /* one more window free: one more read */
        }
        pthread_cond_signal(&r->copied);
        if (step != OK)
            break;
    }
    r->copier_done = 1;
    wake_all(r);
    pthread_mutex_unlock(&r->lock);
    c->pop(&popped);
    return NULL;
}

static void release(ring_t *r) {
    for (int64_t i = 0; r->slots && i < r->capacity; i++) {
        free(r->slots[i].dst);
        free(r->slots[i].src);
        free(r->slots[i].len);
    }
    free(r->slots);
    free(r->marks);
    free(r->spare);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->work);
    pthread_cond_destroy(&r->read);
    pthread_cond_destroy(&r->copied);
    pthread_cond_destroy(&r->room);
    free(r);
}

/* A ring of `windows` windows of `stride` bytes at `base` (pinned host memory), `readers`
 * reader threads and a copier thread queuing on `stream` in `context`. NULL when memory or
 * threads cannot be had (*code: the errno), or a CUDA code with *code and *step set. */
ring_t *fst_ring_open(const calls_t *calls, void *context, void *stream, char *base,
                      int64_t stride, int64_t windows, int64_t readers, int64_t capacity,
                      int64_t batch, unsigned flags, int *code, int *step) {
    *code = 0;
    *step = OK;
    if (windows < 2 || readers < 1 || readers > MAX_READERS || capacity < windows || batch < 1 ||
        batch > capacity) {
        *code = EINVAL;
        return NULL;
    }
    ring_t *r = calloc(1, sizeof *r);
    if (!r) {
        *code = ENOMEM;
        return NULL;
    }
    r->calls = calls;
    r->context = context;
    r->stream = stream;
    r->base = base;
    r->stride = stride;
    r->windows = windows;
    r->capacity = capacity;
    r->batch = batch;
    r->lag = windows / 2;
    r->flags = flags;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->work, NULL);
    pthread_cond_init(&r->read, NULL);
    pthread_cond_init(&r->copied, NULL);
    pthread_cond_init(&r->room, NULL);
    r->slots = calloc((size_t)capacity, sizeof(slot_t));
    r->marks = calloc((size_t)windows, sizeof(void *));
    r->spare = calloc((size_t)capacity, sizeof(void *));
    if (!r->slots || !r->marks || !r->spare) {
        release(r);
        *code = ENOMEM;
        return NULL;
    }
    void *popped = NULL;
    if ((*code = calls->push(context)) != 0) {
        *step = PUSH;
        release(r);
        return NULL;
    }
    for (int64_t w = 0; w < windows && !*code; w++)
        if ((*code = calls->create(&r->marks[w], flags)) != 0) {
            r->marks[w] = NULL;
            *step = CREATE;
        }
    if (*code) {
        for (int64_t w = 0; w < windows; w++)
            if (r->marks[w])
                calls->destroy(r->marks[w]);
        calls->pop(&popped);
        release(r);
        return NULL;
    }
    calls->pop(&popped);
    if (pthread_create(&r->copier, NULL, copier, r) == 0)
        r->copier_started = 1;
    for (; r->copier_started && r->started < readers; r->started++)
        if (pthread_create(&r->readers[r->started], NULL, reader, r) != 0)
            break;
    if (r->started == 0) {
        *code = EAGAIN;
        pthread_mutex_lock(&r->lock);
        r->cancelled = 1;
        wake_all(r);
        pthread_mutex_unlock(&r->lock);
        if (r->copier_started)
            pthread_join(r->copier, NULL);
        if (calls->push(context) == 0) {
            for (int64_t w = 0; w < windows; w++)
                calls->destroy(r->marks[w]);
            calls->pop(&popped);
        }
        release(r);
        return NULL;
    }
    return r;
}

/* A chunk's read and pieces fit in a window: 0, else -3. */
static int64_t fits(const ring_t *r, int64_t length, int64_t needed, int64_t count,
                    const int64_t *src, const int64_t *len) {
    if (length < 0 || length > r->stride || needed > length || count < 0)
        return -3;
    for (int64_t i = 0; i < count; i++)
        if (src[i] < 0 || len[i] < 0 || src[i] + len[i] > needed)
            return -3;
    return 0;
}

/* The chunk's own copy of its pieces, which the caller's arrays do not outlive: 0, else -2. */
static int64_t own_pieces(int64_t count, const uint64_t *dst, const int64_t *src,
                          const int64_t *len, uint64_t **d, int64_t **s, int64_t **n) {
    size_t items = (size_t)(count > 0 ? count : 1);
    *d = malloc(items * sizeof **d);
    *s = malloc(items * sizeof **s);
    *n = malloc(items * sizeof **n);
    if (!*d || !*s || !*n) {
        free(*d);
        free(*s);
        free(*n);
        *d = NULL;
        *s = NULL;
        *n = NULL;
        return -2;
    }
    if (count > 0) { /* a chunk without pieces may come with NULL arrays */
        memcpy(*d, dst, (size_t)count * sizeof **d);
        memcpy(*s, src, (size_t)count * sizeof **s);
        memcpy(*n, len, (size_t)count * sizeof **n);
    }
    return 0;
}

/* Why a submit now is refused (-1 stopped, -4 full), or 0. Under the lock. */
static int64_t refused(const ring_t *r) {
    return r->cancelled || r->copier_done || r->ended ? -1
           : r->submitted - r->reported >= r->capacity ? -4 : 0;
}

/* The next chunk into its slot, the slot's pieces from its last use freed. Under the lock. */
static int64_t place(ring_t *r, int64_t fd, int64_t offset, int64_t length, int64_t needed,
                     void *allocated, int64_t count, uint64_t *d, int64_t *s, int64_t *n) {
    int64_t k = r->submitted;
    slot_t *t = slot(r, k);
    free(t->dst);
    free(t->src);
    free(t->len);
    *t = (slot_t){fd, offset, length, needed, allocated, count, d, s, n,
                  SUBMITTED, 0, OK, 0, NULL};
    r->submitted = k + 1;
    return k;
}

/* Hand over the next chunk: read `length` bytes of `fd` at `offset` (at least `needed` of
 * them), then copy each of the `count` pieces (device address, offset in the window, bytes).
 * While `capacity` chunks are submitted and not reported, returns -4 without `wait`; with it,
 * blocks until `batch` slots are free.
 * Returns the chunk's number, or -1 once the ring stopped (cancelled, or the copier ended on an
 * error), -2 when memory for the pieces cannot be had, or -3 when the read or a piece does not
 * fit in a window. Without `wait` it never blocks, so Python calls it keeping the GIL: a call
 * that gave it away would wait to get it back behind any thread running Python, once per
 * chunk. */
int64_t fst_ring_submit(ring_t *r, int64_t fd, int64_t offset, int64_t length, int64_t needed,
                        void *allocated, int64_t count, const uint64_t *dst,
                        const int64_t *src, const int64_t *len, int wait) {
    uint64_t *d;
    int64_t *s, *n;
    int64_t code = fits(r, length, needed, count, src, len);
    if (code || (code = own_pieces(count, dst, src, len, &d, &s, &n)))
        return code;
    pthread_mutex_lock(&r->lock);
    while (wait && !r->cancelled && !r->copier_done &&
           r->submitted - r->reported > r->capacity - r->batch)
        pthread_cond_wait(&r->room, &r->lock);
    if ((code = refused(r)) != 0) {
        pthread_mutex_unlock(&r->lock);
        free(d);
        free(s);
        free(n);
        return code;
    }
    int64_t k = place(r, fd, offset, length, needed, allocated, count, d, s, n);
    pthread_cond_signal(&r->work);
    pthread_cond_signal(&r->read); /* a copier that failed to start waits for a chunk */
    pthread_mutex_unlock(&r->lock);
    return k;
}

/* Hand over up to `chunks` chunks at once, never waiting: chunk i is `head[6*i..6*i+5]`
 * (fd, offset, length, needed, allocated event, piece count), its pieces the next `count` of
 * `dst`, `src` and `len` (each chunk's after the last's). One call from Python for many chunks:
 * each call is Python run under the GIL, which beside a thread running Python (transformers
 * building the model) the planner gets only part of the time.
 * Returns how many were taken, in order (fewer while the ring is full; the caller submits the
 * rest with fst_ring_submit, waiting), or -1 once the ring stopped, -2 when memory for the
 * pieces cannot be had, -3 when a chunk does not fit in a window (then none was taken). */
int64_t fst_ring_submit_many(ring_t *r, int64_t chunks, const int64_t *head,
                             const uint64_t *dst, const int64_t *src, const int64_t *len) {
    if (chunks < 0)
        return -3;
    int64_t at = 0;
    for (int64_t i = 0; i < chunks; i++) {
        const int64_t *h = head + 6 * i;
        int64_t code = fits(r, h[2], h[3], h[5], src + at, len + at);
        if (code)
            return code;
        at += h[5];
    }
    pthread_mutex_lock(&r->lock);
    int64_t code = refused(r), taken = 0;
    if (code == -1) {
        pthread_mutex_unlock(&r->lock);
        return -1;
    }
    int64_t room = r->capacity - (r->submitted - r->reported);
    at = 0;
    for (; taken < chunks && taken < room; taken++) {
        const int64_t *h = head + 6 * taken;
        uint64_t *d;
        int64_t *s, *n;
        if (own_pieces(h[5], dst + at, src + at, len + at, &d, &s, &n)) {
            if (taken == 0) {
                pthread_mutex_unlock(&r->lock);
                return -2;
            }
            break; /* those taken go; the caller's next submit says what is wrong */
        }
        place(r, h[0], h[1], h[2], h[3], (void *)(intptr_t)h[4], h[5], d, s, n);
        at += h[5];
    }
    if (taken) {
        pthread_cond_broadcast(&r->work);
        pthread_cond_signal(&r->read);
    }
    pthread_mutex_unlock(&r->lock);
    return taken;
}

/* No more chunks will be submitted. */
void fst_ring_end(ring_t *r) {
    pthread_mutex_lock(&r->lock);
    r->ended = 1;
    wake_all(r);
    pthread_mutex_unlock(&r->lock);
}

/* Stop: the readers and the copier leave after their current chunk; waiting calls return. */
void fst_ring_cancel(ring_t *r) {
    pthread_mutex_lock(&r->lock);
    r->cancelled = 1;
    wake_all(r);
    pthread_mutex_unlock(&r->lock);
}

/* The next chunks' reports, in chunk order: 0 once the copies of `batch` of them are queued
 * (or of every chunk submitted, if fewer), with *count (at most `most`) chunks from *first,
 * each one's bytes read in got[], and in *event the event after the last one's copies, so
 * after all of theirs (the caller's to destroy). All that are ready at once: the caller needs
 * Python's GIL back for each call, and a thread running Python meanwhile keeps it for up to a
 * switch interval. 1 when every submitted chunk was reported after fst_ring_end, or the ring
 * was cancelled; else the failed chunk's errno or CUDA code, with *first, *step and got[0] set
 * (chunks before it come in a call of their own first; a failure ends the copier, so no report
 * waits for a batch past it). */
int fst_ring_next(ring_t *r, int64_t most, int64_t *first, int64_t *count, int64_t *got,
                  void **event, int *step) {
    int result = 1;
    *count = 0;
    *event = NULL;
    *step = OK;
    pthread_mutex_lock(&r->lock);
    /* At most `most` at once: waiting for more would hold back the first ones. */
    while (!r->cancelled && !r->copier_done &&
           r->queued - r->reported < (wanted(r) < most ? wanted(r) : most))
        pthread_cond_wait(&r->copied, &r->lock);
    if (!r->cancelled && r->reported < r->queued) {
        *first = r->reported;
        slot_t *s = slot(r, r->reported);
        if (s->state == FAILED) {
            *step = s->step;
            got[0] = s->got;
            result = s->code ? s->code : EIO;
        } else {
            for (; *count < most && r->reported < r->queued; ++*count, r->reported++) {
                s = slot(r, r->reported);
                if (s->state == FAILED)
                    break; /* reported by the next call */
                got[*count] = s->got;
                if (*event)
                    r->spare[r->spares++] = *event;
                *event = s->event;
                s->event = NULL;
            }
            result = 0;
            pthread_cond_signal(&r->room);
        }
    }
    pthread_mutex_unlock(&r->lock);
    return result;
}

/* Seconds spent so far, as named in ring_t. */
void fst_ring_spent(ring_t *r, double *spent) {
    pthread_mutex_lock(&r->lock);
    memcpy(spent, r->spent, sizeof r->spent);
    pthread_mutex_unlock(&r->lock);
}

/* Stop the threads, wait until no copy can still read a window or write a tensor, and free
 * the ring. 0, or the CUDA code of that wait with *step set (the ring is then kept: the
 * windows must never be reused). Once only. */
int fst_ring_close(ring_t *r, int *step) {
    const calls_t *c = r->calls;
    void *popped = NULL, *last = NULL;
    int code;
    fst_ring_cancel(r);
    for (int i = 0; i < r->started; i++)
        pthread_join(r->readers[i], NULL);
    if (r->copier_started)
        pthread_join(r->copier, NULL);
    *step = PUSH;
    if ((code = c->push(r->context)) != 0)
        return code;
    /* A copy that failed halfway left earlier ones queued with no event after them: an event
     * recorded now on the stream marks the end of all of them. */
    *step = CREATE;
    if ((code = c->create(&last, r->flags)) == 0) {
        *step = RECORD;
        if ((code = c->record(last, r->stream)) == 0) {
            *step = SYNC;
            code = c->sync(last);
        }
        c->destroy(last);
    }
    if (!code) {
        for (int64_t w = 0; w < r->windows; w++)
            c->destroy(r->marks[w]);
        /* Events of chunks queued but never reported (a cancelled load), and those no report
         * handed over. */
        for (int64_t i = 0; i < r->capacity; i++)
            if (r->slots[i].event)
                c->destroy(r->slots[i].event);
        for (int64_t i = 0; i < r->spares; i++)
            c->destroy(r->spare[i]);
    }
    c->pop(&popped);
    if (code)
        return code;
    *step = OK;
    release(r);
    return 0;
}
