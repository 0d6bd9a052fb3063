"""linux/include/uapi/xen/evtchn.h: event channels through /dev/xen/evtchn.

read() on the device returns pending ports as uint32 values; writing a port
back unmasks it.  Those need no structs; the ioctls are below.
"""

_STRUCTS = """
struct ioctl_evtchn_bind_virq {
    unsigned int virq;
};
struct ioctl_evtchn_bind_interdomain {
    unsigned int remote_domain;           /* 0 */
    unsigned int remote_port;             /* 4 */
};
struct ioctl_evtchn_bind_unbound_port {
    unsigned int remote_domain;
};
struct ioctl_evtchn_unbind {
    unsigned int port;
};
struct ioctl_evtchn_notify {
    unsigned int port;
};
struct ioctl_evtchn_restrict_domid {
    uint16_t domid;                       /* domid_t */
};
"""

_IOCTLS = {
    "IOCTL_EVTCHN_BIND_VIRQ": (0, "struct ioctl_evtchn_bind_virq"),
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": (1, "struct ioctl_evtchn_bind_interdomain"),
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": (2, "struct ioctl_evtchn_bind_unbound_port"),
    "IOCTL_EVTCHN_UNBIND": (3, "struct ioctl_evtchn_unbind"),
    "IOCTL_EVTCHN_NOTIFY": (4, "struct ioctl_evtchn_notify"),
    "IOCTL_EVTCHN_RESTRICT_DOMID": (6, "struct ioctl_evtchn_restrict_domid"),
}

CDEF = (
    _STRUCTS
    + "".join("#define %s ...\n" % n for n in _IOCTLS)
    + "#define IOCTL_EVTCHN_RESET ...\n"
)

SOURCE = (
    "#include <linux/ioctl.h>\n"
    + _STRUCTS
    + "".join(
        "#define %s _IOC(_IOC_NONE, 'E', %d, sizeof(%s))\n" % (n, nr, st)
        for n, (nr, st) in _IOCTLS.items()
    )
    + "#define IOCTL_EVTCHN_RESET _IOC(_IOC_NONE, 'E', 5, 0)\n"
)
