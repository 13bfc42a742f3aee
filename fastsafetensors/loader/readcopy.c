/* One chunk of a GPU load in one call without Python's GIL (cuda_calls="native", see
 * native.py): wait until the staging buffer's last copies ran, read the chunk into it, make the
 * copy stream wait for the tensors' allocation, queue one host-to-device copy per piece and
 * record an event after them.
 *
 * A reader thread doing these steps through Python gives the GIL away and takes it back around
 * each of them, behind the other threads' Python work; here the thread gives it away once per
 * chunk (ctypes releases it around the call). The CUDA driver's functions are handed in as
 * addresses (driver_calls.h): only a C compiler and libc are needed to build this. */
#include <errno.h>
#include <unistd.h>

#include "driver_calls.h"

/* Returns 0, or the CUDA error code (or the read's errno) with *failed set to the step.
 * *got: bytes read. Fewer than `needed` (end of file): nothing is queued and no event made,
 * the caller raises. *event: the event recorded after the copies, or NULL. spent[0..2]:
 * seconds spent waiting for the staging's copies, reading, and queuing the copies. */
int fst_read_copy(const calls_t *calls, void *context, void *staged, int fd, int64_t offset,
                  int64_t length, int64_t needed, char *dest, int64_t *got, void *stream,
                  void *allocated, int64_t pieces, const uint64_t *dst,
                  const uint64_t *src, const uint64_t *len, unsigned flags, void **event,
                  int *failed, double *spent) {
    int code = 0, step = OK;
    int64_t done = 0;
    void *popped = NULL;
    double t0 = now(), t1 = t0, t2 = t0;

    *got = 0;
    *event = NULL;
    spent[0] = spent[1] = spent[2] = 0.0;
    if ((code = calls->push(context)) != 0) {
        *failed = PUSH;
        return code;
    }
    if (staged && (code = calls->sync(staged)) != 0) {
        step = SYNC;
        goto out;
    }
    t1 = now();
    while (done < length) {
        int64_t want = length - done < MAX_READ ? length - done : MAX_READ;
        ssize_t n = pread(fd, dest + done, (size_t)want, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            code = errno;
            step = READ;
            goto out;
        }
        if (n == 0)
            break; /* end of file: the caller decides whether that is short */
        done += n;
    }
    *got = done;
    t2 = now();
    if (done < needed)
        goto out;
    if (allocated && (code = calls->wait(stream, allocated, 0)) != 0) {
        step = WAIT;
        goto out;
    }
    for (int64_t i = 0; i < pieces; i++) {
        if ((code = calls->copy(dst[i], dest + src[i], (size_t)len[i], stream)) != 0) {
            step = COPY;
            goto out;
        }
    }
    if ((code = calls->create(event, flags)) != 0) {
        *event = NULL;
        step = CREATE;
        goto out;
    }
    if ((code = calls->record(*event, stream)) != 0)
        step = RECORD; /* the event is handed back all the same, to be destroyed */
out:
    spent[0] = t1 - t0;
    if (t2 > t1)
        spent[1] = t2 - t1;
    {
        int popcode = calls->pop(&popped);
        if (step == OK && popcode != 0) {
            code = popcode;
            step = POP;
        }
    }
    if (t2 > t1)
        spent[2] = now() - t2;
    *failed = step;
    return step == OK ? 0 : code;
}
