/* libFuzzer target for what a guest controls in the engine: request slots,
 * indirect descriptor pages, and the persistent-grant cache they drive.
 *
 * Built by blkif/abi/fuzz.py with clang -fsanitize=fuzzer,address,undefined,
 * after the ABI structs of blkif/abi/_cdefs (the same text cffi compiles).
 * Input: byte 0 picks the ABI and, with byte 1, the VBD's limits; then one
 * request slot; then the indirect pages (zero-padded) or, when byte 0 has its
 * top bit, a script of cache operations.  Beyond the sanitizers, every
 * accepted request must keep the rules the I/O relies on (abort otherwise).
 */
#include <stdlib.h>

static char fuzz_pages[64][4096];

static int eng_map_grants(void *handle, const uint32_t *grefs, unsigned n, int writable,
                          uintptr_t *base, uint64_t *token)
{
    (void)handle, (void)writable;
    if (n > 64 || (n && grefs[0] == 0xFFFFFFFFu))
        return -1;  /* a grant that cannot be mapped */
    *base = (uintptr_t)fuzz_pages;
    *token = (uint64_t)grefs[0] + 1;
    return 0;
}

static void eng_unmap_grants(void *handle, uint64_t token) { (void)handle, (void)token; }

static void eng_unmap_each(void *handle, const uint64_t *tokens, unsigned n)
{
    (void)handle, (void)tokens, (void)n;
}

static int eng_map_each(void *handle, const uint32_t *grefs, unsigned n, int writable,
                        uintptr_t *addrs, uint64_t *tokens)
{
    for (unsigned i = 0; i < n; i++)
        if (eng_map_grants(handle, grefs + i, 1, writable, addrs + i, tokens + i) < 0)
            return -1;
    return 0;
}

#include "engine.c"

/* One gref as map_pages takes it: a hit, or a miss mapped into the cache
 * while it has room; -1 when it is full (or the grant cannot be mapped). */
static int32_t cache_get(struct engine *e, uint32_t gref)
{
    int32_t i = cache_hit(e, gref);
    uintptr_t addr;
    uint64_t token;
    if (i >= 0 || e->cache.count == e->cache.cap || map_each(e, &gref, 1, &addr, &token) < 0)
        return i;
    return cache_insert(e, gref, addr, token);
}

static const uint64_t SECTORS[4] = {0, 8, 2048, UINT64_MAX};
static const uint32_t INDIRECT[8] = {0, 1, 11, 32, 256, 512, 513, 4096};

static void check_request(const struct eng_limits *lim, const struct eng_request *r,
                          const uint32_t *bounds)
{
    uint64_t sectors = 0;
    if (!in_device(lim, r->sector_number, r->nr_sectors))
        abort();
    if (r->nr_sectors && ((r->sector_number | r->nr_sectors) % (lim->sector_size / SECTOR)))
        abort(); /* not whole logical sectors */
    if (r->kind == OP_DISCARD)
        return;
    if (r->operation == OP_INDIRECT ? r->nr_segments > lim->max_indirect_segments
                                    : r->nr_segments > MAX_DIRECT)
        abort();
    for (uint32_t i = 0; i < r->nr_segments; i++) {
        uint32_t offset = bounds[2 * i], length = bounds[2 * i + 1];
        if (!length || length % SECTOR || offset % SECTOR || offset + length > PAGE)
            abort();
        sectors += length / SECTOR;
    }
    if (sectors != r->nr_sectors || (lim->readonly && writes(r->kind)))
        abort();
}

/* Gets and puts of grefs on a cache of 8: its table, LRU and counts stay true. */
static void exercise_cache(const uint8_t *ops, size_t n)
{
    struct engine *e = calloc(1, sizeof *e);
    int32_t held[64];
    unsigned nheld = 0;
    if (!e || cache_init(&e->cache, 8) < 0)
        abort();
    e->cfg.gntdev_fd = -1; /* grants through eng_map_grants above */
    for (size_t i = 0; i < n; i++) {
        if (ops[i] & 0x80 && nheld) {
            cache_put(e, held[--nheld]);
        } else if (nheld < 64) {
            int32_t got = cache_get(e, ops[i] & 0x1F);
            if (got >= 0)
                held[nheld++] = got;
        }
        e->now += ops[i] & 0x40 ? 70 : 0;
        if (ops[i] & 0x20)
            cache_purge(e);
        if ((ops[i] & 0x60) == 0x60)
            cache_clean(e);
        if (e->cache.count > e->cache.cap)
            abort();
        for (uint32_t h = 0; h <= e->cache.mask; h++) {
            int32_t at = e->cache.table[h];
            if (at >= 0 && cache_find(&e->cache, e->cache.entries[at].gref) != at)
                abort();
        }
    }
    while (nheld)
        cache_put(e, held[--nheld]);
    free(e->cache.entries);
    free(e->cache.table);
    free(e);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint32_t grefs[4096], bounds[8192];
    static char request[256], pages[8][4096];
    if (size < 2)
        return 0;
    int abi = data[0] & 1;
    size_t request_size = abi ? sizeof(struct blkif_x86_32_request)
                              : sizeof(struct blkif_x86_64_request);
    if (data[0] & 0x80) {
        exercise_cache(data + 2, size - 2);
        return 0;
    }
    if (size < 2 + request_size)
        return 0;
    struct eng_limits lim = {
        .sectors = SECTORS[data[0] >> 1 & 3],
        .max_indirect_segments = INDIRECT[data[0] >> 3 & 7],
        .readonly = data[1] & 1, .flush = data[1] >> 1 & 1, .barrier = data[1] >> 2 & 1,
        .discard = data[1] >> 3 & 1, .discard_secure = data[1] >> 4 & 1,
        .sector_size = data[0] & 0x40 ? 4096 : SECTOR,
    };
    struct eng_request r;
    memcpy(request, data + 2, request_size);
    if (eng_decode(abi, &lim, request, &r, grefs, bounds) < 0) {
        if (r.status != RSP_ERROR && r.status != RSP_EOPNOTSUPP)
            abort();
        return 0;
    }
    if (r.operation == OP_INDIRECT) {
        const char *page_list[8];
        size_t rest = size - 2 - request_size;
        memset(pages, 0, sizeof pages);
        memcpy(pages, data + 2 + request_size, rest < sizeof pages ? rest : sizeof pages);
        for (int i = 0; i < 8; i++)
            page_list[i] = pages[i];
        if (r.nr_indirect < 1 || r.nr_indirect > 8 ||
            r.nr_segments > r.nr_indirect * SEGS_PER_PAGE)
            abort();
        if (eng_decode_indirect(&lim, &r, page_list, grefs, bounds) < 0)
            return 0;
    }
    check_request(&lim, &r, bounds);
    return 0;
}
