"""The frontend's queue in C (``csrc/front.c``): requests built and responses
taken as ``blkif/frontend/queue.py`` does, and a pattern of transfers run
without the GIL.  Python reaches it through ``blkif.frontend.fastpath``.
"""
import os

# The queue's own types: given to cffi as they are and put before front.c.
TYPES = """
struct fq_config {
    void *sring;
    uint64_t ring_bytes;
    int abi;                          /* FQ_ABI_* */
    char *pool;                       /* pool_pages granted pages, mapped here */
    const uint32_t *pool_refs;
    uint32_t pool_pages;
    char *ind_pool;                   /* ind_pages per ring slot; NULL: direct only */
    const uint32_t *ind_refs;
    uint32_t ind_pages;
    uint32_t segments;                /* per request: 11, or the indirect segments */
    uint32_t req_prod_pvt, rsp_cons;  /* where the ring is now */
    int port_kind, port_fd;
    uint32_t port;
};

struct fq_done {                      /* one request answered */
    uint64_t tag;
    int16_t status;
};

struct fq_job {                       /* a pattern for fq_run */
    uint8_t op;                       /* BLKIF_OP_READ or BLKIF_OP_WRITE */
    int random;                       /* else sequential, wrapping */
    uint32_t depth;                   /* transfers in flight */
    uint64_t block_size, disk_bytes, seed;
    int64_t duration_ns, timeout_ns;
    const char *data;                 /* a write's block_size bytes */
    char *scratch;                    /* depth * block_size bytes reads land in */
    uint64_t *latency_ns;             /* room for latency_cap transfers */
    uint64_t latency_cap;
};

struct fq_result {
    uint64_t ios;                     /* transfers finished */
    int64_t elapsed_ns;
};

struct fq_transfer {                  /* fq_run's state per transfer in flight */
    uint64_t offset;
    int64_t started;
    uint32_t queue, parts, put, done;
    int16_t status;
    uint8_t active;
};
"""

CDEF = """
#define FQ_OK ...
#define FQ_FULL ...
#define FQ_RING_ERROR ...
#define FQ_CHANNEL_CLOSED ...
#define FQ_IO_ERROR ...
#define FQ_TIMEOUT ...
#define FQ_INVALID ...
#define FQ_ABI_X86_64 ...
#define FQ_ABI_X86_32 ...
#define FQ_PORT_XEN ...
#define FQ_PORT_SOCKET ...
#define FQ_MAX_QUEUES ...
#define FQ_TAKE_BATCH ...
""" + TYPES + """
struct fq;
struct fq *fq_new(const struct fq_config *cfg, char *err, size_t errlen);
void fq_free(struct fq *q);
int fq_put(struct fq *q, uint64_t tag, uint8_t op, uint64_t offset, uint64_t length,
           const char *data, char *dest);
int fq_push(struct fq *q);
int fq_take(struct fq *q, struct fq_done *out, unsigned max);
int fq_run(struct fq **qs, uint32_t nq, const struct fq_job *job, struct fq_transfer *t,
           struct fq_result *res);
uint32_t fq_req_prod_pvt(struct fq *q);
uint32_t fq_rsp_cons(struct fq *q);
uint32_t fq_in_flight(struct fq *q);
uint64_t fq_notifies(struct fq *q);
const char *fq_error(struct fq *q);
"""

SOURCE = TYPES + '#include "front.c"\n'
INCLUDE_DIRS = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")]
