/* A GPU load with no Python per chunk (cuda_calls="ring", see ring.py): reader threads read the
 * submitted chunks, in order, into a ring of pinned windows, and a copier thread queues each
 * chunk's copies on one stream, in chunk order, as soon as its read is done. A window is read
 * into again once the copies of the chunk that last used it have run: the copier waits for the
 * chunk half a ring behind the one it just queued, so the readers have free windows ahead of
 * them while the copy engine works.
 *
 * Python's part: one thread submits a file's tensors at a time (fst_ring_submit_file, keeping
 * the GIL unless the ring is full and it must wait), which are cut into chunks here, and one
 * takes the reports (fst_ring_next, without the GIL: these chunks' copies are queued, so many
 * tensors are complete, here is the event after the last of them, owned by the caller from then
 * on). Python's work is per tensor and per report, none per chunk: beside transformers' thread
 * (H200 runs 8-10) a Python planner fed the readers too slowly, and they waited for chunks.
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
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "driver_calls.h"

enum { SUBMITTED, READ_DONE, QUEUED, FAILED };
/* How a chunk is read (the io option): through the page cache, with O_DIRECT, or chosen by its
 * reader from the share of its pages cached. */
enum { BUFFERED, DIRECT, AUTO };

#define MAX_READERS 64

/* One file's part of a chunk, as fst_ring_submit_file was given it. */
typedef struct {
    int64_t file_no;  /* the caller's number for the file */
    int64_t fd, dfd;  /* descriptors, buffered and O_DIRECT (-1: none) */
    const char *mapping; /* AUTO: a mapping of the whole file, for mincore (NULL: none) */
    int64_t mode, align, cached; /* `cached`: per mille of pages that make AUTO read buffered */
} file_t;

typedef struct {
    file_t file;
    int64_t begin, end; /* the file's bytes wanted */
    int64_t done;       /* tensors (the caller's count) complete once its copies are queued */
    /* Set by its reader: where the read began, the bytes that must come, and whether it
     * bypassed the page cache (an O_DIRECT read is widened to whole blocks at both ends). */
    int64_t offset, needed;
    int direct;
    void *allocated; /* the copies wait for it on the stream (NULL: nothing) */
    int64_t count;
    uint64_t *dst;
    int64_t *src, *len; /* src: from `begin` */
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
    int64_t most; /* chunks the waiting report takes at most (fst_ring_next's `most`) */
    unsigned flags;
    slot_t *slots; /* chunk k in slots[k % capacity] */
    void **marks;  /* per window: recorded after the copies of the chunk that used it last */
    /* Events of reported chunks that no report handed over, to record again (at most
     * `capacity`: each one left a slot, and a slot takes one only when none is left). */
    void **spare;
    int64_t spares;
    int64_t submitted, claimed, freed, queued, reported;
    int ended, cancelled, copier_done;
    int failed; /* a chunk failed: its report says why */
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

static void free_pieces(slot_t *t) {
    free(t->dst);
    free(t->src);
    free(t->len);
    t->dst = NULL;
    t->src = t->len = NULL;
}

/* Chunks a report waits for: `batch`, or every chunk submitted and not reported if fewer (at
 * least one). */
static int64_t wanted(ring_t *r) {
    int64_t pending = r->submitted - r->reported;
    return pending >= r->batch ? r->batch : pending > 1 ? pending : 1;
}

/* A report waiting may go: enough chunks are queued for it (the caller holds the lock). Only
 * then is it woken, not once a chunk: on the 2-core VM those wakes took some 3 ms of CPU in a
 * load of 0.8 GB. */
static int reportable(ring_t *r) {
    int64_t want = wanted(r) < r->most ? wanted(r) : r->most;
    return r->queued - r->reported >= want;
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

#ifndef SYS_cachestat
#define SYS_cachestat 451 /* Linux 6.5 and later, the same number on every architecture but alpha */
#endif

/* Set once cachestat is refused as unknown (an older kernel, or a sandbox's filter). */
static int no_cachestat;

/* Count with mincore alone (1) or cachestat first (0): tests run both ways. */
void fst_ring_count_with_mincore(int on) { __atomic_store_n(&no_cachestat, on, __ATOMIC_RELAXED); }

/* Pages of file bytes [first, end) in the page cache (`first` on a page), or -1 when that cannot
 * be known. cachestat counts them in the kernel: some 30 ns a page on the 2-core VM, where
 * mincore on the file's mapping, the fallback, took 80-100. */
static int64_t cached_pages(const file_t *f, int64_t first, int64_t end, int64_t page) {
    if (!__atomic_load_n(&no_cachestat, __ATOMIC_RELAXED)) {
        struct {
            uint64_t off, len;
        } range = {(uint64_t)first, (uint64_t)(end - first)};
        uint64_t stat[5]; /* cached, dirty, under writeback, evicted, recently evicted */
        if (syscall(SYS_cachestat, (int)f->fd, &range, stat, 0) == 0)
            return (int64_t)stat[0];
        if (errno == ENOSYS || errno == EPERM)
            __atomic_store_n(&no_cachestat, 1, __ATOMIC_RELAXED);
    }
    if (!f->mapping)
        return -1;
    size_t pages = (size_t)((end - first + page - 1) / page);
    unsigned char *vec = malloc(pages);
    int64_t cached = -1;
    if (vec && mincore((void *)(f->mapping + first), (size_t)(end - first), vec) == 0) {
        cached = 0;
        for (size_t i = 0; i < pages; i++)
            cached += vec[i] & 1;
    }
    free(vec);
    return cached;
}

/* Whether to read file bytes [begin, end) with O_DIRECT. AUTO counts, as it reads, how many of
 * their pages are cached, on the reader's own thread (in parallel, and just before the read:
 * pages cached or evicted since the load began count). A buffered read of the chunk before may
 * have read ahead into this one's first pages; with half the pages needed to read buffered,
 * that takes far more than the kernel's read-ahead window (128 KiB by default) of a 4 MiB
 * chunk. Read buffered where the count cannot be had, as Python's policy does (cpu.py). */
static int read_direct(const file_t *f, int64_t begin, int64_t end) {
    if (f->dfd < 0 || f->mode == BUFFERED)
        return 0;
    if (f->mode == DIRECT)
        return 1;
    if (!f->mapping) /* Python maps the file where it can see the page cache */
        return 0;
    int64_t page = sysconf(_SC_PAGESIZE);
    int64_t first = begin - begin % page;
    int64_t pages = (end - first + page - 1) / page;
    int64_t cached = cached_pages(f, first, end, page);
    return cached >= 0 && cached * 1000 < pages * f->cached;
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
        char *dest = r->base + (k % r->windows) * r->stride;
        int code = 0;
        pthread_mutex_unlock(&r->lock);
        t0 = now();
        /* What the slot was given stays as it is until the slot is reported. */
        int direct = read_direct(&s->file, s->begin, s->end);
        int64_t offset = s->begin, end = s->end, done = 0;
        if (direct) {
            offset -= offset % s->file.align;
            end += (s->file.align - end % s->file.align) % s->file.align;
        }
        int fd = (int)(direct ? s->file.dfd : s->file.fd);
        int64_t length = end - offset;
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
            /* An O_DIRECT read returns less than whole blocks only at the end of the file; one
             * more from that unaligned offset would be refused (EINVAL) by some file systems. */
            if (direct && n % s->file.align)
                break;
        }
        double t1 = now();
        pthread_mutex_lock(&r->lock);
        r->spent[0] += t1 - t0;
        s->got = done;
        s->direct = direct;
        s->offset = offset;
        s->needed = s->end - offset; /* a widened read may end past the end of the file */
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
    window += s->begin - s->offset; /* where the first byte wanted landed */
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
            r->failed = 1;
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
        free_pieces(s);
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
        if (step != OK || reportable(r))
            pthread_cond_signal(&r->copied);
        if (step != OK) {
            r->failed = 1;
            break;
        }
    }
    r->copier_done = 1;
    wake_all(r);
    pthread_mutex_unlock(&r->lock);
    c->pop(&popped);
    return NULL;
}

static void release(ring_t *r) {
    for (int64_t i = 0; r->slots && i < r->capacity; i++)
        free_pieces(&r->slots[i]);
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
    r->most = batch;
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
    /* Only the copier waits for the marks on the host, with half the windows' copies still
     * queued behind the one it waits for: it sleeps (CU_EVENT_BLOCKING_SYNC, 0x1) rather than
     * spin on a core the readers and the caller's thread could use; waking later costs no
     * copy time, since the copy engine has those queued copies to run meanwhile. */
    for (int64_t w = 0; w < windows && !*code; w++)
        if ((*code = calls->create(&r->marks[w], flags | 0x1u)) != 0) {
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

/* One chunk as planned: file bytes [begin, end), pieces [first, first + count) of the plan's
 * arrays, and the caller's tensors complete once its copies are queued. */
typedef struct {
    int64_t begin, end, first, count, done;
} planned_t;

/* Cut tensors [begin[i], end[i]) (file offsets, in file order) into chunks of at most `limit`
 * bytes, a tensor sharing its chunk with the next one when at most `gap` bytes lie between
 * them; a tensor larger than what is left of a chunk goes on in the next. Returns the number of
 * chunks; unless `chunks` is NULL (a count only), fills them and their pieces' tensor numbers,
 * offsets in their tensor, offsets from the chunk's first byte and lengths (at most n + chunks
 * of them). */
static int64_t plan(int64_t n, const int64_t *begin, const int64_t *end, int64_t limit,
                    int64_t gap, int64_t done_before, planned_t *chunks, int64_t *tensor,
                    int64_t *at, int64_t *src, int64_t *len) {
    int64_t count = 0, pieces = 0, first = 0, last = 0; /* the open chunk: [first, last) */
    int open = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t position = begin[i]; position < end[i];) {
            if (open && (position - last > gap || position >= first + limit)) {
                if (chunks) /* every tensor before this one has all its bytes */
                    chunks[count - 1].done = done_before + i;
                open = 0;
            }
            if (!open) {
                open = 1;
                first = last = position;
                if (chunks)
                    chunks[count] = (planned_t){position, position, pieces, 0, 0};
                count++;
            }
            int64_t stop = end[i] < first + limit ? end[i] : first + limit;
            if (chunks) {
                tensor[pieces] = i;
                at[pieces] = position - begin[i];
                src[pieces] = position - first;
                len[pieces] = stop - position;
                chunks[count - 1].count++;
                chunks[count - 1].end = stop;
            }
            pieces++;
            position = last = stop;
        }
    if (open && chunks)
        chunks[count - 1].done = done_before + n;
    return count;
}

/* Why a submit now is refused (-1 stopped), or 0. Under the lock. */
static int64_t stopped(const ring_t *r) {
    return r->cancelled || r->copier_done || r->ended ? -1 : 0;
}

/* Hand over the `n` tensors of one file whose bytes [begin[i], end[i]) (file offsets, in file
 * order, not overlapping) go to device addresses dst[i]: cut into chunks of at most `limit`
 * bytes (see plan()), each read as `file` says into a window, then its pieces copied after
 * `allocated` (an event, or NULL). Tensor i is the caller's number `done_before + i`, and a
 * chunk's report says how many of the caller's tensors are complete.
 * While the chunks do not all fit in the free slots, returns -4 without `wait`, placing none;
 * with it, places them as slots come free, waiting for `batch` at a time.
 * Returns the chunks placed (*placed too), or -1 once the ring stopped (*placed: those placed
 * before), -2 without memory for the pieces, -3 when the tensors are not in order or a chunk
 * would not fit in a window. Without `wait` it never blocks, so Python calls it keeping the
 * GIL: a call that gave it away would wait to get it back behind any thread running Python. */
int64_t fst_ring_submit_file(ring_t *r, const int64_t *file, int64_t n, const int64_t *begin,
                             const int64_t *end, const uint64_t *dst, void *allocated,
                             int64_t limit, int64_t gap, int64_t done_before, int wait,
                             int64_t *placed) {
    *placed = 0;
    file_t f = {file[0], file[1], file[2], (const char *)(intptr_t)file[3],
                file[4], file[5], file[6]};
    if (n < 0 || limit < 1 || gap < 0 || f.align < 1 || limit + 2 * f.align > r->stride ||
        f.mode < BUFFERED || f.mode > AUTO)
        return -3;
    for (int64_t i = 0; i < n; i++)
        if (begin[i] < 0 || end[i] < begin[i] || (i && begin[i] < end[i - 1]))
            return -3;
    int64_t count = plan(n, begin, end, limit, gap, 0, NULL, NULL, NULL, NULL, NULL);
    if (count == 0)
        return 0;
    if (!wait) {
        pthread_mutex_lock(&r->lock);
        int64_t code = stopped(r);
        if (!code && r->capacity - (r->submitted - r->reported) < count)
            code = -4;
        pthread_mutex_unlock(&r->lock);
        if (code)
            return code;
    }
    int64_t items = n + count;
    planned_t *chunks = malloc((size_t)count * sizeof *chunks);
    int64_t *tensor = malloc((size_t)items * sizeof *tensor);
    int64_t *at = malloc((size_t)items * sizeof *at);
    int64_t *src = malloc((size_t)items * sizeof *src);
    int64_t *len = malloc((size_t)items * sizeof *len);
    slot_t *made = calloc((size_t)count, sizeof *made);
    int64_t result = -2;
    if (!chunks || !tensor || !at || !src || !len || !made)
        goto out;
    plan(n, begin, end, limit, gap, done_before, chunks, tensor, at, src, len);
    /* Each chunk's own pieces, made before the lock is taken. */
    for (int64_t k = 0; k < count; k++) {
        planned_t *c = &chunks[k];
        slot_t *t = &made[k];
        size_t size = (size_t)c->count;
        t->dst = malloc(size * sizeof *t->dst);
        t->src = malloc(size * sizeof *t->src);
        t->len = malloc(size * sizeof *t->len);
        if (!t->dst || !t->src || !t->len)
            goto out;
        for (int64_t p = 0; p < c->count; p++) {
            int64_t q = c->first + p;
            t->dst[p] = dst[tensor[q]] + (uint64_t)at[q];
            t->src[p] = src[q];
            t->len[p] = len[q];
        }
        t->file = f;
        t->begin = t->offset = c->begin;
        t->end = c->end;
        t->needed = c->end - c->begin;
        t->done = c->done;
        t->allocated = allocated;
        t->count = c->count;
        t->state = SUBMITTED;
    }
    pthread_mutex_lock(&r->lock);
    for (result = 0; result < count; result++) {
        if (r->submitted - r->reported >= r->capacity)
            while (!stopped(r) && r->submitted - r->reported > r->capacity - r->batch)
                pthread_cond_wait(&r->room, &r->lock);
        if (stopped(r)) {
            *placed = result;
            result = -1;
            break;
        }
        slot_t *t = slot(r, r->submitted);
        free_pieces(t); /* from its last use */
        *t = made[result];
        made[result].dst = NULL;
        made[result].src = made[result].len = NULL;
        r->submitted++;
        /* Each chunk at once: a reader may start on it while the next ones are placed. */
        pthread_cond_signal(&r->work);
        pthread_cond_signal(&r->read); /* a copier that failed to start waits for a chunk */
    }
    if (result >= 0)
        *placed = result;
    pthread_mutex_unlock(&r->lock);
out:
    for (int64_t k = 0; made && k < count; k++)
        free_pieces(&made[k]);
    free(made);
    free(chunks);
    free(tensor);
    free(at);
    free(src);
    free(len);
    return result;
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

/* What a report says of chunk s: the caller's file number, the caller's tensors complete,
 * whether it was read with O_DIRECT, where its read began, and the end of the bytes wanted. */
enum { INFO = 5 };
static void describe(const slot_t *s, int64_t *info) {
    info[0] = s->file.file_no;
    info[1] = s->done;
    info[2] = s->direct;
    info[3] = s->offset;
    info[4] = s->end;
}

/* The next chunks' reports, in chunk order: 0 once the copies of `batch` of them are queued
 * (or of every chunk submitted, if fewer), with *count (at most `most`) chunks from *first,
 * each one's bytes read in got[] and what describe() says of it in info[INFO * i...], and in
 * *event the event after the last one's copies, so after all of theirs (the caller's to
 * destroy). All that are ready at once: the caller needs
 * Python's GIL back for each call, and a thread running Python meanwhile keeps it for up to a
 * switch interval. 1 when every submitted chunk was reported after fst_ring_end, or the ring
 * was cancelled; else the failed chunk's errno or CUDA code, with *first, *step, got[0] and
 * info[0...] set (chunks before it come in a call of their own first; a failure ends the
 * copier, so no report waits for a batch past it). */
int fst_ring_next(ring_t *r, int64_t most, int64_t *first, int64_t *count, int64_t *got,
                  int64_t *info, void **event, int *step) {
    int result = 1;
    *count = 0;
    *event = NULL;
    *step = OK;
    pthread_mutex_lock(&r->lock);
    /* At most `most` at once: waiting for more would hold back the first ones. */
    r->most = most;
    while (!r->cancelled && !r->copier_done && !reportable(r))
        pthread_cond_wait(&r->copied, &r->lock);
    if (!r->cancelled && r->reported < r->queued) {
        *first = r->reported;
        slot_t *s = slot(r, r->reported);
        if (s->state == FAILED) {
            *step = s->step;
            got[0] = s->got;
            describe(s, info);
            result = s->code ? s->code : EIO;
        } else {
            for (; *count < most && r->reported < r->queued; ++*count, r->reported++) {
                s = slot(r, r->reported);
                if (s->state == FAILED)
                    break; /* reported by the next call */
                got[*count] = s->got;
                describe(s, info + INFO * *count);
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

/* Whether a chunk failed (the next reports end with it): a caller holding the reports back
 * looks, so that a failed load does not wait for it to let them go. */
int fst_ring_failed(ring_t *r) {
    pthread_mutex_lock(&r->lock);
    int failed = r->failed;
    pthread_mutex_unlock(&r->lock);
    return failed;
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
