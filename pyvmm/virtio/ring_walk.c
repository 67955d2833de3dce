/*
 * The device's walk of one split-ring chain, and the moves of a request's
 * bytes, compiled (issue 23). pyvmm/virtio/compiled_ring.py builds and
 * loads it with cffi; pyvmm/virtio/device_ring.py has the same walk in
 * Python, which stays the reference: the two must accept and refuse the
 * same chains (tests/test_compiled_ring.py compares them on random tables).
 *
 * Nothing here trusts the guest: every index is checked against its table,
 * every buffer against the regions of guest RAM before its host address is
 * taken, and the walk ends after one table's worth of descriptors.
 */

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define MAX_INDIRECT (1u << 16)
#define MAX_CHAIN_BYTES 0xFFFFFFFFull

struct pv_region {          /* guest-physical [start, end) lies at host */
    uint64_t start, end;
    char *host;
};

struct pv_buf {             /* one guest buffer of a chain */
    uint64_t addr;
    char *host;
    uint32_t len;
    uint32_t writable;
};

struct pv_chain {           /* what the walk found, or why it stopped */
    uint32_t n, n_readable;
    uint64_t readable_len, writable_len;
    int error;              /* PV_OK or one of PV_E_*: compiled_ring.py words it */
    uint64_t e1, e2;        /* the numbers the error names */
};

enum { PV_OK, PV_E_INDEX, PV_E_NESTED, PV_E_INDIRECT_RANGE, PV_E_INDIRECT_SIZE,
       PV_E_OUTSIDE, PV_E_ORDER, PV_E_READABLE_4G, PV_E_WRITABLE_4G, PV_E_LOOP };

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

/* The region [addr, addr + len) lies in whole, or NULL (no overflow for any
   64-bit addr and 32-bit len). */
static const struct pv_region *find(const struct pv_region *r, int n, uint64_t addr,
                                    uint64_t len)
{
    for (int i = 0; i < n; i++)
        if (addr >= r[i].start && len <= r[i].end - r[i].start
            && addr - r[i].start <= r[i].end - r[i].start - len)
            return &r[i];
    return NULL;
}

static int fail(struct pv_chain *c, int error, uint64_t e1, uint64_t e2)
{
    c->error = error;
    c->e1 = e1;
    c->e2 = e2;
    return error;
}

/* Walk the chain at head of the descriptor table at host address table (num
   entries) into out (room for num + 1 buffers: the walk takes at most num + 1
   steps, one of them the indirect descriptor). */
int pv_walk(const struct pv_region *regions, int nregions, const char *table, uint32_t num,
            uint32_t head, struct pv_buf *out, struct pv_chain *c)
{
    uint32_t size = num, index = head;
    int indirect = 0;
    const struct pv_region *r = NULL;

    c->n = c->n_readable = 0;
    c->readable_len = c->writable_len = 0;
    c->error = PV_OK;
    for (uint32_t step = 0; step < num + 1; step++) {
        struct vring_desc d;

        if (index >= size)
            return fail(c, PV_E_INDEX, index, size);
        memcpy(&d, table + 16 * (uint64_t)index, sizeof d);   /* little-endian, as x86 */
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
            const struct pv_region *t;

            if (indirect || c->n)
                return fail(c, PV_E_NESTED, 0, 0);
            if (d.len % 16 || !d.len || !(t = find(regions, nregions, d.addr, d.len)))
                return fail(c, PV_E_INDIRECT_RANGE, d.addr, d.len);
            if (d.len / 16 > MAX_INDIRECT)
                return fail(c, PV_E_INDIRECT_SIZE, d.len / 16, 0);
            table = t->host + (d.addr - t->start);
            size = d.len / 16;
            index = 0;
            indirect = 1;
            continue;
        }
        /* Most buffers lie in the region of the one before. */
        if (!r || d.addr < r->start || d.addr > r->end || d.len > r->end - d.addr) {
            r = find(regions, nregions, d.addr, d.len);
            if (!r)
                return fail(c, PV_E_OUTSIDE, d.addr, d.len);
        }
        if (d.flags & VIRTQ_DESC_F_WRITE) {
            c->writable_len += d.len;
            if (c->writable_len > MAX_CHAIN_BYTES)
                return fail(c, PV_E_WRITABLE_4G, head, 0);
        } else {
            if (c->n_readable != c->n)
                return fail(c, PV_E_ORDER, 0, 0);
            c->readable_len += d.len;
            if (c->readable_len > MAX_CHAIN_BYTES)
                return fail(c, PV_E_READABLE_4G, head, 0);
            c->n_readable++;
        }
        out[c->n].addr = d.addr;
        out[c->n].host = r->host + (d.addr - r->start);
        out[c->n].len = d.len;
        out[c->n].writable = (d.flags & VIRTQ_DESC_F_WRITE) != 0;
        c->n++;
        if (!(d.flags & VIRTQ_DESC_F_NEXT))
            return PV_OK;
        index = d.next;
    }
    return fail(c, PV_E_LOOP, head, 0);
}

/* The iovecs of bytes [start, start + length) of bufs[0..n): how many, at most
   max of them (the bytes past those are left out). */
static int slice(const struct pv_buf *bufs, uint32_t n, uint64_t start, uint64_t length,
                 struct iovec *iov, int max)
{
    int k = 0;

    for (uint32_t i = 0; i < n && length && k < max; i++) {
        uint64_t take;

        if (start >= bufs[i].len) {
            start -= bufs[i].len;
            continue;
        }
        take = bufs[i].len - start < length ? bufs[i].len - start : length;
        iov[k].iov_base = bufs[i].host + start;
        iov[k].iov_len = take;
        k++;
        start = 0;
        length -= take;
    }
    return k;
}

/* preadv (to_file 0: the file's bytes at offset into the buffers) or pwritev
   (to_file 1) of bytes [start, start + length) of bufs[0..n), as one call,
   as os.preadv/os.pwritev would make it (again on EINTR). iov: room for n.
   Returns the bytes moved, or -errno. */
int64_t pv_file_io(int fd, int to_file, int64_t offset, const struct pv_buf *bufs, uint32_t n,
                   uint64_t start, uint64_t length, struct iovec *iov)
{
    int k = slice(bufs, n, start, length, iov, (int)n);
    ssize_t done;

    if (!k)
        return 0;
    do {
        done = to_file ? pwritev(fd, iov, k, offset) : preadv(fd, iov, k, offset);
    } while (done < 0 && errno == EINTR);
    return done < 0 ? -errno : done;
}

/* Copy length bytes between data and bytes [start, start + length) of
   bufs[0..n) (to_guest 1: data into the buffers). Returns the bytes copied
   (fewer if the buffers end first). */
uint64_t pv_copy(int to_guest, char *data, uint64_t length, const struct pv_buf *bufs,
                 uint32_t n, uint64_t start)
{
    uint64_t done = 0;

    for (uint32_t i = 0; i < n && done < length; i++) {
        uint64_t take;

        if (start >= bufs[i].len) {
            start -= bufs[i].len;
            continue;
        }
        take = bufs[i].len - start < length - done ? bufs[i].len - start : length - done;
        if (to_guest)
            memcpy(bufs[i].host + start, data + done, take);
        else
            memcpy(data + done, bufs[i].host + start, take);
        done += take;
        start = 0;
    }
    return done;
}
