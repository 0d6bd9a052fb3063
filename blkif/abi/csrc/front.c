/* The frontend's queue in C (Linux: xen-blkfront.c blkif_queue_rw_req and
 * blkif_interrupt), for a guest that keeps many transfers in flight.
 *
 * Compiled into blkif.abi._ffi after the ABI structs of _cdefs/blkif.py; the
 * Python side is blkif/frontend/fastpath.py.  blkif/frontend/queue.py stays
 * the readable reference and this file follows it step for step:
 *
 *   fq_put    one request, built as FrontQueue._put builds it: the next free
 *             id (a FIFO), the top pages of the free stack (lowest first),
 *             a write's data copied in, direct descriptors in the slot or,
 *             past 11 pages, indirect ones in the slot's own granted pages;
 *   fq_push   RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then the notify;
 *   fq_take   responses consumed as FrontQueue.complete consumes them, with
 *             its checks (rsp_prod overrun, unknown id, wrong operation), a
 *             read's data copied out, pages and id freed, rsp_event armed;
 *   fq_run    a whole pattern of transfers (blkif bench's guest side) over
 *             one or more queues, without the GIL: what fio does in a Linux
 *             guest over blkfront.
 *
 * tests/test_front_fastpath.py proves fq_put/fq_take write and accept exactly
 * what the Python queue does.  Nothing is allocated after fq_new.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "sring.h"

#define FQ_OK 0
#define FQ_FULL 1
#define FQ_RING_ERROR (-1)
#define FQ_CHANNEL_CLOSED (-2)
#define FQ_IO_ERROR (-3)
#define FQ_TIMEOUT (-4)
#define FQ_INVALID (-5)

#define FQ_ABI_X86_64 0
#define FQ_ABI_X86_32 1
#define FQ_PORT_XEN 0
#define FQ_PORT_SOCKET 1

#define FQ_OP_READ 0
#define FQ_OP_WRITE 1
#define FQ_OP_BARRIER 2
#define FQ_OP_FLUSH 3
#define FQ_OP_DISCARD 5
#define FQ_OP_INDIRECT 6
#define FQ_PAGE 4096
#define FQ_SECTOR 512
#define FQ_MAX_DIRECT 11
#define FQ_SEGS_PER_PAGE 512
#define FQ_MAX_INDIRECT_PAGES 8
#define FQ_MAX_QUEUES 16
#define FQ_TAKE_BATCH 64

/* struct fq_config, fq_done, fq_job, fq_result and fq_transfer are declared in
 * _cdefs/front.py (TYPES), once for cffi and for this file. */

struct fq_shadow {           /* blkfront's blk_shadow */
    uint64_t tag;
    char *dest;              /* where a read's data goes; NULL: nowhere */
    uint32_t length, npages;
    uint8_t op, busy;
};

struct fq {
    struct fq_config cfg;
    volatile uint32_t *req_prod, *req_event, *rsp_prod, *rsp_event;
    char *slots;
    uint32_t size, slot_size, response_size;
    uint32_t req_prod_pvt, rsp_cons;
    uint32_t *free_pages, nfree;     /* a stack, its top at nfree - 1 */
    uint32_t *pages;                 /* per slot: the pool pages of its request */
    uint32_t *free_ids, id_head, nids; /* a FIFO of ids */
    struct fq_shadow *shadow;
    uint64_t notifies;
    char error[200];
};

static int64_t fq_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int fq_fail(struct fq *q, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->error, sizeof q->error, fmt, ap);
    va_end(ap);
    return rc;
}

/* -- building requests ----------------------------------------------------- */

static void fq_descriptor(char *at, uint32_t gref, uint8_t last_sect)
{
    struct blkif_request_segment d;
    memset(&d, 0, sizeof d);
    d.gref = gref, d.first_sect = 0, d.last_sect = last_sect;
    memcpy(at, &d, sizeof d);
}

/* Descriptors for the request's pages into ``at``: whole pages, the last
 * one ending at ``tail`` (request.py's pack_pages). */
static void fq_descriptors(struct fq *q, char *at, const uint32_t *pages, uint32_t n,
                           uint8_t tail)
{
    for (uint32_t i = 0; i < n; i++)
        fq_descriptor(at + i * sizeof(struct blkif_request_segment),
                      q->cfg.pool_refs[pages[i]], i + 1 == n ? tail : FQ_PAGE / FQ_SECTOR - 1);
}

static void fq_rw(struct fq *q, char *slot, uint8_t op, uint32_t id, uint64_t sector,
                  const uint32_t *pages, uint32_t n, uint8_t tail)
{
    if (q->cfg.abi == FQ_ABI_X86_32) {
        struct blkif_x86_32_request *r = (void *)slot;
        r->operation = op, r->nr_segments = n, r->handle = 0, r->id = id;
        r->sector_number = sector;
        fq_descriptors(q, (char *)r->seg, pages, n, tail);
    } else {
        struct blkif_x86_64_request *r = (void *)slot;
        r->operation = op, r->nr_segments = n, r->handle = 0, r->id = id;
        r->sector_number = sector;
        fq_descriptors(q, (char *)r->seg, pages, n, tail);
    }
}

static void fq_indirect(struct fq *q, char *slot, uint8_t op, uint32_t id, uint64_t sector,
                        const uint32_t *pages, uint32_t n, uint8_t tail)
{
    fq_descriptors(q, q->cfg.ind_pool + (size_t)id * q->cfg.ind_pages * FQ_PAGE, pages, n,
                   tail);
    uint32_t used = (n + FQ_SEGS_PER_PAGE - 1) / FQ_SEGS_PER_PAGE;
    const uint32_t *refs = q->cfg.ind_refs + (size_t)id * q->cfg.ind_pages;
    if (q->cfg.abi == FQ_ABI_X86_32) {
        struct blkif_x86_32_request_indirect *r = (void *)slot;
        r->operation = FQ_OP_INDIRECT, r->indirect_op = op, r->nr_segments = n;
        r->id = id, r->sector_number = sector, r->handle = 0;
        for (uint32_t i = 0; i < used; i++)
            r->indirect_grefs[i] = refs[i];
    } else {
        struct blkif_x86_64_request_indirect *r = (void *)slot;
        r->operation = FQ_OP_INDIRECT, r->indirect_op = op, r->nr_segments = n;
        r->id = id, r->sector_number = sector, r->handle = 0;
        for (uint32_t i = 0; i < used; i++)
            r->indirect_grefs[i] = refs[i];
    }
}

static void fq_discard(struct fq *q, char *slot, uint32_t id, uint64_t sector,
                       uint64_t nr_sectors)
{
    if (q->cfg.abi == FQ_ABI_X86_32) {
        struct blkif_x86_32_request_discard *r = (void *)slot;
        r->operation = FQ_OP_DISCARD, r->flag = 0, r->handle = 0, r->id = id;
        r->sector_number = sector, r->nr_sectors = nr_sectors;
    } else {
        struct blkif_x86_64_request_discard *r = (void *)slot;
        r->operation = FQ_OP_DISCARD, r->flag = 0, r->handle = 0, r->id = id;
        r->sector_number = sector, r->nr_sectors = nr_sectors;
    }
}

/* One request of ``length`` bytes at byte ``offset`` (FrontQueue._put).  A
 * write's bytes come from ``data``; a read's land in ``dest`` (if not NULL)
 * when it is taken.  FQ_FULL: no slot or not enough free pages now. */
static int fq_put(struct fq *q, uint64_t tag, uint8_t op, uint64_t offset, uint64_t length,
                  const char *data, char *dest)
{
    int transfer = op == FQ_OP_READ || op == FQ_OP_WRITE;
    if (!transfer && op != FQ_OP_DISCARD && op != FQ_OP_BARRIER && op != FQ_OP_FLUSH)
        return fq_fail(q, FQ_INVALID, "operation %u is not one a frontend sends", op);
    if ((transfer && !length) || (!transfer && op != FQ_OP_DISCARD && length))
        return fq_fail(q, FQ_INVALID, "operation %u of %llu bytes", op,
                       (unsigned long long)length);
    uint32_t npages = op == FQ_OP_DISCARD ? 0 : (uint32_t)((length + FQ_PAGE - 1) / FQ_PAGE);
    if (offset % FQ_SECTOR || length % FQ_SECTOR ||
        (op != FQ_OP_DISCARD && length > (uint64_t)q->cfg.segments * FQ_PAGE))
        return fq_fail(q, FQ_INVALID, "a request of %llu bytes at %llu does not fit (%u "
                       "segments per request)", (unsigned long long)length,
                       (unsigned long long)offset, q->cfg.segments);
    if (q->size - (q->req_prod_pvt - q->rsp_cons) == 0 || !q->nids || npages > q->nfree)
        return FQ_FULL;
    uint32_t id = q->free_ids[q->id_head];
    q->id_head = (q->id_head + 1) % q->size;
    q->nids--;
    uint32_t *pages = q->pages + (size_t)id * q->cfg.segments;
    for (uint32_t k = 0; k < npages; k++)
        pages[k] = q->free_pages[q->nfree - 1 - k];
    q->nfree -= npages;
    if (data)
        for (uint32_t k = 0; k < npages; k++) {
            uint64_t n = length - (uint64_t)k * FQ_PAGE;
            memcpy(q->cfg.pool + (size_t)pages[k] * FQ_PAGE, data + (size_t)k * FQ_PAGE,
                   n < FQ_PAGE ? n : FQ_PAGE);
        }
    struct fq_shadow *sh = &q->shadow[id];
    sh->tag = tag, sh->dest = dest, sh->length = (uint32_t)length, sh->npages = npages;
    sh->op = op, sh->busy = 1;
    char *slot = q->slots + (q->req_prod_pvt & (q->size - 1)) * q->slot_size;
    uint64_t sector = offset / FQ_SECTOR;
    uint8_t tail = npages ? (uint8_t)((length - (uint64_t)(npages - 1) * FQ_PAGE) / FQ_SECTOR - 1)
                          : 0;
    if (op == FQ_OP_DISCARD)
        fq_discard(q, slot, id, sector, length / FQ_SECTOR);
    else if (q->cfg.ind_pages && (op == FQ_OP_READ || op == FQ_OP_WRITE) &&
             npages > FQ_MAX_DIRECT)
        fq_indirect(q, slot, op, id, sector, pages, npages, tail);
    else
        fq_rw(q, slot, op, id, sector, pages, npages, tail);
    q->req_prod_pvt++;
    return FQ_OK;
}

/* -- the event channel ----------------------------------------------------- */

static int fq_notify(struct fq *q)
{
    q->notifies++;
    if (q->cfg.port_kind == FQ_PORT_XEN) {
        struct ioctl_evtchn_notify op = {q->cfg.port};
        ioctl(q->cfg.port_fd, IOCTL_EVTCHN_NOTIFY, &op);
        return FQ_OK;
    }
    if (send(q->cfg.port_fd, "\1", 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
        errno != EAGAIN && errno != EWOULDBLOCK)
        return fq_fail(q, FQ_CHANNEL_CLOSED, "event channel port %u: the backend closed "
                       "its end (%s)", q->cfg.port, strerror(errno));
    return FQ_OK;
}

/* Take what is pending on the port (SimPort.clear / XenPort.clear). */
static int fq_clear(struct fq *q)
{
    char buf[256];
    ssize_t n;
    if (q->cfg.port_kind == FQ_PORT_XEN) {
        if (read(q->cfg.port_fd, buf, sizeof buf) > 0) {
            uint32_t port = q->cfg.port;
            if (write(q->cfg.port_fd, &port, sizeof port) < 0) { /* unbound: nothing to re-arm */ }
        }
        return FQ_OK;
    }
    while ((n = recv(q->cfg.port_fd, buf, sizeof buf, MSG_DONTWAIT)) > 0)
        ;
    if (n == 0 || (n < 0 && errno == ECONNRESET))
        return fq_fail(q, FQ_CHANNEL_CLOSED, "event channel port %u: the backend closed "
                       "its end", q->cfg.port);
    return FQ_OK;
}

static int fq_push(struct fq *q)
{
    uint32_t old = *q->req_prod, new = q->req_prod_pvt;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* requests before req_prod */
    *q->req_prod = new;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* req_prod before reading req_event */
    if ((uint32_t)(new - *q->req_event) < (uint32_t)(new - old))
        return fq_notify(q);
    return FQ_OK;
}

/* -- taking responses ------------------------------------------------------ */

static void fq_finish(struct fq *q, uint32_t id)
{
    struct fq_shadow *sh = &q->shadow[id];
    uint32_t *pages = q->pages + (size_t)id * q->cfg.segments;
    if (sh->op == FQ_OP_READ && sh->dest)
        for (uint32_t k = 0; k < sh->npages; k++) {
            uint32_t n = sh->length - k * FQ_PAGE;
            memcpy(sh->dest + (size_t)k * FQ_PAGE, q->cfg.pool + (size_t)pages[k] * FQ_PAGE,
                   n < FQ_PAGE ? n : FQ_PAGE);
        }
    for (uint32_t k = sh->npages; k-- > 0;)
        q->free_pages[q->nfree++] = pages[k];
    q->free_ids[(q->id_head + q->nids) % q->size] = id;
    q->nids++;
    sh->busy = 0;
}

/* Up to ``max`` responses into ``out`` (FrontQueue.complete); the count, or
 * FQ_RING_ERROR for a response the backend had no business writing. */
static int fq_take(struct fq *q, struct fq_done *out, unsigned max)
{
    unsigned n = 0;
    while (n < max) {
        uint32_t prod = *q->rsp_prod;
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* rsp_prod before the responses */
        if ((uint32_t)(prod - q->rsp_cons) > q->size)
            return fq_fail(q, FQ_RING_ERROR, "backend rsp_prod %u is %u ahead of "
                           "rsp_cons %u (ring of %u)", prod, (uint32_t)(prod - q->rsp_cons),
                           q->rsp_cons, q->size);
        if (prod == q->rsp_cons) {
            *q->rsp_event = q->rsp_cons + 1; /* RING_FINAL_CHECK_FOR_RESPONSES */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (*q->rsp_prod == q->rsp_cons)
                break;
            continue;
        }
        char rsp[16];
        memcpy(rsp, q->slots + (q->rsp_cons & (q->size - 1)) * q->slot_size, q->response_size);
        q->rsp_cons++;
        uint64_t id;
        uint8_t op;
        int16_t status;
        if (q->cfg.abi == FQ_ABI_X86_32) {
            struct blkif_x86_32_response *r = (void *)rsp;
            id = r->id, op = r->operation, status = r->status;
        } else {
            struct blkif_x86_64_response *r = (void *)rsp;
            id = r->id, op = r->operation, status = r->status;
        }
        if (id >= q->size || !q->shadow[id].busy)
            return fq_fail(q, FQ_RING_ERROR, "response for unknown request id %llu",
                           (unsigned long long)id);
        if (op != q->shadow[id].op)
            return fq_fail(q, FQ_RING_ERROR, "response for request id %llu has operation "
                           "%u, not %u", (unsigned long long)id, op, q->shadow[id].op);
        out[n].tag = q->shadow[id].tag;
        out[n].status = status;
        n++;
        fq_finish(q, (uint32_t)id);
    }
    return (int)n;
}

/* -- life ------------------------------------------------------------------ */

static void fq_free(struct fq *q)
{
    if (!q)
        return;
    free(q->free_pages);
    free(q->pages);
    free(q->free_ids);
    free(q->shadow);
    free(q);
}

/* A queue over a ring in use at cfg->req_prod_pvt / rsp_cons with nothing in
 * flight: every id and pool page free, in FrontQueue's initial order. */
static struct fq *fq_new(const struct fq_config *cfg, char *err, size_t errlen)
{
    struct fq *q = calloc(1, sizeof *q);
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    q->cfg = *cfg;
    struct sring_layout l = sring_layout(cfg->abi == FQ_ABI_X86_32, cfg->ring_bytes);
    q->slot_size = l.slot_size, q->response_size = l.response_size, q->size = l.size;
    uint32_t max_segs = cfg->ind_pages ? cfg->ind_pages * FQ_SEGS_PER_PAGE : FQ_MAX_DIRECT;
    if (!l.size || !cfg->segments || cfg->segments > max_segs ||
        cfg->ind_pages > FQ_MAX_INDIRECT_PAGES || cfg->pool_pages < cfg->segments) {
        snprintf(err, errlen, "bad queue: %u-byte ring, %u segments, %u indirect pages, "
                 "%u pool pages", (unsigned)cfg->ring_bytes, cfg->segments, cfg->ind_pages,
                 cfg->pool_pages);
        free(q);
        return NULL;
    }
    struct blkif_sring_header *h = cfg->sring;
    q->req_prod = &h->req_prod, q->req_event = &h->req_event;
    q->rsp_prod = &h->rsp_prod, q->rsp_event = &h->rsp_event;
    q->slots = (char *)cfg->sring + SRING_HEADER;
    q->req_prod_pvt = cfg->req_prod_pvt, q->rsp_cons = cfg->rsp_cons;
    q->free_pages = calloc(cfg->pool_pages, sizeof *q->free_pages);
    q->pages = calloc((size_t)q->size * cfg->segments, sizeof *q->pages);
    q->free_ids = calloc(q->size, sizeof *q->free_ids);
    q->shadow = calloc(q->size, sizeof *q->shadow);
    if (!q->free_pages || !q->pages || !q->free_ids || !q->shadow) {
        snprintf(err, errlen, "out of memory");
        fq_free(q);
        return NULL;
    }
    for (uint32_t i = 0; i < cfg->pool_pages; i++)
        q->free_pages[i] = cfg->pool_pages - 1 - i; /* page 0 on top */
    q->nfree = cfg->pool_pages;
    for (uint32_t i = 0; i < q->size; i++)
        q->free_ids[i] = i;
    q->nids = q->size;
    return q;
}

static uint32_t fq_req_prod_pvt(struct fq *q) { return q->req_prod_pvt; }
static uint32_t fq_rsp_cons(struct fq *q) { return q->rsp_cons; }
static uint32_t fq_in_flight(struct fq *q) { return q->size - q->nids; }
static uint64_t fq_notifies(struct fq *q) { return q->notifies; }
static const char *fq_error(struct fq *q) { return q->error; }

/* -- a pattern of transfers (blkif bench's guest side) ---------------------- */

static uint64_t fq_random(uint64_t *state) /* xorshift64* */
{
    uint64_t x = *state;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    *state = x;
    return x * 2685821657736338717ull;
}

/* The queue with the fewest transfers, looking from the one after the last
 * chosen (BlockDevice._pick_queue). */
static uint32_t fq_pick(uint32_t nq, const uint32_t *busy, uint32_t *next)
{
    uint32_t best = *next % nq;
    for (uint32_t k = 1; k < nq; k++) {
        uint32_t i = (*next + k) % nq;
        if (busy[i] < busy[best])
            best = i;
    }
    *next = (*next + 1) % nq;
    return best;
}

static int fq_wait(struct fq **qs, uint32_t nq, int timeout_ms)
{
    struct pollfd fds[FQ_MAX_QUEUES];
    for (uint32_t i = 0; i < nq; i++)
        fds[i].fd = qs[i]->cfg.port_fd, fds[i].events = POLLIN, fds[i].revents = 0;
    if (poll(fds, nq, timeout_ms) < 0 && errno != EINTR)
        return fq_fail(qs[0], FQ_CHANNEL_CLOSED, "poll on the event channels: %s",
                       strerror(errno));
    for (uint32_t i = 0; i < nq; i++)
        if (fds[i].revents) {
            int rc = fq_clear(qs[i]);
            if (rc < 0) {
                if (i)
                    memcpy(qs[0]->error, qs[i]->error, sizeof qs[0]->error);
                return rc;
            }
        }
    return FQ_OK;
}

/* Keep job->depth transfers of job->block_size in flight over ``qs`` for
 * job->duration_ns, then until all are answered; each transfer's latency
 * (submission to completion) goes into job->latency_ns.  The queues must be
 * idle and share one segments limit.  Errors: FQ_IO_ERROR (a transfer was
 * answered with an error), FQ_TIMEOUT (none
 * finished for job->timeout_ns), FQ_RING_ERROR, FQ_CHANNEL_CLOSED,
 * FQ_INVALID; the message is fq_error(qs[0]). */
static int fq_run(struct fq **qs, uint32_t nq, const struct fq_job *job,
                  struct fq_transfer *t, struct fq_result *res)
{
    struct fq_done done[FQ_TAKE_BATCH];
    uint32_t busy[FQ_MAX_QUEUES] = {0}, next_queue = 0, in_flight = 0;
    memset(res, 0, sizeof *res);
    if (!nq || nq > FQ_MAX_QUEUES)
        return FQ_INVALID; /* no queue to say it on: fq_run's wrapper checks first */
    for (uint32_t i = 0; i < nq; i++)
        if (qs[i]->nids != qs[i]->size || qs[i]->cfg.segments != qs[0]->cfg.segments)
            return fq_fail(qs[0], FQ_INVALID, "queue %u is busy or unlike the first", i);
    if (!job->block_size || job->block_size % FQ_SECTOR || !job->depth ||
        job->disk_bytes < job->block_size ||
        (job->op != FQ_OP_READ && job->op != FQ_OP_WRITE))
        return fq_fail(qs[0], FQ_INVALID, "nothing to run: blocks of %llu bytes on %llu, "
                       "depth %u, operation %u", (unsigned long long)job->block_size,
                       (unsigned long long)job->disk_bytes, job->depth, job->op);
    uint64_t chunk = (uint64_t)qs[0]->cfg.segments * FQ_PAGE;
    uint64_t blocks = job->disk_bytes / job->block_size, seq = 0, rng = job->seed | 1;
    uint32_t parts = (uint32_t)((job->block_size + chunk - 1) / chunk);
    for (uint32_t i = 0; i < job->depth; i++)
        t[i].active = 0;
    int64_t start = fq_now_ns(), end = start + job->duration_ns, last_done = start;
    for (;;) {
        int64_t now = fq_now_ns();
        for (uint32_t i = 0; i < job->depth && now < end; i++) {
            struct fq_transfer *x = &t[i];
            if (x->active)
                continue;
            uint64_t block = job->random ? fq_random(&rng) % blocks : seq++ % blocks;
            x->offset = block * job->block_size, x->started = fq_now_ns();
            x->queue = fq_pick(nq, busy, &next_queue);
            x->parts = parts, x->put = x->done = 0, x->status = 0, x->active = 1;
            busy[x->queue]++;
            in_flight++;
        }
        /* Parts onto the rings; then one push per queue. */
        for (uint32_t ti = 0; ti < job->depth; ti++) {
            struct fq_transfer *x = &t[ti];
            while (x->active && x->put < x->parts) {
                uint64_t at = x->put * chunk;
                uint64_t n = job->block_size - at < chunk ? job->block_size - at : chunk;
                int rc = fq_put(qs[x->queue], ti, job->op, x->offset + at, n,
                                job->op == FQ_OP_WRITE ? job->data + at : NULL,
                                job->op == FQ_OP_READ ? job->scratch +
                                    (size_t)ti * job->block_size + at : NULL);
                if (rc == FQ_FULL)
                    break;
                if (rc < 0) {
                    if (x->queue)
                        memcpy(qs[0]->error, qs[x->queue]->error, sizeof qs[0]->error);
                    return rc;
                }
                x->put++;
            }
        }
        for (uint32_t i = 0; i < nq; i++) {
            int rc = fq_push(qs[i]);
            if (rc < 0) {
                if (i)
                    memcpy(qs[0]->error, qs[i]->error, sizeof qs[0]->error);
                return rc;
            }
        }
        if (!in_flight)
            break;
        uint32_t finished = 0, took = 0;
        for (uint32_t i = 0; i < nq; i++) {
            int n;
            while ((n = fq_take(qs[i], done, FQ_TAKE_BATCH)) > 0) {
                now = fq_now_ns();
                took += n;
                for (int k = 0; k < n; k++) {
                    if (done[k].tag >= job->depth)
                        return fq_fail(qs[0], FQ_RING_ERROR, "an answer for transfer %llu, "
                                       "not one of ours", (unsigned long long)done[k].tag);
                    struct fq_transfer *x = &t[done[k].tag];
                    if (done[k].status)
                        x->status = done[k].status;
                    if (++x->done < x->parts)
                        continue;
                    if (x->status)
                        return fq_fail(qs[0], FQ_IO_ERROR, "transfer at %llu answered "
                                       "with status %d", (unsigned long long)x->offset,
                                       x->status);
                    if (res->ios < job->latency_cap)
                        job->latency_ns[res->ios] = (uint64_t)(now - x->started);
                    res->ios++;
                    x->active = 0;
                    busy[x->queue]--;
                    in_flight--;
                    finished++;
                }
            }
            if (n < 0) {
                if (i)
                    memcpy(qs[0]->error, qs[i]->error, sizeof qs[0]->error);
                return n;
            }
        }
        now = fq_now_ns();
        if (finished)
            last_done = now;
        if (took)
            continue; /* freed slots and pages: more parts may go out */
        if (now - last_done > job->timeout_ns)
            return fq_fail(qs[0], FQ_TIMEOUT, "no transfer finished for %lld ms "
                           "(%u in flight)", (long long)(now - last_done) / 1000000, in_flight);
        int rc = fq_wait(qs, nq, 100);
        if (rc < 0)
            return rc;
    }
    res->elapsed_ns = fq_now_ns() - start;
    return FQ_OK;
}
