"""The backend datapath engine (``csrc/engine.c``): one ring served in C.

Python reaches it through ``blkif.backend.engine``; the structs here are the
engine's own (configuration, a decoded request, counters), not Xen's.
``eng_map_grants``, ``eng_map_each``, ``eng_unmap_grants`` and ``eng_unmap_each``
are implemented in Python (``extern "Python"``): the engine calls them, with
the GIL, to map grants where it has no gntdev descriptor of its own (the sim
platform).
"""
import os

# The engine's own types: given to cffi as they are and put before engine.c.
TYPES = """
struct eng_limits {
    uint64_t sectors;
    uint32_t max_indirect_segments;
    uint32_t sector_size;             /* the device's logical sector, bytes (512 if 0) */
    uint8_t readonly, flush, barrier, discard, discard_secure;
};

struct eng_request {                  /* a request decoded and validated */
    uint64_t id, sector_number, nr_sectors;
    uint32_t indirect_grefs[8];
    uint16_t nr_segments;
    uint8_t operation, kind, nr_indirect, secure, whole_pages;
    int16_t status;                   /* the answer when refused */
};

struct eng_stats {
    uint64_t requests, indirect, errors, read_bytes, write_bytes, batches, notifies, submits;
    uint64_t op_read, op_write, op_barrier, op_flush, op_discard;
    uint64_t events, spurious_events;
    uint64_t grant_hits, grant_misses, grant_evictions, grant_purged, mapped_grants;
    uint64_t in_flight, persistent_grants, resumed, bounced;
    uint64_t latency[17], latency_ns; /* counters.py: bucket i under 32 us << i */
    int64_t last_io_errno, last_map_errno;
};

/* A ring's journal (live restart): kept in a shared mapping by the engine,
 * read back by its successor (engine.c, "the journal"). */
struct eng_journal_entry {
    uint32_t state;                   /* JOURNAL_FREE, _TAKEN or _ANSWERED */
    uint32_t ring_index;              /* where on the ring the request was */
    uint32_t answer;                  /* ANSWERED: the response's index */
    uint32_t pad;
    uint8_t request[112];             /* the slot as copied (x86_64's size, the larger) */
};

struct eng_journal {
    uint64_t magic;
    uint32_t size, abi;               /* the ring's slots; ENG_ABI_* */
    uint32_t req_cons, rsp_prod_pvt;
    uint32_t pad[10];
    struct eng_journal_entry entries[];  /* one per slot, by pending index */
};

struct eng_config {
    void *sring;
    uint64_t ring_bytes;
    int abi;
    struct eng_limits limits;
    int store_fd, store_is_device;
    const char *nbd_uri;              /* not NULL: an NBD export instead (nbd_link.c) */
    const char *nbd_name;             /* what messages call it */
    uint64_t nbd_size;                /* its size: a connection with another is refused */
    int *flush_failed;                /* the store's, shared by its rings */
    int port_kind, port_fd;
    uint32_t port;
    int persistent;
    uint32_t max_grants, grant_unused_seconds;
    int io_mode;
    uint32_t io_threads;
    uint32_t bounce_pages;            /* the ring's bounce buffer (0: none), see engine.c */
    int gntdev_fd;                    /* maps grants itself through it; -1: eng_map_grants */
    uint16_t domid;                   /* the frontend's, for gntdev */
    struct eng_journal *journal;      /* NULL: none; else room for the ring's size */
    int resume;                       /* carry on from what the journal holds */
    void *handle;
};
"""

CDEF = """
#define ENG_ABI_X86_64 ...
#define ENG_ABI_X86_32 ...
#define ENG_PORT_XEN ...
#define ENG_PORT_SOCKET ...
#define ENG_IO_URING ...
#define ENG_IO_THREADS ...
#define ENG_IO_NBD ...
#define ENG_OK ...
#define ENG_STOPPED ...
#define ENG_RING_ERROR ...
#define ENG_CHANNEL_CLOSED ...
#define ENG_FAILED ...
#define ENG_JOURNAL_MAGIC ...
#define JOURNAL_FREE ...
#define JOURNAL_TAKEN ...
#define JOURNAL_ANSWERED ...
""" + TYPES + """
struct engine;
struct engine *eng_new(const struct eng_config *cfg, char *err, size_t errlen);
int eng_run(struct engine *e, int timeout_ms);
int eng_quiesce(struct engine *e, int timeout_ms);
void eng_stop(struct engine *e);
void eng_restart(struct engine *e);
void eng_free(struct engine *e);
const struct eng_stats *eng_stats(struct engine *e);
const char *eng_error(struct engine *e);
const char *eng_io_note(struct engine *e);
int eng_io_mode(struct engine *e);
void eng_set_sectors(struct engine *e, uint64_t sectors);
const char *eng_store_error(struct engine *e);
int eng_nbd_close(struct engine *e);
int eng_nbd_reopen(struct engine *e);
int eng_decode(int abi, const struct eng_limits *lim, const void *raw,
               struct eng_request *out, uint32_t *grefs, uint32_t *bounds);
int eng_decode_indirect(const struct eng_limits *lim, struct eng_request *req,
                        const char *const *pages, uint32_t *grefs, uint32_t *bounds);

extern "Python" int eng_map_grants(void *, const uint32_t *, unsigned, int, uintptr_t *,
                                   uint64_t *);
extern "Python" void eng_unmap_grants(void *, uint64_t);
extern "Python" int eng_map_each(void *, const uint32_t *, unsigned, int, uintptr_t *,
                                 uint64_t *);
extern "Python" void eng_unmap_each(void *, const uint64_t *, unsigned);
"""

SOURCE = TYPES + '#include "engine.c"\n'
INCLUDE_DIRS = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")]
LIBRARIES = ["uring", "nbd", "pthread"]
