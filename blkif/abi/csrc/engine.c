/* The backend datapath engine: one shared ring served in C (Linux: blkback.c).
 *
 * Compiled into blkif.abi._ffi after the ABI structs of _cdefs/blkif.py; the
 * Python side is blkif/backend/engine.py, the readable reference of the rules
 * blkif/request.py and blkif/backend/ring_service.py.  One engine serves one
 * ring from one thread; eng_run runs without the GIL.
 *
 * A round of eng_run, as ring.h reads:
 *   consume   read req_prod once, reject an overrun (RING_REQUEST_PROD_OVERFLOW),
 *             copy each request out of its slot once (RING_COPY_REQUEST) and
 *             validate only the copy, with exactly request.py's rules;
 *   map       persistent grants come from an LRU keyed by gref; the rest of a
 *             request's pages are mapped together, on Xen straight through
 *             /dev/xen/gntdev (one ioctl and one mmap), on the sim by a call
 *             back into Python (eng_map_grants), which owns the platform;
 *   submit    every read and write of the batch in flight at once: io_uring
 *             (one io_uring_submit per round; on an O_DIRECT store one per
 *             request, as blkback dispatches each request to the disk at
 *             once: see submit_each) or, where io_uring is refused,
 *             a small pool of threads doing preadv/pwritev; on an NBD export
 *             (an image's qemu-storage-daemon, a remote server) NBD commands
 *             through libnbd (nbd_link.c);
 *   reap      completions are answered as they arrive, out of order;
 *   push      responses published once per round, the peer notified at most once.
 * When a round finds nothing to do it arms req_event (final check), re-enables
 * the event channel only then (late EOI, XSA-332) and sleeps in poll() on the
 * port, the completion eventfd (or the NBD socket) and the stop eventfd together.
 *
 * Nothing is allocated per request: pending requests live in an array of one
 * entry per ring slot, each with segment arrays grown once to the largest
 * request seen.
 *
 * With a journal (cfg.journal), every request taken is also kept in shared
 * memory until it is answered, so that a successor can carry on after this
 * process is killed (see "the journal" below).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "sring.h"

#define ENG_ABI_X86_64 0
#define ENG_ABI_X86_32 1
#define ENG_PORT_XEN 0    /* a /dev/xen/evtchn fd bound to one port */
#define ENG_PORT_SOCKET 1 /* the sim platform: one byte per event */
#define ENG_IO_URING 0
#define ENG_IO_THREADS 1
#define ENG_IO_NBD 2       /* cfg.nbd_uri: libnbd (nbd_link.c) */

#define ENG_OK 0
#define ENG_STOPPED 1
#define ENG_RING_ERROR (-1)
#define ENG_CHANNEL_CLOSED (-2)
#define ENG_FAILED (-3)
#define ENG_JOURNAL_MAGIC 0x314C4E524A464B42ull /* "BKFJRNL1" */
#define JOURNAL_FREE 0
#define JOURNAL_TAKEN 1
#define JOURNAL_ANSWERED 2

#define OP_READ 0
#define OP_WRITE 1
#define OP_BARRIER 2
#define OP_FLUSH 3
#define OP_DISCARD 5
#define OP_INDIRECT 6
#define RSP_OKAY 0
#define RSP_ERROR (-1)
#define RSP_EOPNOTSUPP (-2)

#define PAGE 4096
#define SECTOR 512
#define MAX_DIRECT 11
#define SEGS_PER_PAGE 512
#define MAX_INDIRECT_PAGES 8
#define MAX_PARTS 8            /* IOV_MAX chunks of one request: 4096 / 1024 = 4 */
#define ENG_IOV_MAX 1024
#define SPURIOUS_STREAK 4      /* then each further spurious event costs a pause, */
#define SPURIOUS_PAUSE_MAX_SHIFT 5 /* doubling from 1 ms to 32 ms */
#define CLEAN_PERCENT 5         /* Linux LRU_PERCENT_CLEAN */
#define CLEAN_INTERVAL_MS 100   /* Linux LRU_INTERVAL */
#define CLEAN_IDLE_SECONDS 1    /* a grant used since is hot: kept */

/* struct eng_limits, eng_request, eng_stats and eng_config are declared in
 * _cdefs/engine.py (TYPES), once for cffi and for this file. */

/* Implemented in Python (blkif/backend/engine.py); called with the GIL taken. */
static int eng_map_grants(void *handle, const uint32_t *grefs, unsigned n, int writable,
                          uintptr_t *base, uint64_t *token);
static void eng_unmap_grants(void *handle, uint64_t token);
static int eng_map_each(void *handle, const uint32_t *grefs, unsigned n, int writable,
                        uintptr_t *addrs, uint64_t *tokens);
static void eng_unmap_each(void *handle, const uint64_t *tokens, unsigned n);

/* -- decoding: request.py's rules, on our own copy of the request ---------- */

static int fail(struct eng_request *out, int16_t status)
{
    out->status = status;
    return -1;
}

/* Inside the device and, on a device of larger logical sectors, whole ones
 * (blkback's dispatch_rw_block_io check); request.py's _check_range. */
static int in_device(const struct eng_limits *lim, uint64_t first, uint64_t count)
{
    uint64_t mask = lim->sector_size > SECTOR ? lim->sector_size / SECTOR - 1 : 0;
    return !count || (count <= lim->sectors && first <= lim->sectors - count &&
                      !((first | count) & mask));
}

static int writes(uint8_t kind)
{
    return kind == OP_WRITE || kind == OP_BARRIER || kind == OP_FLUSH || kind == OP_DISCARD;
}

/* Segment descriptor i of a request, its descriptors spread over ``pages``
 * of SEGS_PER_PAGE each (a direct request's are all in its one "page"). */
static void descriptor(const char *const *pages, uint32_t i, struct blkif_request_segment *d)
{
    memcpy(d, pages[i / SEGS_PER_PAGE] + (i % SEGS_PER_PAGE) * sizeof *d, sizeof *d);
}

/* grefs, bounds (byte offset and length per segment) and the sector count
 * from ``n`` descriptors, each read once; -1 for a bad first..last_sect. */
static int fill_segments(struct eng_request *req, uint32_t n, const char *const *pages,
                         uint32_t *grefs, uint32_t *bounds)
{
    uint64_t sectors = 0;
    int whole = 1;
    for (uint32_t i = 0; i < n; i++) {
        struct blkif_request_segment d;
        descriptor(pages, i, &d);
        if (d.last_sect >= PAGE / SECTOR || d.last_sect < d.first_sect)
            return fail(req, RSP_ERROR);
        grefs[i] = d.gref;
        bounds[2 * i] = d.first_sect * SECTOR;
        bounds[2 * i + 1] = (d.last_sect - d.first_sect + 1) * SECTOR;
        whole &= d.first_sect == 0 && d.last_sect == PAGE / SECTOR - 1;
        sectors += d.last_sect - d.first_sect + 1;
    }
    req->whole_pages = whole;
    req->nr_sectors = sectors;
    return 0;
}

#define HEADER(T, raw, out)                                                         \
    do {                                                                            \
        const struct T *r_ = (const void *)(raw);                                   \
        out->id = r_->id;                                                           \
        out->sector_number = r_->sector_number;                                     \
    } while (0)

/* Decode and validate one request copied off the ring (``raw``, our memory).
 * 0: valid (an indirect one still needs eng_decode_indirect); -1: answer
 * out->status with operation out->kind.  ``grefs`` and ``bounds`` hold at
 * least 11 segments. */
static int eng_decode(int abi, const struct eng_limits *lim, const void *raw,
                      struct eng_request *out, uint32_t *grefs, uint32_t *bounds)
{
    const uint8_t *bytes = raw;
    uint8_t op = bytes[0];
    int x86_32 = abi == ENG_ABI_X86_32;
    memset(out, 0, sizeof *out);
    out->operation = out->kind = op;
    switch (op) {
    case OP_READ:
    case OP_WRITE:
    case OP_FLUSH:
    case OP_BARRIER: {
        const char *segs;
        if (x86_32) {
            HEADER(blkif_x86_32_request, raw, out);
            segs = (const char *)raw + offsetof(struct blkif_x86_32_request, seg);
        } else {
            HEADER(blkif_x86_64_request, raw, out);
            segs = (const char *)raw + offsetof(struct blkif_x86_64_request, seg);
        }
        out->nr_segments = bytes[1];
        if ((op == OP_FLUSH && !lim->flush) || (op == OP_BARRIER && !lim->barrier))
            return fail(out, RSP_EOPNOTSUPP);
        if (out->nr_segments < ((op == OP_READ || op == OP_WRITE) ? 1 : 0) ||
            out->nr_segments > MAX_DIRECT)
            return fail(out, RSP_ERROR);
        if (lim->readonly && writes(op))
            return fail(out, RSP_ERROR);
        if (fill_segments(out, out->nr_segments, &segs, grefs, bounds) < 0)
            return -1;
        if (!in_device(lim, out->sector_number, out->nr_sectors))
            return fail(out, RSP_ERROR);
        return 0;
    }
    case OP_INDIRECT:
        if (x86_32) {
            const struct blkif_x86_32_request_indirect *r = raw;
            HEADER(blkif_x86_32_request_indirect, raw, out);
            out->nr_segments = r->nr_segments;
            memcpy(out->indirect_grefs, (const char *)raw +
                   offsetof(struct blkif_x86_32_request_indirect, indirect_grefs),
                   sizeof out->indirect_grefs);
        } else {
            const struct blkif_x86_64_request_indirect *r = raw;
            HEADER(blkif_x86_64_request_indirect, raw, out);
            out->nr_segments = r->nr_segments;
            memcpy(out->indirect_grefs, r->indirect_grefs, sizeof out->indirect_grefs);
        }
        out->kind = bytes[1]; /* indirect_op: what to do, and what the response echoes */
        if (!lim->max_indirect_segments)
            return fail(out, RSP_EOPNOTSUPP);
        if (out->kind != OP_READ && out->kind != OP_WRITE)
            return fail(out, RSP_ERROR);
        if (out->nr_segments < 1 || out->nr_segments > lim->max_indirect_segments)
            return fail(out, RSP_ERROR);
        if (lim->readonly && writes(out->kind))
            return fail(out, RSP_ERROR);
        out->nr_indirect = (out->nr_segments + SEGS_PER_PAGE - 1) / SEGS_PER_PAGE;
        return 0;
    case OP_DISCARD:
        if (x86_32) {
            HEADER(blkif_x86_32_request_discard, raw, out);
            out->nr_sectors = ((const struct blkif_x86_32_request_discard *)raw)->nr_sectors;
        } else {
            HEADER(blkif_x86_64_request_discard, raw, out);
            out->nr_sectors = ((const struct blkif_x86_64_request_discard *)raw)->nr_sectors;
        }
        /* blkif.h: the secure flag is ignored unless discard-secure was offered. */
        out->secure = (bytes[1] & 1) && lim->discard_secure;
        if (!lim->discard)
            return fail(out, RSP_EOPNOTSUPP);
        if (lim->readonly)
            return fail(out, RSP_ERROR);
        if (!in_device(lim, out->sector_number, out->nr_sectors))
            return fail(out, RSP_ERROR);
        return 0;
    default:
        if (x86_32)
            HEADER(blkif_x86_32_request, raw, out);
        else
            HEADER(blkif_x86_64_request, raw, out);
        out->sector_number = 0;
        return fail(out, RSP_EOPNOTSUPP);
    }
}

/* The descriptors of an indirect request, out of its mapped ``pages``
 * (nr_indirect of them); then the range check.  0, or -1: answer out->status. */
static int eng_decode_indirect(const struct eng_limits *lim, struct eng_request *req,
                               const char *const *pages, uint32_t *grefs, uint32_t *bounds)
{
    if (fill_segments(req, req->nr_segments, pages, grefs, bounds) < 0)
        return -1;
    if (!in_device(lim, req->sector_number, req->nr_sectors))
        return fail(req, RSP_ERROR);
    return 0;
}

/* -- the persistent-grant cache: an LRU keyed by gref ---------------------- */

struct grant {
    uint32_t gref;
    uint32_t users;          /* requests in flight using the page */
    int32_t prev, next;      /* LRU list of unused entries; -1 ends it */
    uintptr_t addr;
    uint64_t token;
    time_t last_used;
};

struct grant_cache {
    struct grant *entries;   /* [cap] */
    int32_t *table;          /* open addressing, linear probing: entry or -1 */
    uint32_t cap, count, mask;
    int32_t free_head;       /* unused entries chained through .next */
    int32_t lru_head, lru_tail; /* least and most recently released */
};

static uint32_t hash_gref(uint32_t gref) { return gref * 2654435761u; }

static int cache_init(struct grant_cache *c, uint32_t cap)
{
    uint32_t size = 1;
    while (size < 2 * cap)
        size <<= 1;
    c->entries = calloc(cap ? cap : 1, sizeof *c->entries);
    c->table = malloc(size * sizeof *c->table);
    if (!c->entries || !c->table)
        return -1;
    memset(c->table, 0xff, size * sizeof *c->table);
    c->cap = cap, c->count = 0, c->mask = size - 1;
    c->lru_head = c->lru_tail = -1;
    c->free_head = cap ? 0 : -1;
    for (uint32_t i = 0; i < cap; i++)
        c->entries[i].next = i + 1 < cap ? (int32_t)i + 1 : -1;
    return 0;
}

static int32_t cache_find(struct grant_cache *c, uint32_t gref)
{
    for (uint32_t h = hash_gref(gref) & c->mask;; h = (h + 1) & c->mask) {
        int32_t e = c->table[h];
        if (e < 0 || c->entries[e].gref == gref)
            return e;
    }
}

static void lru_unlink(struct grant_cache *c, int32_t e)
{
    struct grant *g = &c->entries[e];
    if (g->prev >= 0) c->entries[g->prev].next = g->next; else c->lru_head = g->next;
    if (g->next >= 0) c->entries[g->next].prev = g->prev; else c->lru_tail = g->prev;
    g->prev = g->next = -1;
}

static void lru_append(struct grant_cache *c, int32_t e)
{
    struct grant *g = &c->entries[e];
    g->prev = c->lru_tail, g->next = -1;
    if (c->lru_tail >= 0) c->entries[c->lru_tail].next = e; else c->lru_head = e;
    c->lru_tail = e;
}

/* Remove entry e from the table (backward-shift deletion keeps probing exact). */
static void table_remove(struct grant_cache *c, int32_t e)
{
    uint32_t h = hash_gref(c->entries[e].gref) & c->mask;
    while (c->table[h] != e)
        h = (h + 1) & c->mask;
    for (uint32_t j = (h + 1) & c->mask;; j = (j + 1) & c->mask) {
        int32_t f = c->table[j];
        if (f < 0)
            break;
        uint32_t home = hash_gref(c->entries[f].gref) & c->mask;
        /* f may move to the hole at h if its home is not in (h, j]. */
        if (((j - home) & c->mask) >= ((j - h) & c->mask)) {
            c->table[h] = f;
            h = j;
        }
    }
    c->table[h] = -1;
}

/* -- the engine ------------------------------------------------------------- */

struct part { uint32_t iov_at, iov_count; uint64_t offset, length; };

struct pending {
    struct eng_request req;
    uint32_t cap;            /* size of the arrays below */
    uint32_t *grefs, *bounds;
    int32_t *entries;        /* cache entry per page, or -1 */
    uintptr_t *pages;        /* each segment's page */
    struct iovec *iov;
    uint32_t mapped;         /* pages taken by map_pages, to give back */
    uint64_t token;          /* a per-request mapping, 0 if none */
    uintptr_t base;
    uint32_t bounce_at, bounce_n; /* its pages of the bounce buffer, if bounce_n */
    uint32_t segment_iovs;   /* iov[0..segment_iovs): the granted pages; the bounce iovec follows */
    struct part parts[MAX_PARTS];
    uint32_t nparts, outstanding;
    int16_t status;
    int32_t next_free;
    int64_t taken_ns;        /* when it came off the ring: its latency starts */
    struct engine *owner;    /* for libnbd's completion callbacks */
    uint64_t covers;         /* an NBD FLUSH: the writes answered before it */
};

struct done { uint64_t user_data; int64_t res; };

struct job { uint64_t user_data; int op; const struct iovec *iov; uint32_t count; uint64_t offset; };

struct pool {
    pthread_t threads[8];
    uint32_t nthreads;
    pthread_mutex_t lock;
    pthread_cond_t more;
    struct job *jobs;
    struct done *dones;
    uint32_t cap, job_head, job_count, done_head, done_count;
    int quit, fd;
};

struct engine {
    struct eng_config cfg;
    volatile uint32_t *req_prod, *req_event, *rsp_prod, *rsp_event;
    char *slots;
    uint32_t size, slot_size, request_size, response_size;
    uint32_t req_cons, rsp_prod_pvt, rsp_pushed;
    char request[256];       /* RING_COPY_REQUEST lands here */
    struct pending *pending;
    int32_t free_head;
    int32_t barrier_waiting; /* a parked barrier's pending index, or -1 */
    int32_t bounce_waiting;  /* an NBD transfer parked until the bounce buffer has room, or -1 */
    struct grant_cache cache;
    struct io_uring ring;
    struct pool pool;
    struct nbd_link *nbd;       /* ENG_IO_NBD: the connection (nbd_link.c) */
    int io_mode, done_fd, stop_fd;
    int done_ready;          /* poll saw done_fd readable: io_reap resets it */
    volatile int stop;
    int masked, spurious_streak, channel_closed;
    time_t now, next_purge;
    int64_t stamp_ns;        /* the fine clock as round_ns last read it (0: read it again) */
    int64_t next_clean;      /* ms: cache_clean at most every CLEAN_INTERVAL_MS */
    uint64_t full_misses;    /* grants a full cache could not keep since then */
    uint32_t *scratch;       /* the grefs a full cache could not keep, of one request */
    uint32_t *fill_ref, *fill_at; /* the misses a cache with room takes, of one request, */
    uintptr_t *fill_addr;         /* where they are in it, and as map_each mapped them */
    uint64_t *fill_token;
    struct ioctl_gntdev_map_grant_ref *map_op; /* room for the most grants of a request */
    char *bounce;            /* cfg.bounce_pages pages, and a bit per page in use */
    uint64_t *bounce_used;
    int bounce_fixed;        /* registered with io_uring: READ/WRITE_FIXED, no pinning per I/O */
    int submit_each;         /* an io_uring_submit per request taken, not per round */
    int recover;             /* journal entries are left to take again */
    int32_t *recover_order;  /* ... their indexes, oldest on the ring first */
    uint32_t recover_count, recover_at;
    struct eng_stats stats;
    char error[256];
    char io_note[160];
};

static void set_error(struct engine *e, const char *what, long a, long b, long c)
{
    snprintf(e->error, sizeof e->error, what, a, b, c);
}

/* A PV dom0's xen clocksource has no vDSO, so there every read of a fine
 * clock is a system call (under the lab's TCG, a costly one): deadlines take
 * the coarse clock, which the vDSO always serves, and a round reads the fine
 * one at most twice (round_ns). */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The time for a request's latency: read once for what a round takes, and
 * once for what it answers (and again after a wait: stale_clock). */
static int64_t round_ns(struct engine *e)
{
    if (!e->stamp_ns)
        e->stamp_ns = now_ns();
    return e->stamp_ns;
}

/* Before a wait in the round: what follows reads the clock again. */
static void stale_clock(struct engine *e) { e->stamp_ns = 0; }

#define IO_FSYNC 2

#include "nbd_link.c"

/* -- I/O: io_uring, or a pool of threads ------------------------------------ */

static long do_io(int fd, int op, const struct iovec *iov, uint32_t count, uint64_t offset)
{
    long r;
    if (op == IO_FSYNC)
        r = fdatasync(fd);
    else if (op == OP_READ)
        r = preadv(fd, iov, count, offset);
    else
        r = pwritev(fd, iov, count, offset);
    return r < 0 ? -errno : r;
}

static void *pool_main(void *arg)
{
    struct engine *e = arg;
    struct pool *p = &e->pool;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->job_count && !p->quit)
            pthread_cond_wait(&p->more, &p->lock);
        if (!p->job_count)
            break;
        struct job j = p->jobs[p->job_head];
        p->job_head = (p->job_head + 1) % p->cap;
        p->job_count--;
        pthread_mutex_unlock(&p->lock);
        long res = do_io(e->cfg.store_fd, j.op, j.iov, j.count, j.offset);
        pthread_mutex_lock(&p->lock);
        p->dones[(p->done_head + p->done_count++) % p->cap] = (struct done){j.user_data, res};
        uint64_t one = 1;
        if (write(p->fd, &one, sizeof one) < 0) { /* a full eventfd is still readable */ }
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static int io_start(struct engine *e)
{
    unsigned entries = 1;
    while (entries < e->size * 4 + 4 && entries < 4096)
        entries <<= 1;
    e->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->done_fd < 0)
        return -errno;
    if (e->cfg.nbd_uri) {
        e->io_mode = ENG_IO_NBD;
        if (!(e->nbd = calloc(1, sizeof *e->nbd)))
            return -ENOMEM;
        link_start(e);
        return 0;
    }
    if (e->cfg.io_mode == ENG_IO_URING) {
        int r = io_uring_queue_init(entries, &e->ring, 0);
        if (r == 0 && (r = io_uring_register_eventfd(&e->ring, e->done_fd)) < 0)
            io_uring_queue_exit(&e->ring);
        if (r == 0) {
            /* The kernel plugs a submit of three or more reads and writes and
             * sends them to the disk together when it ends; a disk then sees
             * the ring's convoys and answers them in convoys.  On an O_DIRECT
             * store every request goes to the disk, so each goes at once;
             * through the page cache most complete inside the submit, and one
             * submit per round costs fewer system calls. */
            int flags = fcntl(e->cfg.store_fd, F_GETFL);
            e->submit_each = flags >= 0 && (flags & O_DIRECT);
            e->io_mode = ENG_IO_URING;
            snprintf(e->io_note, sizeof e->io_note, "io_uring, %u entries, a submit per %s",
                     entries, e->submit_each ? "request (O_DIRECT)" : "round");
            return 0;
        }
        snprintf(e->io_note, sizeof e->io_note, "io_uring refused (%s): ", strerror(-r));
    }
    struct pool *p = &e->pool;
    e->io_mode = ENG_IO_THREADS;
    p->cap = e->size * MAX_PARTS + 4;
    p->jobs = calloc(p->cap, sizeof *p->jobs);
    p->dones = calloc(p->cap, sizeof *p->dones);
    if (!p->jobs || !p->dones)
        return -ENOMEM;
    p->fd = e->done_fd;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->more, NULL);
    p->nthreads = e->cfg.io_threads < 1 ? 1 : e->cfg.io_threads > 8 ? 8 : e->cfg.io_threads;
    for (uint32_t i = 0; i < p->nthreads; i++)
        if (pthread_create(&p->threads[i], NULL, pool_main, e)) {
            p->nthreads = i;
            return -EAGAIN;
        }
    size_t len = strlen(e->io_note);
    snprintf(e->io_note + len, sizeof e->io_note - len, "%u I/O threads", p->nthreads);
    return 0;
}

static void complete(struct engine *e, uint64_t user_data, int64_t res);

static void io_queue(struct engine *e, uint64_t user_data, int op, const struct iovec *iov,
                     uint32_t count, uint64_t offset)
{
    if (e->io_mode == ENG_IO_URING) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);
        if (!sqe) {          /* the ring is sized for a full ring of requests */
            io_uring_submit(&e->ring);
            sqe = io_uring_get_sqe(&e->ring);
        }
        if (!sqe) {          /* the kernel takes nothing more: answer it failed */
            complete(e, user_data, -EBUSY);
            return;
        }
        int fixed = e->bounce_fixed && count == 1 && (char *)iov->iov_base >= e->bounce &&
                    (char *)iov->iov_base < e->bounce + (size_t)e->cfg.bounce_pages * PAGE;
        if (op == IO_FSYNC)
            io_uring_prep_fsync(sqe, e->cfg.store_fd, IORING_FSYNC_DATASYNC);
        else if (fixed && op == OP_READ)
            io_uring_prep_read_fixed(sqe, e->cfg.store_fd, iov->iov_base, iov->iov_len, offset, 0);
        else if (fixed)
            io_uring_prep_write_fixed(sqe, e->cfg.store_fd, iov->iov_base, iov->iov_len, offset, 0);
        else if (op == OP_READ)
            io_uring_prep_readv(sqe, e->cfg.store_fd, iov, count, offset);
        else
            io_uring_prep_writev(sqe, e->cfg.store_fd, iov, count, offset);
        io_uring_sqe_set_data64(sqe, user_data);
        return;
    }
    struct pool *p = &e->pool;
    pthread_mutex_lock(&p->lock);
    p->jobs[(p->job_head + p->job_count++) % p->cap] =
        (struct job){user_data, op, iov, count, offset};
    pthread_cond_signal(&p->more);
    pthread_mutex_unlock(&p->lock);
}

static void io_submit(struct engine *e)
{
    if (e->io_mode == ENG_IO_URING && io_uring_sq_ready(&e->ring)) {
        io_uring_submit(&e->ring);
        e->stats.submits++;
    }
}

/* Answer every completion there is; returns how many. */
static unsigned io_reap(struct engine *e)
{
    unsigned n = 0;
    uint64_t count;
    stale_clock(e); /* after the submit, which may have done the I/O itself */
    if (e->io_mode == ENG_IO_NBD)
        return link_reap(e);
    if (e->done_ready) { /* else completions are looked for without a system call */
        if (read(e->done_fd, &count, sizeof count) < 0) { /* EAGAIN: look anyway */ }
        e->done_ready = 0;
    }
    if (e->io_mode == ENG_IO_URING) {
        struct io_uring_cqe *cqes[64];
        unsigned got;
        while ((got = io_uring_peek_batch_cqe(&e->ring, cqes, 64)) > 0) {
            for (unsigned i = 0; i < got; i++)
                complete(e, io_uring_cqe_get_data64(cqes[i]), cqes[i]->res);
            io_uring_cq_advance(&e->ring, got);
            n += got;
        }
        return n;
    }
    struct pool *p = &e->pool;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        if (!p->done_count) {
            pthread_mutex_unlock(&p->lock);
            return n;
        }
        struct done d = p->dones[p->done_head];
        p->done_head = (p->done_head + 1) % p->cap;
        p->done_count--;
        pthread_mutex_unlock(&p->lock);
        complete(e, d.user_data, d.res);
        n++;
    }
}

static void io_stop(struct engine *e)
{
    if (e->io_mode == ENG_IO_URING) {
        io_uring_queue_exit(&e->ring);
    } else if (e->nbd) {
        link_close(e);
        free(e->nbd);
        e->nbd = NULL;
    } else if (e->pool.jobs) {
        pthread_mutex_lock(&e->pool.lock);
        e->pool.quit = 1;
        pthread_cond_broadcast(&e->pool.more);
        pthread_mutex_unlock(&e->pool.lock);
        for (uint32_t i = 0; i < e->pool.nthreads; i++)
            pthread_join(e->pool.threads[i], NULL);
        free(e->pool.jobs);
        free(e->pool.dones);
    }
    if (e->done_fd >= 0)
        close(e->done_fd);
}


#define LATENCY_UNIT_NS 32000 /* counters.py latency_bucket: bucket i under 32 us << i */
#define LATENCY_LAST 16

static void observe_latency(struct engine *e, int64_t ns)
{
    uint64_t units = ns > 0 ? (uint64_t)ns / LATENCY_UNIT_NS : 0;
    uint32_t bucket = units ? 64 - __builtin_clzll(units) : 0; /* Python's bit_length */
    e->stats.latency[bucket < LATENCY_LAST ? bucket : LATENCY_LAST]++;
    e->stats.latency_ns += ns > 0 ? ns : 0;
}

/* -- the ring: responses, push, notify -------------------------------------- */

static void respond(struct engine *e, uint64_t id, uint8_t operation, int16_t status)
{
    char *slot = e->slots + (e->rsp_prod_pvt & (e->size - 1)) * e->slot_size;
    memset(slot, 0, e->response_size); /* no stale bytes in the padding (XSA-216) */
    if (e->cfg.abi == ENG_ABI_X86_32) {
        struct blkif_x86_32_response *r = (void *)slot;
        r->id = id, r->operation = operation, r->status = status;
    } else {
        struct blkif_x86_64_response *r = (void *)slot;
        r->id = id, r->operation = operation, r->status = status;
    }
    e->rsp_prod_pvt++;
    e->stats.in_flight--;
    if (status != RSP_OKAY)
        e->stats.errors++;
}

static int notify(struct engine *e)
{
    e->stats.notifies++;
    if (e->cfg.port_kind == ENG_PORT_XEN) {
        struct ioctl_evtchn_notify op = {e->cfg.port};
        ioctl(e->cfg.port_fd, IOCTL_EVTCHN_NOTIFY, &op); /* Xen drops it if the peer is gone */
        return 0;
    }
    if (send(e->cfg.port_fd, "\1", 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
        errno != EAGAIN && errno != EWOULDBLOCK) {
        e->channel_closed = 1;
        return -1;
    }
    return 0;
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, then the notify. */
static int push(struct engine *e)
{
    uint32_t old = e->rsp_pushed, new = e->rsp_prod_pvt;
    if (old == new)
        return 0;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* responses before rsp_prod */
    *e->rsp_prod = new;
    e->rsp_pushed = new;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* rsp_prod before reading rsp_event */
    e->stats.batches++;
    if ((uint32_t)(new - *e->rsp_event) < (uint32_t)(new - old))
        return notify(e);
    return 0;
}

/* -- the journal (live restart) --------------------------------------------
 *
 * Requests copied off the ring live only in this process, and responses
 * overwrite request slots, so a worker killed at any moment would lose what
 * it had taken but not answered.  The journal, a shared mapping of a file
 * (blkif/backend/journal.py), keeps each request from its taking to its
 * answer, with plain stores: no system call on the hot path.  Each store is
 * a release store, in an order that leaves every prefix consistent:
 *
 *   take:    entry.request, entry.ring_index, entry.state = TAKEN; req_cons
 *   answer:  the response in its slot; entry.answer, entry.state = ANSWERED;
 *            rsp_prod_pvt; entry.state = FREE
 *
 * A successor (cfg.resume) takes every TAKEN entry again and answers it
 * once: a TAKEN entry at req_cons was never taken (its slot still holds
 * it), an ANSWERED one at rsp_prod_pvt has its response in place already.
 * (A request answered late may have been taken any number of slots before
 * req_cons: answers come out of order.)
 * Reads and writes done twice are harmless: the frontend waits for the
 * answer before it touches those sectors or pages again. */

static void journal_take(struct engine *e, int32_t index)
{
    struct eng_journal *j = e->cfg.journal;
    if (!j)
        return;
    struct eng_journal_entry *en = &j->entries[index];
    memcpy(en->request, e->request, e->request_size);
    en->ring_index = e->req_cons;
    __atomic_store_n(&en->state, JOURNAL_TAKEN, __ATOMIC_RELEASE);
    __atomic_store_n(&j->req_cons, e->req_cons + 1, __ATOMIC_RELEASE);
}

static void journal_answered(struct engine *e, int32_t index, uint32_t at)
{
    struct eng_journal *j = e->cfg.journal;
    if (!j)
        return;
    struct eng_journal_entry *en = &j->entries[index];
    en->answer = at;
    __atomic_store_n(&en->state, JOURNAL_ANSWERED, __ATOMIC_RELEASE);
    __atomic_store_n(&j->rsp_prod_pvt, at + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&en->state, JOURNAL_FREE, __ATOMIC_RELEASE);
}

/* A new journal, or (cfg.resume) the ring positions and requests of the one
 * a predecessor left; -1 with ``err`` set if it does not fit this ring. */
static int journal_open(struct engine *e, char *err, size_t errlen)
{
    struct eng_journal *j = e->cfg.journal;
    uint32_t live = 0;
    if (!e->cfg.resume) {
        memset(j, 0, sizeof *j + e->size * sizeof j->entries[0]);
        j->size = e->size, j->abi = (uint32_t)e->cfg.abi;
        j->req_cons = j->rsp_prod_pvt = e->req_cons;
        __atomic_store_n(&j->magic, ENG_JOURNAL_MAGIC, __ATOMIC_RELEASE);
        return 0;
    }
    if (j->magic != ENG_JOURNAL_MAGIC || j->size != e->size || j->abi != (uint32_t)e->cfg.abi) {
        snprintf(err, errlen, "the journal is not of this ring (size %u, abi %u)",
                 j->size, j->abi);
        return -1;
    }
    uint32_t cons = j->req_cons, rsp = j->rsp_prod_pvt;
    for (uint32_t i = 0; i < e->size; i++)
        if (j->entries[i].state == JOURNAL_ANSWERED && j->entries[i].answer == rsp)
            rsp++; /* killed between its answer and rsp_prod_pvt */
    for (uint32_t i = 0; i < e->size; i++) {
        struct eng_journal_entry *en = &j->entries[i];
        if (en->state == JOURNAL_TAKEN && en->ring_index != cons)
            live++;
        else
            en->state = JOURNAL_FREE;
    }
    if ((uint32_t)(cons - rsp) != live || (uint32_t)(rsp - *e->rsp_prod) > e->size) {
        snprintf(err, errlen, "the journal is inconsistent (req_cons %u, rsp_prod_pvt %u, "
                 "%u requests, rsp_prod %u)", cons, rsp, live, *e->rsp_prod);
        return -1;
    }
    j->rsp_prod_pvt = rsp;
    e->req_cons = cons;
    e->rsp_prod_pvt = rsp;
    e->rsp_pushed = *e->rsp_prod; /* the first push publishes what was answered */
    e->free_head = -1;            /* the free list, without the requests to take again */
    for (uint32_t i = e->size; i-- > 0;)
        if (j->entries[i].state == JOURNAL_FREE) {
            e->pending[i].next_free = e->free_head;
            e->free_head = (int32_t)i;
        }
    /* Taken again in ring order, oldest first, as the predecessor took them. */
    if (live && !(e->recover_order = malloc(live * sizeof *e->recover_order))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (uint32_t i = 0; i < e->size; i++) {
        if (j->entries[i].state != JOURNAL_TAKEN)
            continue;
        uint32_t k = e->recover_count++;
        for (; k && cons - j->entries[e->recover_order[k - 1]].ring_index <
                        cons - j->entries[i].ring_index; k--)
            e->recover_order[k] = e->recover_order[k - 1];
        e->recover_order[k] = (int32_t)i;
    }
    e->recover = live > 0;
    return 0;
}

/* -- grants ----------------------------------------------------------------- */

/* A gntdev mapping's token: its mmap offset in pages and its page count
 * (1..4096, so never 0, which means "no mapping"). */
#define TOKEN_COUNT_BITS 13

/* Map ``n`` grants of the frontend contiguously at *base; *token is what
 * unmap_grants needs.  -1 (the errno in stats.last_map_errno) if any fails. */
static int map_grants(struct engine *e, const uint32_t *grefs, uint32_t n, int writable,
                      uintptr_t *base, uint64_t *token)
{
    int fd = e->cfg.gntdev_fd;
    if (fd < 0)
        return eng_map_grants(e->cfg.handle, grefs, n, writable, base, token);
    struct ioctl_gntdev_map_grant_ref *op = e->map_op;
    op->count = n;
    for (uint32_t i = 0; i < n; i++) {
        op->refs[i].domid = e->cfg.domid;
        op->refs[i].ref = grefs[i];
    }
    if (ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, op) < 0) {
        e->stats.last_map_errno = errno;
        return -1;
    }
    /* The hypervisor maps the grants here, read-only unless PROT_WRITE. */
    void *addr = mmap(NULL, (size_t)n * PAGE, PROT_READ | (writable ? PROT_WRITE : 0),
                      MAP_SHARED, fd, (off_t)op->index);
    if (addr == MAP_FAILED) {
        e->stats.last_map_errno = errno;
        struct ioctl_gntdev_unmap_grant_ref undo = {.index = op->index, .count = n};
        ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &undo);
        return -1;
    }
    *base = (uintptr_t)addr;
    *token = op->index / PAGE << TOKEN_COUNT_BITS | n;
    return 0;
}

static void unmap_grants(struct engine *e, uintptr_t base, uint64_t token)
{
    if (e->cfg.gntdev_fd < 0) {
        eng_unmap_grants(e->cfg.handle, token);
        return;
    }
    uint32_t n = token & ((1u << TOKEN_COUNT_BITS) - 1);
    struct ioctl_gntdev_unmap_grant_ref op = {
        .index = token >> TOKEN_COUNT_BITS << 12, .count = n};
    munmap((void *)base, (size_t)n * PAGE);
    ioctl(e->cfg.gntdev_fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &op);
}

/* Map each of ``n`` grants on its own (addrs[i], tokens[i]), writable: the
 * sim in one call back (its hypervisor maps them in one request, as Xen's
 * batched map hypercall gives a handle per entry), gntdev one by one.  -1
 * with nothing left mapped if any fails. */
static int map_each(struct engine *e, const uint32_t *grefs, uint32_t n, uintptr_t *addrs,
                    uint64_t *tokens)
{
    if (e->cfg.gntdev_fd < 0)
        return eng_map_each(e->cfg.handle, grefs, n, 1, addrs, tokens);
    for (uint32_t i = 0; i < n; i++)
        if (map_grants(e, grefs + i, 1, 1, addrs + i, tokens + i) < 0) {
            while (i--)
                unmap_grants(e, addrs[i], tokens[i]);
            return -1;
        }
    return 0;
}

static void cache_evict(struct engine *e, int32_t i)
{
    struct grant_cache *c = &e->cache;
    lru_unlink(c, i);
    table_remove(c, i);
    unmap_grants(e, c->entries[i].addr, c->entries[i].token);
    c->entries[i].next = c->free_head;
    c->free_head = i;
    c->count--;
    e->stats.persistent_grants--;
}

/* The cached page of ``gref`` with its users count raised, or -1. */
static int32_t cache_hit(struct engine *e, uint32_t gref)
{
    struct grant_cache *c = &e->cache;
    int32_t i = cache_find(c, gref);
    if (i >= 0) {
        if (!c->entries[i].users++)
            lru_unlink(c, i);
        e->stats.grant_hits++;
    }
    return i;
}

/* A page just mapped for ``gref`` into the cache (in use once), which has
 * room; a gref the cache already holds (twice in one request) keeps its
 * entry, and the new mapping goes. */
static int32_t cache_insert(struct engine *e, uint32_t gref, uintptr_t addr, uint64_t token)
{
    struct grant_cache *c = &e->cache;
    int32_t i = cache_hit(e, gref);
    if (i >= 0) {
        unmap_grants(e, addr, token);
        return i;
    }
    e->stats.grant_misses++;
    i = c->free_head;
    c->free_head = c->entries[i].next;
    c->entries[i] = (struct grant){gref, 1, -1, -1, addr, token, e->now};
    uint32_t h = hash_gref(gref) & c->mask;
    while (c->table[h] >= 0)
        h = (h + 1) & c->mask;
    c->table[h] = i;
    c->count++;
    e->stats.persistent_grants++;
    return i;
}

static void cache_put(struct engine *e, int32_t i)
{
    struct grant *g = &e->cache.entries[i];
    g->last_used = e->now;
    if (!--g->users)
        lru_append(&e->cache, i);
}

/* Linux purge_persistent_gnt, for a full cache: unmap up to 5% of it, least
 * recently used first, of the grants no request used in the last second (a
 * cache full of hot grants stays as it is: remapping them would only churn). */
static void cache_clean(struct engine *e)
{
    struct grant_cache *c = &e->cache;
    uint32_t n = c->cap * CLEAN_PERCENT / 100;
    for (n = n ? n : 1; n && c->lru_head >= 0 &&
                        c->entries[c->lru_head].last_used + CLEAN_IDLE_SECONDS <= e->now; n--) {
        cache_evict(e, c->lru_head);
        e->stats.grant_evictions++;
    }
}

/* Drop grants unused for grant_unused_seconds (Linux persistent_grant_unused_seconds). */
static void cache_purge(struct engine *e)
{
    struct grant_cache *c = &e->cache;
    while (c->lru_head >= 0 &&
           c->entries[c->lru_head].last_used + (time_t)e->cfg.grant_unused_seconds <= e->now) {
        cache_evict(e, c->lru_head);
        e->stats.grant_purged++;
    }
}

/* Unmap every cached grant, the engine being done: the sim in one call back
 * (its hypervisor unmaps them in one request, as Xen's batched unmap
 * hypercall), gntdev one by one. */
static void cache_release(struct engine *e)
{
    struct grant_cache *c = &e->cache;
    if (!c->table)
        return;
    uint64_t *tokens = e->cfg.gntdev_fd < 0 ? malloc((c->count + 1) * sizeof *tokens) : NULL;
    uint32_t n = 0;
    for (uint32_t h = 0; h <= c->mask; h++)
        if (c->table[h] >= 0) {
            struct grant *g = &c->entries[c->table[h]];
            if (tokens)
                tokens[n++] = g->token;
            else
                unmap_grants(e, g->addr, g->token);
        }
    if (n)
        eng_unmap_each(e->cfg.handle, tokens, n);
    free(tokens);
    e->stats.persistent_grants = 0;
}

/* Page addresses of ``n`` grefs into pages[] (through the cache, or one
 * mapping kept in p->token); 0, or -1 if some grant cannot be mapped. */
static int map_pages(struct engine *e, struct pending *p, const uint32_t *grefs, uint32_t n,
                     int writable, int32_t *entries, uintptr_t *pages)
{
    uint32_t missing = n;
    const uint32_t *map = grefs;
    if (e->cfg.persistent) {
        /* Hits from the cache; misses into it while it has room, mapped
         * together (map_each); the rest (a full cache) mapped together below,
         * as blkback maps the grants it cannot keep, while cache_clean frees
         * room in the background. */
        struct grant_cache *c = &e->cache;
        uint32_t room = c->cap - c->count, fills = 0;
        missing = 0;
        for (uint32_t k = 0; k < n; k++) {
            entries[k] = cache_hit(e, grefs[k]);
            if (entries[k] >= 0)
                pages[k] = c->entries[entries[k]].addr;
            else if (fills < room)
                e->fill_ref[fills] = grefs[k], e->fill_at[fills++] = k;
            else
                e->scratch[missing++] = grefs[k];
        }
        if (fills && map_each(e, e->fill_ref, fills, e->fill_addr, e->fill_token) < 0) {
            for (uint32_t k = 0; k < n; k++) /* a bad grant: give back what we took */
                if (entries[k] >= 0)
                    cache_put(e, entries[k]);
            return -1;
        }
        for (uint32_t f = 0; f < fills; f++) {
            uint32_t k = e->fill_at[f];
            entries[k] = cache_insert(e, e->fill_ref[f], e->fill_addr[f], e->fill_token[f]);
            pages[k] = c->entries[entries[k]].addr;
        }
        if (!missing)
            return 0;
        e->full_misses += missing;
        map = e->scratch;
    }
    if (map_grants(e, map, missing, writable, &p->base, &p->token) < 0) {
        p->token = 0;
        if (e->cfg.persistent)
            for (uint32_t k = 0; k < n; k++)
                if (entries[k] >= 0)
                    cache_put(e, entries[k]);
        return -1;
    }
    e->stats.mapped_grants += missing;
    for (uint32_t k = 0, j = 0; k < n; k++)
        if (!e->cfg.persistent || entries[k] < 0) {
            entries[k] = -1;
            pages[k] = p->base + (uintptr_t)j++ * PAGE;
        }
    return 0;
}

static void unmap_pages(struct engine *e, struct pending *p)
{
    for (uint32_t i = 0; i < p->mapped; i++)
        if (p->entries[i] >= 0)
            cache_put(e, p->entries[i]);
    p->mapped = 0;
    if (p->token) {
        unmap_grants(e, p->base, p->token);
        p->token = 0;
    }
}

/* -- requests --------------------------------------------------------------- */

static int grow(struct pending *p, uint32_t n)
{
    if (n <= p->cap)
        return 0;
    uint32_t *g = realloc(p->grefs, n * sizeof *g);
    if (g) p->grefs = g;
    uint32_t *b = realloc(p->bounds, 2 * n * sizeof *b);
    if (b) p->bounds = b;
    int32_t *en = realloc(p->entries, n * sizeof *en);
    if (en) p->entries = en;
    uintptr_t *pg = realloc(p->pages, n * sizeof *pg);
    if (pg) p->pages = pg;
    struct iovec *v = realloc(p->iov, n * sizeof *v);
    if (v) p->iov = v;
    if (!g || !b || !en || !pg || !v)
        return -1;
    p->cap = n;
    return 0;
}

/* -- the bounce buffer ---------------------------------------------------------
 *
 * With O_DIRECT, the kernel pins a transfer's pages for each I/O (get_user_pages).
 * In a PV dom0 granted pages are special mappings that only its slow path can
 * pin, page by page, a large share of dom0's CPU in the lab's 1 MiB reads
 * (docs/lab.md).  With cfg.bounce_pages, a transfer that fits goes through the ring's
 * own buffer instead, one iovec of ordinary memory: its data is copied from the
 * granted pages before a write and to them after a read.  A transfer that finds
 * no room goes straight to the granted pages as without it; on an NBD store,
 * whose buffer holds the largest request, it waits for room instead (one
 * command per transfer, as NbdStore sends them).  With io_uring the
 * buffer is registered (pinned once, READ_FIXED/WRITE_FIXED): measured faster
 * than the same buffer unregistered (docs/bench.md). */

static int bounce_take(struct engine *e, uint32_t n, uint32_t *at)
{
    uint32_t run = 0;
    for (uint32_t i = 0; i < e->cfg.bounce_pages; i++) {
        if (e->bounce_used[i / 64] >> (i % 64) & 1) {
            run = 0;
            if (e->bounce_used[i / 64] == ~0ull)
                i |= 63; /* a full word: on to the next */
            continue;
        }
        if (++run == n) {
            *at = i + 1 - n;
            for (uint32_t k = *at; k <= i; k++)
                e->bounce_used[k / 64] |= 1ull << (k % 64);
            return 0;
        }
    }
    return -1;
}

static void bounce_give(struct engine *e, uint32_t at, uint32_t n)
{
    for (uint32_t k = at; k < at + n; k++)
        e->bounce_used[k / 64] &= ~(1ull << (k % 64));
}

/* Copy between the granted pages (iov[0..segment_iovs)) and the bounce pages. */
static void bounce_copy(struct pending *p, int to_bounce)
{
    char *at = p->iov[p->segment_iovs].iov_base;
    for (uint32_t i = 0; i < p->segment_iovs; i++) {
        if (to_bounce)
            memcpy(at, p->iov[i].iov_base, p->iov[i].iov_len);
        else
            memcpy(p->iov[i].iov_base, at, p->iov[i].iov_len);
        at += p->iov[i].iov_len;
    }
}

/* Route a mapped transfer through the bounce buffer if it fits there now. */
static void bounce_prepare(struct engine *e, struct pending *p)
{
    struct eng_request *r = &p->req;
    uint32_t n = (uint32_t)((r->nr_sectors * SECTOR + PAGE - 1) / PAGE);
    uint32_t nv = p->parts[p->nparts - 1].iov_at + p->parts[p->nparts - 1].iov_count;
    if (!e->bounce || n > e->cfg.bounce_pages || grow(p, nv + 1) < 0 ||
        bounce_take(e, n, &p->bounce_at) < 0)
        return;
    p->bounce_n = n;
    p->segment_iovs = nv;
    p->iov[nv] = (struct iovec){e->bounce + (size_t)p->bounce_at * PAGE, r->nr_sectors * SECTOR};
    p->parts[0] = (struct part){nv, 1, p->parts[0].offset, r->nr_sectors * SECTOR};
    p->nparts = 1;
    if (r->kind != OP_READ)
        bounce_copy(p, 1);
    e->stats.bounced++;
}

static void finish(struct engine *e, int32_t index)
{
    struct pending *p = &e->pending[index];
    struct eng_request *r = &p->req;
    if (p->bounce_n) {
        if (p->status == RSP_OKAY && r->kind == OP_READ)
            bounce_copy(p, 0);
        bounce_give(e, p->bounce_at, p->bounce_n);
        p->bounce_n = 0;
    }
    unmap_pages(e, p);
    if (p->status == RSP_OKAY && r->kind == OP_READ)
        e->stats.read_bytes += r->nr_sectors * SECTOR;
    else if (p->status == RSP_OKAY && r->kind != OP_DISCARD)
        e->stats.write_bytes += r->nr_sectors * SECTOR;
    uint32_t at = e->rsp_prod_pvt;
    respond(e, r->id, r->kind, p->status);
    journal_answered(e, index, at);
    observe_latency(e, round_ns(e) - p->taken_ns);
    p->next_free = e->free_head;
    e->free_head = index;
}

static void answer_now(struct engine *e, int32_t index, int16_t status)
{
    e->pending[index].status = status;
    e->pending[index].outstanding = 0;
    finish(e, index);
}

/* The iovecs of a transfer (adjacent pieces merged), cut into parts of at
 * most IOV_MAX vectors each.  Returns the number of parts. */
static uint32_t build_parts(struct pending *p, const uintptr_t *pages)
{
    struct eng_request *r = &p->req;
    uint32_t nv = 0, np = 0;
    uint64_t offset = r->sector_number * SECTOR, part_len = 0;
    p->parts[0] = (struct part){0, 0, offset, 0};
    for (uint32_t i = 0; i < r->nr_segments; i++) {
        char *base = (char *)pages[i] + (r->whole_pages ? 0 : p->bounds[2 * i]);
        size_t len = r->whole_pages ? PAGE : p->bounds[2 * i + 1];
        struct part *cur = &p->parts[np];
        if (nv > cur->iov_at && (char *)p->iov[nv - 1].iov_base + p->iov[nv - 1].iov_len == base) {
            p->iov[nv - 1].iov_len += len;
        } else {
            if (nv - cur->iov_at == ENG_IOV_MAX) {
                cur->iov_count = nv - cur->iov_at;
                cur->length = part_len;
                offset += part_len;
                part_len = 0;
                cur = &p->parts[++np];
                *cur = (struct part){nv, 0, offset, 0};
            }
            p->iov[nv++] = (struct iovec){base, len};
        }
        part_len += len;
    }
    p->parts[np].iov_count = nv - p->parts[np].iov_at;
    p->parts[np].length = part_len;
    return np + 1;
}

static uint64_t user_data(int32_t index, uint32_t part) { return (uint64_t)part << 32 | (uint32_t)index; }

static void submit_transfer(struct engine *e, int32_t index, int op)
{
    struct pending *p = &e->pending[index];
    if (e->io_mode == ENG_IO_NBD) {
        link_transfer(e, p, op);
        return;
    }
    p->outstanding = p->nparts;
    for (uint32_t k = 0; k < p->nparts; k++)
        io_queue(e, user_data(index, k), op, p->iov + p->parts[k].iov_at,
                 p->parts[k].iov_count, p->parts[k].offset);
    if (e->submit_each)
        io_submit(e);
}

/* A write the store took only partly: write the rest here (rare: files).
 * A barrier's data is written here too, from the start. */
static int64_t write_rest(struct engine *e, struct pending *p, struct part *part, uint64_t done)
{
    stale_clock(e);
    struct iovec *iov = p->iov + part->iov_at;
    uint32_t count = part->iov_count;
    if (e->io_mode == ENG_IO_NBD) {
        for (uint32_t k = 0; k < count; done += iov[k++].iov_len) {
            int err = link_wait(e, OP_WRITE, iov[k].iov_base, iov[k].iov_len, part->offset + done);
            if (err) {
                e->stats.last_io_errno = err;
                return -err;
            }
        }
        return done;
    }
    while (done < part->length) {
        uint64_t skip = done;
        uint32_t k = 0;
        while (skip >= iov[k].iov_len)
            skip -= iov[k++].iov_len;
        struct iovec first = iov[k];
        iov[k].iov_base = (char *)iov[k].iov_base + skip;
        iov[k].iov_len -= skip;
        ssize_t n = pwritev(e->cfg.store_fd, iov + k, count - k, part->offset + done);
        iov[k] = first;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += n;
    }
    return done;
}

static void complete(struct engine *e, uint64_t ud, int64_t res)
{
    int32_t index = (int32_t)(uint32_t)ud;
    struct pending *p = &e->pending[index];
    struct eng_request *r = &p->req;
    if (r->kind == OP_FLUSH && !r->nr_segments) {
        if (res < 0)
            __atomic_store_n(e->cfg.flush_failed, 1, __ATOMIC_SEQ_CST);
    } else {
        struct part *part = &p->parts[ud >> 32];
        if (res >= 0 && (uint64_t)res < part->length)
            res = r->kind == OP_READ ? -EIO : write_rest(e, p, part, res);
    }
    if (res < 0) {
        p->status = RSP_ERROR;
        e->stats.last_io_errno = -res;
    }
    if (!--p->outstanding)
        finish(e, index);
}

static int16_t sync_store(struct engine *e)
{
    stale_clock(e);
    if (__atomic_load_n(e->cfg.flush_failed, __ATOMIC_SEQ_CST))
        return RSP_ERROR;
    if (e->io_mode == ENG_IO_NBD) {
        int err = link_wait(e, IO_FSYNC, NULL, 0, 0);
        if (err)
            e->stats.last_io_errno = err;
        return err ? RSP_ERROR : RSP_OKAY;
    }
    if (fdatasync(e->cfg.store_fd) < 0) {
        e->stats.last_io_errno = errno;
        /* As QEMU's file-posix: the writes it lost stay lost, so every later
         * flush fails too (the kernel reports the error only once). */
        __atomic_store_n(e->cfg.flush_failed, 1, __ATOMIC_SEQ_CST);
        return RSP_ERROR;
    }
    return RSP_OKAY;
}

static int16_t discard(struct engine *e, struct eng_request *r)
{
    uint64_t range[2] = {r->sector_number * SECTOR, r->nr_sectors * SECTOR};
    int rc;
    if (!r->nr_sectors)
        return RSP_OKAY;
    if (e->cfg.store_is_device)
        rc = ioctl(e->cfg.store_fd, r->secure ? BLKSECDISCARD : BLKDISCARD, range);
    else
        rc = fallocate(e->cfg.store_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       range[0], range[1]);
    if (rc < 0) {
        e->stats.last_io_errno = errno;
        return errno == EOPNOTSUPP ? RSP_EOPNOTSUPP : RSP_ERROR;
    }
    return RSP_OKAY;
}

/* A barrier runs alone: everything before it done, then flush, its data, flush. */
static void run_barrier(struct engine *e, int32_t index)
{
    struct pending *p = &e->pending[index];
    int16_t status = sync_store(e);
    if (status == RSP_OKAY && p->req.nr_segments) {
        for (uint32_t k = 0; k < p->nparts && status == RSP_OKAY; k++)
            if (write_rest(e, p, &p->parts[k], 0) < 0)
                status = RSP_ERROR;
        if (status == RSP_OKAY)
            status = sync_store(e);
    }
    answer_now(e, index, status);
}

/* Map a decoded READ/WRITE/FLUSH/BARRIER's pages and build its iovecs. */
static int prepare_transfer(struct engine *e, struct pending *p)
{
    struct eng_request *r = &p->req;
    if (map_pages(e, p, p->grefs, r->nr_segments, r->kind == OP_READ, p->entries, p->pages) < 0)
        return -1;
    p->mapped = r->nr_segments;
    p->nparts = build_parts(p, p->pages);
    bounce_prepare(e, p);
    return 0;
}

static int read_indirect(struct engine *e, struct pending *p)
{
    struct eng_request *r = &p->req;
    int32_t entries[MAX_INDIRECT_PAGES];
    uintptr_t pages[MAX_INDIRECT_PAGES];
    uint64_t token = 0;
    uintptr_t base;
    int rc;
    if (grow(p, r->nr_segments) < 0)
        return fail(r, RSP_ERROR);
    if (map_pages(e, p, r->indirect_grefs, r->nr_indirect, 0, entries, pages) < 0)
        return fail(r, RSP_ERROR);
    token = p->token;
    base = p->base;
    p->token = 0;
    rc = eng_decode_indirect(&e->cfg.limits, r, (const char *const *)pages, p->grefs,
                             p->bounds);
    for (uint32_t i = 0; i < r->nr_indirect; i++)
        if (entries[i] >= 0)
            cache_put(e, entries[i]);
    if (token)
        unmap_grants(e, base, token);
    return rc;
}

static void start(struct engine *e, int32_t index);

/* The request copied into e->request, as pending[index]: decode, map, start
 * its I/O (or answer it). */
static void take(struct engine *e, int32_t index)
{
    struct pending *p = &e->pending[index];
    struct eng_request *r = &p->req;
    e->stats.requests++;
    e->stats.in_flight++;
    p->taken_ns = round_ns(e);
    p->status = RSP_OKAY;
    p->token = 0;
    p->mapped = p->nparts = 0;
    if (eng_decode(e->cfg.abi, &e->cfg.limits, e->request, r, p->grefs, p->bounds) < 0) {
        answer_now(e, index, r->status);
        return;
    }
    switch (r->kind) {
    case OP_READ: e->stats.op_read++; break;
    case OP_WRITE: e->stats.op_write++; break;
    case OP_BARRIER: e->stats.op_barrier++; break;
    case OP_FLUSH: e->stats.op_flush++; break;
    case OP_DISCARD: e->stats.op_discard++; break;
    }
    if (r->operation == OP_INDIRECT) {
        e->stats.indirect++;
        if (read_indirect(e, p) < 0) {
            answer_now(e, index, r->status);
            return;
        }
    }
    if (r->kind == OP_DISCARD) {
        if (e->io_mode == ENG_IO_NBD)
            link_trim(e, p);
        else
            answer_now(e, index, discard(e, r));
        return;
    }
    if (r->nr_segments && prepare_transfer(e, p) < 0) {
        answer_now(e, index, RSP_ERROR);
        return;
    }
    if (r->nr_segments && e->io_mode == ENG_IO_NBD && !p->bounce_n) {
        e->bounce_waiting = index; /* consume nothing more until it has room */
        return;
    }
    start(e, index);
}

/* A decoded and mapped request's I/O started, or its barrier parked. */
static void start(struct engine *e, int32_t index)
{
    struct pending *p = &e->pending[index];
    struct eng_request *r = &p->req;
    if (r->kind == OP_BARRIER) {
        if (e->stats.in_flight > 1)
            e->barrier_waiting = index; /* consume nothing more until it ran */
        else
            run_barrier(e, index);
        return;
    }
    if (r->kind == OP_FLUSH) {
        if (__atomic_load_n(e->cfg.flush_failed, __ATOMIC_SEQ_CST)) {
            answer_now(e, index, RSP_ERROR);
            return;
        }
        if (!r->nr_segments) {
            /* Covers every write answered before it: those are done. */
            if (e->io_mode == ENG_IO_NBD) {
                link_flush(e, p);
                return;
            }
            p->outstanding = 1;
            io_queue(e, user_data(index, 0), IO_FSYNC, NULL, 0, 0);
            return;
        }
        int16_t status = sync_store(e); /* a preflush, then its data (blkback) */
        if (status != RSP_OKAY) {
            answer_now(e, index, status);
            return;
        }
    }
    submit_transfer(e, index, r->kind == OP_READ ? OP_READ : OP_WRITE);
}

/* Take again what a predecessor left in the journal, in ring order, until a
 * barrier has to wait for what is in flight: the next rounds go on from there
 * (a Python predecessor may have left two barriers, and requests taken after
 * a barrier it had started). */
static int recover(struct engine *e)
{
    struct eng_journal *j = e->cfg.journal;
    int n = 0;
    while (e->recover_at < e->recover_count && e->barrier_waiting < 0 && e->bounce_waiting < 0) {
        int32_t i = e->recover_order[e->recover_at++];
        memcpy(e->request, j->entries[i].request, e->request_size);
        e->stats.resumed++;
        take(e, i);
        n++;
    }
    e->recover = e->recover_at < e->recover_count;
    return n;
}

/* Consume what the ring holds (at most a ring's worth); -1 on an overrun. */
static int consume(struct engine *e)
{
    uint32_t prod = *e->req_prod;
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* req_prod before the requests */
    if ((uint32_t)(prod - e->rsp_prod_pvt) > e->size) {
        set_error(e, "frontend req_prod %ld overruns the ring (rsp_prod_pvt %ld, size %ld)",
                  prod, e->rsp_prod_pvt, e->size);
        return -1;
    }
    int n = 0;
    while (e->barrier_waiting < 0 && e->bounce_waiting < 0 && !e->recover && e->req_cons != prod &&
           (uint32_t)(e->req_cons - e->rsp_prod_pvt) < e->size) {
        int32_t index = e->free_head;
        e->free_head = e->pending[index].next_free;
        memcpy(e->request, e->slots + (e->req_cons & (e->size - 1)) * e->slot_size,
               e->request_size);
        journal_take(e, index);
        e->req_cons++;
        take(e, index);
        n++;
    }
    return n;
}

/* RING_FINAL_CHECK_FOR_REQUESTS: arm req_event, then look once more. */
static int final_check(struct engine *e)
{
    if (*e->req_prod != e->req_cons)
        return 1;
    *e->req_event = e->req_cons + 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* req_event before re-reading req_prod */
    return *e->req_prod != e->req_cons;
}

/* Take the pending event off the port (masking it on Xen until unmask_port). */
static int clear_port(struct engine *e)
{
    char buf[256];
    ssize_t n;
    if (e->cfg.port_kind == ENG_PORT_XEN) {
        n = read(e->cfg.port_fd, buf, sizeof buf);
        if (n > 0)
            e->masked = 1;
        return n > 0;
    }
    int got = 0;
    while ((n = recv(e->cfg.port_fd, buf, sizeof buf, MSG_DONTWAIT)) > 0)
        got = 1;
    if (n == 0 || (n < 0 && errno == ECONNRESET))
        e->channel_closed = 1;
    return got;
}

static void unmask_port(struct engine *e)
{
    if (e->masked) {
        uint32_t port = e->cfg.port;
        if (write(e->cfg.port_fd, &port, sizeof port) < 0) { /* unbound: nothing to re-arm */ }
        e->masked = 0;
    }
}

static void tick(struct engine *e)
{
    struct timespec ts;
    stale_clock(e);
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    e->now = ts.tv_sec;
    if (e->io_mode == ENG_IO_NBD)
        link_tick(e);
    if (!e->cfg.persistent)
        return;
    if (e->now >= e->next_purge) {
        cache_purge(e);
        e->next_purge = e->now + 1;
    }
    int64_t ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    if (e->full_misses && ms >= e->next_clean) {
        cache_clean(e);
        e->full_misses = 0;
        e->next_clean = ms + CLEAN_INTERVAL_MS;
    }
}

/* Start the NBD transfer parked for bounce room once it has some: 1, or 0
 * while what is in flight still holds it.  With nothing else in flight the
 * buffer is empty and holds it (RingEngine sizes it for the largest request);
 * one that still finds no room (or no memory for its iovec) fails. */
static unsigned unpark_bounce(struct engine *e)
{
    int32_t index = e->bounce_waiting;
    struct pending *p = &e->pending[index];
    bounce_prepare(e, p);
    if (!p->bounce_n && e->stats.in_flight > 1)
        return 0;
    e->bounce_waiting = -1;
    if (p->bounce_n)
        start(e, index);
    else
        answer_now(e, index, RSP_ERROR);
    return 1;
}

/* One round: the clock, consume, submit, reap, run a parked barrier, push.  Returns the
 * work done (requests taken + completions), or a negative ENG_* status. */
static int round_(struct engine *e)
{
    tick(e);
    int taken = e->recover ? recover(e) : 0;
    taken += consume(e);
    if (taken < 0)
        return ENG_RING_ERROR;
    io_submit(e);
    unsigned reaped = io_reap(e);
    if (e->bounce_waiting >= 0)
        reaped += unpark_bounce(e);
    if (e->barrier_waiting >= 0 && e->stats.in_flight == 1) {
        int32_t index = e->barrier_waiting;
        e->barrier_waiting = -1;
        run_barrier(e, index);
        reaped++;
    }
    if (push(e) < 0 || e->channel_closed) {
        set_error(e, "the frontend closed its event channel", 0, 0, 0);
        return ENG_CHANNEL_CLOSED;
    }
    return taken + (int)reaped;
}

/* Serve the ring until ``timeout_ms`` pass (ENG_OK), eng_stop is called
 * (ENG_STOPPED) or the frontend breaks the ring (ENG_RING_ERROR,
 * ENG_CHANNEL_CLOSED: eng_error says why).  Releases no GIL itself: cffi
 * calls it without the GIL. */
static int eng_run(struct engine *e, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int work = round_(e);
        if (work < 0)
            return work;
        if (e->stop)
            return ENG_STOPPED;
        if (work > 0) {
            e->spurious_streak = 0;
            if (now_ms() >= deadline)
                return ENG_OK; /* bounded: the caller's turn, even under load */
            continue;
        }
        if (e->barrier_waiting < 0 && e->bounce_waiting < 0 && final_check(e))
            continue;
        /* All done: only now may the port fire again (late EOI). */
        if (e->spurious_streak >= SPURIOUS_STREAK) {
            /* An event storm costs bounded CPU, less the longer it lasts (as
             * Linux delays a spurious event's EOI by doubling jiffies); only
             * eng_stop cuts a pause short. */
            int shift = e->spurious_streak - SPURIOUS_STREAK;
            if (shift > SPURIOUS_PAUSE_MAX_SHIFT)
                shift = SPURIOUS_PAUSE_MAX_SHIFT;
            struct pollfd stop = {e->stop_fd, POLLIN, 0};
            poll(&stop, 1, 1 << shift);
        }
        unmask_port(e);
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return ENG_OK;
        struct pollfd fds[4] = {
            {e->cfg.port_fd, POLLIN, 0}, {e->done_fd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
        int nfds = 3 + link_pollfd(e, &fds[3]);
        if (poll(fds, nfds, (int)link_sleep(e, left)) <= 0)
            continue;
        e->done_ready = fds[1].revents != 0;
        if (fds[0].revents) {
            e->stats.events++;
            clear_port(e);
            if (e->channel_closed) {
                set_error(e, "the frontend closed its event channel", 0, 0, 0);
                return ENG_CHANNEL_CLOSED;
            }
            /* An event with no new request and no completion is spurious. */
            if (*e->req_prod == e->req_cons && !fds[1].revents && !fds[3].revents) {
                e->stats.spurious_events++;
                e->spurious_streak++;
            }
        }
    }
}

/* Serve what is on the ring and wait for every request in flight, for at
 * most ``timeout_ms`` (after eng_stop: for a disconnect).  0 when idle. */
static int eng_quiesce(struct engine *e, int timeout_ms)
{
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int work = round_(e);
        if (work < 0)
            return work;
        if (!work && !e->stats.in_flight && !final_check(e))
            return 0;
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            set_error(e, "%ld requests still in flight", (long)e->stats.in_flight, 0, 0);
            return ENG_FAILED;
        }
        if (!work && e->stats.in_flight && e->io_mode == ENG_IO_NBD) {
            link_pump(e, (int)left);
        } else if (!work && e->stats.in_flight) {
            struct pollfd fd = {e->done_fd, POLLIN, 0};
            e->done_ready = poll(&fd, 1, (int)left) > 0;
        }
    }
}

static void eng_stop(struct engine *e)
{
    uint64_t one = 1;
    e->stop = 1;
    if (write(e->stop_fd, &one, sizeof one) < 0) { /* already signalled */ }
}

/* Undo eng_stop: the next eng_run serves again (the rings held, then let go). */
static void eng_restart(struct engine *e)
{
    uint64_t count;
    if (read(e->stop_fd, &count, sizeof count) < 0) { /* not signalled */ }
    e->stop = 0;
}

static void eng_free(struct engine *e)
{
    if (!e)
        return;
    if (e->stats.in_flight && e->done_fd >= 0)
        eng_quiesce(e, 30000); /* no page may be unmapped under an I/O */
    io_stop(e);
    cache_release(e);
    for (uint32_t i = 0; e->pending && i < e->size; i++) {
        free(e->pending[i].grefs);
        free(e->pending[i].bounds);
        free(e->pending[i].entries);
        free(e->pending[i].pages);
        free(e->pending[i].iov);
    }
    free(e->pending);
    free(e->bounce);
    free(e->bounce_used);
    free(e->scratch);
    free(e->fill_ref);
    free(e->fill_at);
    free(e->fill_addr);
    free(e->fill_token);
    free(e->recover_order);
    free(e->map_op);
    free(e->cache.entries);
    free(e->cache.table);
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    free(e);
}

/* A new engine for the ring at cfg->sring; NULL with ``err`` set on failure. */
static struct engine *eng_new(const struct eng_config *cfg, char *err, size_t errlen)
{
    struct engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->cfg = *cfg;
    e->done_fd = e->stop_fd = -1;
    e->barrier_waiting = e->bounce_waiting = -1;
    struct sring_layout l = sring_layout(cfg->abi == ENG_ABI_X86_32, cfg->ring_bytes);
    e->slot_size = l.slot_size, e->request_size = l.request_size;
    e->response_size = l.response_size, e->size = l.size;
    uint32_t raw = l.raw;
    struct blkif_sring_header *h = cfg->sring;
    e->req_prod = &h->req_prod, e->req_event = &h->req_event;
    e->rsp_prod = &h->rsp_prod, e->rsp_event = &h->rsp_event;
    e->slots = (char *)cfg->sring + SRING_HEADER;
    /* BACK_RING_ATTACH: pick up where the ring is. */
    e->req_cons = e->rsp_prod_pvt = e->rsp_pushed = *e->rsp_prod;
    if (raw < 1 || (uint32_t)(*e->req_prod - e->req_cons) > e->size) {
        snprintf(err, errlen, "frontend req_prod %u is beyond rsp_prod %u + ring size %u",
                 *e->req_prod, e->req_cons, e->size);
        goto out;
    }
    e->pending = calloc(e->size, sizeof *e->pending);
    if (!e->pending)
        goto nomem;
    for (uint32_t i = 0; i < e->size; i++) {
        e->pending[i].next_free = i + 1 < e->size ? (int32_t)i + 1 : -1;
        e->pending[i].owner = e;
        if (grow(&e->pending[i], MAX_DIRECT) < 0)
            goto nomem;
    }
    uint32_t most = cfg->limits.max_indirect_segments > MAX_DIRECT
                        ? cfg->limits.max_indirect_segments : MAX_DIRECT;
    e->scratch = malloc(most * sizeof *e->scratch);
    e->fill_ref = malloc(most * sizeof *e->fill_ref);
    e->fill_at = malloc(most * sizeof *e->fill_at);
    e->fill_addr = malloc(most * sizeof *e->fill_addr);
    e->fill_token = malloc(most * sizeof *e->fill_token);
    e->map_op = malloc(sizeof *e->map_op + most * sizeof e->map_op->refs[0]);
    if (!e->scratch || !e->fill_ref || !e->fill_at || !e->fill_addr || !e->fill_token ||
        !e->map_op || (cfg->persistent && cache_init(&e->cache, cfg->max_grants) < 0))
        goto nomem;
    if (cfg->bounce_pages) {
        e->bounce_used = calloc((cfg->bounce_pages + 63) / 64, sizeof *e->bounce_used);
        if (!e->bounce_used || posix_memalign((void **)&e->bounce, PAGE,
                                              (size_t)cfg->bounce_pages * PAGE))
            goto nomem;
    }
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = e->stop_fd < 0 ? -errno : io_start(e);
    if (rc < 0) {
        snprintf(err, errlen, "cannot start I/O: %s", strerror(-rc));
        goto out;
    }
    if (e->bounce && e->io_mode == ENG_IO_URING) { /* pinned once (else: as it was) */
        struct iovec all = {e->bounce, (size_t)cfg->bounce_pages * PAGE};
        e->bounce_fixed = io_uring_register_buffers(&e->ring, &all, 1) == 0;
    }
    if (cfg->journal && journal_open(e, err, errlen) < 0) {
        eng_free(e);
        return NULL;
    }
    tick(e);
    e->next_purge = e->now + 1;
    return e;
nomem:
    snprintf(err, errlen, "out of memory");
out:
    eng_free(e);
    return NULL;
}

static const struct eng_stats *eng_stats(struct engine *e) { return &e->stats; }
static const char *eng_error(struct engine *e) { return e->error; }
static const char *eng_io_note(struct engine *e) { return e->io_note; }
static int eng_io_mode(struct engine *e) { return e->io_mode; }

/* An NBD store's trouble: why its connection is down, or "" (always "" for a file). */
static const char *eng_store_error(struct engine *e)
{
    return e->io_mode == ENG_IO_NBD ? e->nbd->down : "";
}

/* Flush and close an NBD store's connection, while the engine is stopped and
 * drained (before eng_free, or before its export is changed): 0, or -1 with
 * eng_error saying what the last writes may have lost.  eng_nbd_reopen
 * connects again. */
static int eng_nbd_close(struct engine *e)
{
    return e->io_mode == ENG_IO_NBD ? link_close(e) : 0;
}

/* Connect an NBD store again, taking the export's size as it is (its image
 * was grown on purpose); only while the engine is stopped.  0, or -1 with
 * eng_store_error saying why (the rounds keep trying). */
static int eng_nbd_reopen(struct engine *e)
{
    if (e->io_mode != ENG_IO_NBD)
        return 0;
    e->nbd->adopt = 1;
    link_connect_wait(e, CONNECT_MS);
    return e->nbd->state == LINK_UP ? 0 : -1;
}

/* Online resize, from another thread: requests are checked against the new
 * size from the next one decoded (an aligned 64-bit store: no torn value). */
static void eng_set_sectors(struct engine *e, uint64_t sectors)
{
    __atomic_store_n(&e->cfg.limits.sectors, sectors, __ATOMIC_RELEASE);
}
