"""Memory barriers of ring.h (``mb``, ``rmb``, ``wmb``) for the shared ring."""

CDEF = """
void xen_mb(void);
void xen_rmb(void);
void xen_wmb(void);
"""

SOURCE = """
static void xen_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static void xen_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static void xen_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
"""
