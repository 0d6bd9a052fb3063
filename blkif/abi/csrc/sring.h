/* A shared ring of xen/io/ring.h for one ring ABI, as either end maps it:
 * the slot and message sizes, and how many slots fit (__CONST_RING_SIZE).
 * Included by engine.c (the backend) and front.c (the frontend), after the
 * ABI structs of _cdefs/blkif.py. */
#ifndef BLKIF_SRING_H
#define BLKIF_SRING_H

#define SRING_HEADER 64 /* req_prod, req_event, rsp_prod, rsp_event, padding */

struct sring_layout {
    uint32_t slot_size, request_size, response_size;
    uint32_t raw;  /* slots that fit after the header */
    uint32_t size; /* raw rounded down to a power of two; 0 if none fit */
};

static struct sring_layout sring_layout(int x86_32, uint64_t ring_bytes)
{
    struct sring_layout l;
    if (x86_32) {
        l.slot_size = sizeof(union blkif_x86_32_sring_entry);
        l.request_size = sizeof(struct blkif_x86_32_request);
        l.response_size = sizeof(struct blkif_x86_32_response);
    } else {
        l.slot_size = sizeof(union blkif_x86_64_sring_entry);
        l.request_size = sizeof(struct blkif_x86_64_request);
        l.response_size = sizeof(struct blkif_x86_64_response);
    }
    l.raw = ring_bytes > SRING_HEADER ? (uint32_t)((ring_bytes - SRING_HEADER) / l.slot_size) : 0;
    l.size = 0;
    if (l.raw)
        for (l.size = 1; l.size * 2 <= l.raw; l.size *= 2)
            ;
    return l;
}

#endif
