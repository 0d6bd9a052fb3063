/* The engine's I/O on an NBD export, through libnbd's C API (included by engine.c).
 *
 * A VBD whose store is an NBD export (an image behind its qemu-storage-daemon,
 * or a remote server) gives the engine cfg.nbd_uri instead of a descriptor.
 * The engine then keeps the VBD's one connection to it (Python's NbdStore
 * closes its own meanwhile: a server may take one client only), with every
 * command in flight at once:
 *
 *   transfer  one NBD command, on the ring's bounce buffer (which holds the
 *             largest request: a transfer waits there for room, engine.c);
 *   FLUSH     NBD FLUSH, which covers every write answered before it; none
 *             at all where the server has no write cache (no can_flush);
 *   DISCARD   NBD TRIM;
 *   BARRIER   as for files (engine.c, run_barrier), each step waited for.
 *
 * libnbd calls a command's completion callback from within nbd_aio_notify_*
 * with its handle locked, so the callback only accounts the command; the
 * requests it finishes wait on a list for the round to answer (link_reap).
 *
 * A connection that dies fails what is in flight (libnbd completes those
 * commands with an error), and every request while it is down.  The round
 * connects again with a back-off without blocking: the handshake is polled
 * with the ring.  A server that comes back with another size is refused.  If
 * writes were answered that no FLUSH had covered when it died, the next FLUSH
 * fails: they may be lost, and the guest must hear it.  eng_store_error says
 * why the store is down (Python reports it); the rules are NbdStore's
 * (blkif/backend/nbd_store.py), the reference. */
#include <libnbd.h>

#define LINK_UP 0
#define LINK_CONNECTING 1
#define LINK_DOWN 2
#define CONNECT_MS 2000       /* NbdStore.CONNECT_TIMEOUT */
#define FIRST_RETRY_MS 200    /* nbd_ring.FIRST_RETRY, MAX_RETRY */
#define MAX_RETRY_MS 5000
#define WAIT_MS 30000         /* a step of a barrier, waited for in the round */
#define SYNC_PENDING 1        /* link.sync_result while its command is out */
#define IO_TRIM 16       /* beside OP_READ, OP_WRITE and IO_FSYNC */

struct nbd_link {
    struct nbd_handle *h;
    int state;
    int can_flush, can_trim;
    int adopt;                /* the next connection's size is taken as it is */
    uint64_t size;            /* the export's bytes: another size is refused */
    int64_t deadline_ms, retry_at_ms, retry_ms;
    uint64_t writes_done;     /* writes answered OK */
    uint64_t writes_flushed;  /* how many of them a FLUSH answered OK covers */
    int lost_writes;          /* the next FLUSH fails: see link_lost */
    int sync_result;          /* a waited-for command: SYNC_PENDING, then its errno */
    int32_t finished;         /* requests whose commands all completed, through next_free */
    char down[224];           /* why it is not up; "" when it is */
};

static void finish(struct engine *e, int32_t index);

static const char *nbd_reason(const char *fallback)
{
    const char *msg = nbd_get_error();
    return msg && *msg ? msg : fallback;
}

/* Down, with ``why``: connect again after a back-off.  What an outage is
 * reported as is its first cause; the tries after it do not replace that
 * (NbdStore.down keeps it the same way). */
static void link_fail(struct engine *e, const char *why)
{
    struct nbd_link *n = e->nbd;
    if (!n->down[0])
        snprintf(n->down, sizeof n->down, "%s", why);
    n->state = LINK_DOWN;
    n->retry_at_ms = now_ms() + n->retry_ms;
    n->retry_ms = n->retry_ms * 2 < MAX_RETRY_MS ? n->retry_ms * 2 : MAX_RETRY_MS;
}

/* The connection died.  Writes the server answered but no FLUSH covered may
 * have died with it (a daemon's caches, a crashed host): the next FLUSH fails. */
static void link_lost(struct engine *e, const char *why)
{
    struct nbd_link *n = e->nbd;
    char text[sizeof n->down];
    snprintf(text, sizeof text, "lost the connection to %s: %s", e->cfg.nbd_name, why);
    if (n->can_flush && n->writes_done > n->writes_flushed)
        n->lost_writes = 1;
    n->retry_ms = FIRST_RETRY_MS;
    link_fail(e, text);
}

/* A connection that finished its handshake: up, unless it has another size. */
static void link_ready(struct engine *e)
{
    struct nbd_link *n = e->nbd;
    int64_t size = nbd_get_size(n->h);
    char text[sizeof n->down];
    if (size < 0) {
        snprintf(text, sizeof text, "cannot connect to %s: %s", e->cfg.nbd_name,
                 nbd_reason("no size"));
        link_fail(e, text);
        return;
    }
    if ((uint64_t)size != n->size && !n->adopt) {
        snprintf(text, sizeof text, "%s came back with %lld bytes instead of %llu; refusing it",
                 e->cfg.nbd_name, (long long)size, (unsigned long long)n->size);
        link_fail(e, text);
        return;
    }
    n->size = (uint64_t)size;
    n->adopt = 0;
    n->can_flush = nbd_can_flush(n->h) > 0;
    n->can_trim = nbd_can_trim(n->h) > 0;
    n->state = LINK_UP;
    n->retry_ms = FIRST_RETRY_MS;
    n->down[0] = 0;
}

/* Where the connection stands after libnbd ran: ready, dead or timed out. */
static void link_check(struct engine *e, const char *why)
{
    struct nbd_link *n = e->nbd;
    char text[sizeof n->down];
    if (n->state == LINK_DOWN)
        return;
    int dead = nbd_aio_is_dead(n->h) || nbd_aio_is_closed(n->h);
    if (n->state == LINK_UP) {
        if (dead)
            link_lost(e, why ? why : "the server closed the connection");
        return;
    }
    if (nbd_aio_is_ready(n->h)) {
        link_ready(e);
    } else if (dead || now_ms() >= n->deadline_ms) {
        snprintf(text, sizeof text, "cannot connect to %s: %s", e->cfg.nbd_name,
                 dead ? (why ? why : "the handshake failed") : "timed out");
        link_fail(e, text);
    }
}

/* Let libnbd read or write what poll says it can, waiting at most timeout_ms. */
static void link_pump(struct engine *e, int timeout_ms)
{
    struct nbd_link *n = e->nbd;
    if (n->state == LINK_DOWN)
        return;
    unsigned dir = nbd_aio_get_direction(n->h);
    struct pollfd fd = {nbd_aio_get_fd(n->h),
                        (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                            (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0), 0};
    const char *why = NULL;
    if (fd.fd >= 0 && poll(&fd, 1, timeout_ms) > 0) {
        int rc = 0;
        if (dir & LIBNBD_AIO_DIRECTION_READ && fd.revents & (POLLIN | POLLHUP | POLLERR))
            rc = nbd_aio_notify_read(n->h);
        else if (dir & LIBNBD_AIO_DIRECTION_WRITE && fd.revents & (POLLOUT | POLLHUP | POLLERR))
            rc = nbd_aio_notify_write(n->h);
        if (rc < 0)
            why = nbd_reason(NULL);
    }
    link_check(e, why);
}

/* Close the handle.  nbd_close would drop commands still in flight without
 * their callbacks, so the connection is cut first: libnbd fails each of them
 * through link_done, and the next round answers those requests. */
static void link_drop(struct engine *e)
{
    struct nbd_link *n = e->nbd;
    if (!n->h)
        return;
    if (nbd_aio_in_flight(n->h) > 0 && nbd_aio_get_fd(n->h) >= 0) {
        shutdown(nbd_aio_get_fd(n->h), SHUT_RDWR);
        nbd_aio_notify_read(n->h);
    }
    nbd_close(n->h);
    n->h = NULL;
}

/* Start connecting; with wait_ms, wait that long for the handshake. */
static void link_connect(struct engine *e, int wait_ms)
{
    struct nbd_link *n = e->nbd;
    char text[sizeof n->down];
    link_drop(e);
    n->h = nbd_create();
    if (n->h)
        nbd_set_pread_initialize(n->h, false); /* every read fills its buffer or fails */
    if (!n->h || nbd_aio_connect_uri(n->h, e->cfg.nbd_uri) < 0) {
        snprintf(text, sizeof text, "cannot connect to %s: %s", e->cfg.nbd_name,
                 nbd_reason("out of memory"));
        link_fail(e, text);
        return;
    }
    n->state = LINK_CONNECTING;
    n->deadline_ms = now_ms() + (wait_ms ? wait_ms : CONNECT_MS);
    while (wait_ms && n->state == LINK_CONNECTING)
        link_pump(e, (int)(n->deadline_ms - now_ms() > 0 ? n->deadline_ms - now_ms() : 0));
}

/* Connect, trying again for up to wait_ms: a server that takes one client may
 * not have seen the connection closed before this one go yet. */
static void link_connect_wait(struct engine *e, int wait_ms)
{
    int64_t deadline = now_ms() + wait_ms;
    for (;;) {
        link_connect(e, wait_ms);
        int64_t left = deadline - now_ms();
        if (e->nbd->state == LINK_UP || left <= 0)
            return;
        struct timespec pause = {0, (left < 50 ? left : 50) * 1000000L};
        nanosleep(&pause, NULL);
        wait_ms = (int)(deadline - now_ms() > 1 ? deadline - now_ms() : 1);
    }
}

/* The round's clock: a connection in its handshake moves on; one down is tried again. */
static void link_tick(struct engine *e)
{
    struct nbd_link *n = e->nbd;
    if (n->state == LINK_CONNECTING)
        link_pump(e, 0);
    else if (n->state == LINK_DOWN && now_ms() >= n->retry_at_ms)
        link_connect(e, 0);
}

/* A command completed (from libnbd, its handle locked): account it. */
static int link_done(void *user_data, int *error)
{
    struct pending *p = user_data;
    struct engine *e = p->owner;
    struct eng_request *r = &p->req;
    if (*error) {
        if (p->status == RSP_OKAY)
            p->status = *error == EOPNOTSUPP ? RSP_EOPNOTSUPP : RSP_ERROR;
        e->stats.last_io_errno = *error;
    } else if (r->kind == OP_FLUSH && !r->nr_segments) {
        if (e->nbd->writes_flushed < p->covers)
            e->nbd->writes_flushed = p->covers;
    } else if (r->kind != OP_READ && r->kind != OP_DISCARD) {
        e->nbd->writes_done++;
    }
    if (!--p->outstanding) {
        p->next_free = e->nbd->finished;
        e->nbd->finished = (int32_t)(p - e->pending);
    }
    return 1; /* retired */
}

static int64_t link_issue(struct nbd_link *n, int op, void *buf, uint64_t len, uint64_t offset,
                          nbd_completion_callback cb)
{
    switch (op) {
    case OP_READ: return nbd_aio_pread(n->h, buf, len, offset, cb, 0);
    case OP_WRITE: return nbd_aio_pwrite(n->h, buf, len, offset, cb, 0);
    case IO_FSYNC: return nbd_aio_flush(n->h, cb, 0);
    case IO_TRIM: return nbd_aio_trim(n->h, len, offset, cb, 0);
    }
    return -1;
}

/* One command of request p (p->outstanding counts it already). */
static void link_queue(struct engine *e, struct pending *p, int op, void *buf, uint64_t len,
                       uint64_t offset)
{
    struct nbd_link *n = e->nbd;
    int err = ENOTCONN;
    if (n->state == LINK_UP) {
        nbd_completion_callback cb = {.callback = link_done, .user_data = p};
        if (link_issue(n, op, buf, len, offset, cb) >= 0)
            return;
        err = nbd_get_errno() ? nbd_get_errno() : EIO; /* refused: no callback comes */
    }
    link_done(p, &err);
}

/* A READ or WRITE's data: one command on its pages of the bounce buffer. */
static void link_transfer(struct engine *e, struct pending *p, int op)
{
    struct iovec *data = &p->iov[p->segment_iovs];
    p->outstanding = 1;
    link_queue(e, p, op, data->iov_base, data->iov_len, p->parts[0].offset);
}

/* A flush's answer without a command (0 or an errno), or -1 to send one:
 * NbdStore.submit_flush's rules, for a FLUSH and a barrier's steps alike. */
static int flush_verdict(struct nbd_link *n)
{
    if (!n->can_flush)
        return 0; /* no write cache: every answered write is durable */
    if (n->lost_writes && n->state == LINK_UP) {
        n->lost_writes = 0; /* the guest hears it once, as from a disk */
        return EIO;
    }
    return -1;
}

/* A FLUSH without data, answered when the server's flush is. */
static void link_flush(struct engine *e, struct pending *p)
{
    int err = flush_verdict(e->nbd);
    p->outstanding = 1;
    p->covers = e->nbd->writes_done;
    if (err < 0)
        link_queue(e, p, IO_FSYNC, NULL, 0, 0);
    else
        link_done(p, &err);
}

static void link_trim(struct engine *e, struct pending *p)
{
    struct eng_request *r = &p->req;
    int err = EOPNOTSUPP;
    p->outstanding = 1;
    if (!r->nr_sectors)
        err = 0;
    else if (e->nbd->can_trim) {
        link_queue(e, p, IO_TRIM, NULL, r->nr_sectors * SECTOR, r->sector_number * SECTOR);
        return;
    }
    link_done(p, &err);
}

/* Answer what completed; returns how many. */
static unsigned link_reap(struct engine *e)
{
    unsigned n = 0;
    link_pump(e, 0);
    while (e->nbd->finished >= 0) {
        int32_t index = e->nbd->finished;
        e->nbd->finished = e->pending[index].next_free;
        finish(e, index);
        n++;
    }
    return n;
}

static int link_sync_done(void *user_data, int *error)
{
    *(int *)user_data = *error;
    return 1;
}

/* One command waited for (a barrier's steps): 0 or an errno.  One that takes
 * longer than WAIT_MS ends the connection, so that its callback has run when
 * this returns. */
static int link_wait(struct engine *e, int op, void *buf, uint64_t len, uint64_t offset)
{
    struct nbd_link *n = e->nbd;
    int verdict = op == IO_FSYNC ? flush_verdict(n) : -1;
    if (verdict >= 0)
        return verdict;
    if (n->state != LINK_UP)
        return ENOTCONN;
    uint64_t covers = n->writes_done;
    nbd_completion_callback cb = {.callback = link_sync_done, .user_data = &n->sync_result};
    n->sync_result = SYNC_PENDING;
    if (link_issue(n, op, buf, len, offset, cb) < 0)
        return nbd_get_errno() ? nbd_get_errno() : EIO;
    int64_t deadline = now_ms() + WAIT_MS;
    while (n->sync_result == SYNC_PENDING && n->state == LINK_UP) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            shutdown(nbd_aio_get_fd(n->h), SHUT_RDWR); /* libnbd fails what is out */
            nbd_aio_notify_read(n->h);
            link_check(e, "a command got no reply in 30 s");
            break;
        }
        link_pump(e, (int)left);
    }
    int err = n->sync_result == SYNC_PENDING ? ENOTCONN : n->sync_result;
    if (!err && op == IO_FSYNC && n->writes_flushed < covers)
        n->writes_flushed = covers;
    else if (!err && op == OP_WRITE)
        n->writes_done++;
    return err;
}

/* The engine's connection, made before its first round. */
static void link_start(struct engine *e)
{
    struct nbd_link *n = e->nbd;
    n->size = e->cfg.nbd_size;
    n->can_flush = n->can_trim = 1; /* until a server says: commands fail while none is up */
    n->retry_ms = FIRST_RETRY_MS;
    n->finished = -1;
    link_connect_wait(e, CONNECT_MS);
    snprintf(e->io_note, sizeof e->io_note, "libnbd, every request in flight");
}

/* Flush what no FLUSH covered yet, say goodbye and close: 0, or -1 with
 * e->error saying why writes answered since the last FLUSH may not be on the
 * export (NbdStore.flush's error at a disconnect).  The link is down after,
 * with nothing to say, until link_connect. */
static int link_close(struct engine *e)
{
    struct nbd_link *n = e->nbd;
    int err = 0;
    if (!n->h)
        return 0; /* closed already: nothing is owed */
    if (n->lost_writes)
        err = EIO;
    else if (n->can_flush && n->writes_done > n->writes_flushed)
        err = link_wait(e, IO_FSYNC, NULL, 0, 0);
    if (err)
        snprintf(e->error, sizeof e->error, "writes answered since the last flush may not "
                 "be on the export: %s", n->state == LINK_UP ? strerror(err) : n->down);
    n->lost_writes = 0;
    n->writes_flushed = n->writes_done;
    if (n->state == LINK_UP && nbd_aio_disconnect(n->h, 0) == 0) {
        int64_t deadline = now_ms() + 1000;
        while (n->state == LINK_UP && now_ms() < deadline && nbd_aio_get_direction(n->h))
            link_pump(e, 100);
    }
    link_drop(e);
    n->state = LINK_DOWN;
    n->down[0] = 0;
    n->retry_at_ms = INT64_MAX;
    return err ? -1 : 0;
}

/* The poll entry of the connection, if it waits for something. */
static int link_pollfd(struct engine *e, struct pollfd *fd)
{
    struct nbd_link *n = e->nbd;
    if (e->io_mode != ENG_IO_NBD || n->state == LINK_DOWN)
        return 0;
    unsigned dir = nbd_aio_get_direction(n->h);
    fd->fd = nbd_aio_get_fd(n->h);
    fd->events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                 (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
    fd->revents = 0;
    return fd->fd >= 0 && fd->events;
}

/* How long the round may sleep: not past the next try of a connection down. */
static int64_t link_sleep(struct engine *e, int64_t left)
{
    struct nbd_link *n = e->nbd;
    if (e->io_mode != ENG_IO_NBD || n->state != LINK_DOWN)
        return left;
    int64_t until = n->retry_at_ms - now_ms();
    return until < left ? (until > 0 ? until : 0) : left;
}
