/*
 * virtio-blk's plain requests served whole in C (issue 23): a read or a
 * write of the disk, from the avail ring to the used ring, with the
 * inflight area kept as pyvmm/vhost/user/backend/inflight.py keeps it.
 * Built into the same module as ring_walk.c (after it: it walks with
 * pv_walk). The back-end's Python path stays the reference: Blk.serve,
 * Vring.pop and Vring.push. This file does what they do for the requests
 * it takes, step for step, and leaves every other request where it is for
 * them: a request of another type, one that is not whole (no header, no
 * status byte), one past the end of the disk, a write to a read-only
 * disk, a broken chain or an available index too far ahead. Those it
 * stops at without taking them, so the Python path finds each as the
 * next one, and words its refusal or answer (tests/test_blk_requests.py
 * has both paths serve the same random rings and wants the same bytes).
 *
 * A batch at a time, as the Python path's batches (Blk.handle_queue):
 * each request of the batch is taken, in ring order:
 *   the avail idx read; none there: avail_event = next_avail
 *   (VIRTIO_RING_F_EVENT_IDX), then the avail idx read again
 *   the head walked (pv_walk), the 16-byte header read, checked
 *   next_avail + 1; inflight: desc[head] = {1, next 0, counter++}
 * then their preadv/pwritev run at once, on the caller's thread and the
 * pool's (pv_pool_start: the copies of one guest kick overlap, as in
 * qemu-storage-daemon's thread pool); then each is given back, in ring order:
 *   the status byte, in the chain's last writable byte
 *   inflight: desc[head].next = last_batch_head, last_batch_head = head
 *   used elem, then used idx + 1
 *   inflight: desc[head].inflight = 0, used_idx = the ring's
 * With VIRTIO_RING_F_EVENT_IDX negotiated or not: avail_event is written
 * either way, as the Python path writes it.
 *
 * pv_blk_kick is a whole kick (Daemon._on_kick: Blk.handle_queue, then
 * Daemon._interrupt) for a ring whose front is plain requests: served,
 * then the driver interrupted if it asked to be, with no Python between;
 * and the ring's next kicks, while nothing else wants the daemon's loop.
 */

#include <pthread.h>
#include <sys/epoll.h>
#include <unistd.h>

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define SECTOR 512
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct pv_queue {           /* one split ring, and its part of the inflight area */
    char *desc, *avail, *used;      /* host addresses */
    uint32_t num;
    uint16_t next_avail;            /* in and out */
    char *inflight;                 /* the queue's header, or NULL: not tracked */
    uint64_t counter;               /* in and out: the next inflight counter */
    int stopped;                    /* out: 1 at a request left for the Python path, 0 when
                                       none was left (avail_event asks for a kick) */
};

struct pv_disk {
    int fd, read_only;
    uint64_t size;                  /* bytes, whole sectors */
    uint32_t failed;                /* out: requests whose I/O failed (status IOERR) */
    int error;                      /* out: the errno of the last, 0 for a short count */
};

/* The inflight area (inflight.py): a 16-byte header, then 16 bytes per head. */
#define INFLIGHT_LAST_BATCH_HEAD 12
#define INFLIGHT_USED_IDX 14
#define INFLIGHT_DESC(q, head) ((q)->inflight + 16 + 16 * (uint64_t)(head))

static uint16_t load16(const char *p)
{
    uint16_t v;

    memcpy(&v, p, 2);
    return v;
}

static void store16(char *p, uint16_t v)
{
    memcpy(p, &v, 2);
}

/* The request at the head of bufs (c: what the walk found) if this file
   serves it: 1 with its type, disk offset and data length, else 0. */
static int plain(const struct pv_buf *bufs, const struct pv_chain *c,
                 const struct pv_disk *disk, uint32_t *type, uint64_t *offset,
                 uint64_t *length)
{
    struct { uint32_t type, ioprio; uint64_t sector; } hdr;

    if (c->readable_len < sizeof hdr || c->writable_len < 1)
        return 0;
    pv_copy(0, (char *)&hdr, sizeof hdr, bufs, c->n_readable, 0);
    if (hdr.type == VIRTIO_BLK_T_IN)
        *length = c->writable_len - 1;
    else if (hdr.type == VIRTIO_BLK_T_OUT && !disk->read_only)
        *length = c->readable_len - sizeof hdr;
    else
        return 0;
    if (hdr.sector > disk->size / SECTOR || *length > disk->size - hdr.sector * SECTOR)
        return 0;
    *type = hdr.type;
    *offset = hdr.sector * SECTOR;
    return 1;
}

/* One request's I/O, for the pool. */
struct pv_io {
    int fd, to_file;
    int64_t offset;
    const struct pv_buf *bufs;
    uint32_t n;
    uint64_t start, length;
    struct iovec *iov;
    int64_t done;
};

/* The pool: threads that take the I/O of a batch beside the caller's. One
   batch at a time: a second caller (another serving loop of the same
   process) waits for the first one's batch to end (batch_lock). */
static pthread_mutex_t batch_lock = PTHREAD_MUTEX_INITIALIZER;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work, finished;
    struct pv_io *io;
    uint32_t count, next, running;
    int threads;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void run(struct pv_io *io)
{
    io->done = pv_file_io(io->fd, io->to_file, io->offset, io->bufs, io->n, io->start,
                          io->length, io->iov);
}

/* Take the batch's next I/O and run it, until none is left (lock held on
   entry and on return). */
static void take_all(void)
{
    while (pool.next < pool.count) {
        struct pv_io *io = &pool.io[pool.next++];

        pool.running++;
        pthread_mutex_unlock(&pool.lock);
        run(io);
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0 && pool.next == pool.count)
            pthread_cond_broadcast(&pool.finished);
    }
}

static void *pool_thread(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.next >= pool.count)
            pthread_cond_wait(&pool.work, &pool.lock);
        take_all();
    }
    return NULL;
}

/* At least threads threads in the pool (the process keeps them); returns
   how many it has (fewer if no more could start). */
int pv_pool_start(int threads)
{
    pthread_mutex_lock(&pool.lock);
    while (pool.threads < threads) {
        pthread_t t;
        pthread_attr_t attr;

        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        if (pthread_create(&t, &attr, pool_thread, NULL)) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        pool.threads++;
    }
    pthread_mutex_unlock(&pool.lock);
    return pool.threads;
}

/* Run io[0..count) at once on the caller's thread and the pool's; returns
   when all are done. */
static void run_batch(struct pv_io *io, uint32_t count)
{
    if (count == 1 || !pool.threads) {
        for (uint32_t i = 0; i < count; i++)
            run(&io[i]);
        return;
    }
    pthread_mutex_lock(&batch_lock);
    pthread_mutex_lock(&pool.lock);
    pool.io = io;
    pool.count = count;
    pool.next = 0;
    for (uint32_t i = 1; i < count && i <= (uint32_t)pool.threads; i++)
        pthread_cond_signal(&pool.work);        /* as many as there is work for */
    take_all();
    while (pool.running)
        pthread_cond_wait(&pool.finished, &pool.lock);
    pool.io = NULL;
    pool.count = pool.next = 0;
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&batch_lock);
}

/* Take the next plain request of q: its chain into c (its buffers into bufs),
   its I/O into io, its head into *head. 0 if there is none, or if the next
   one is for the Python path (left untaken: q->stopped says which). */
static int take(const struct pv_region *regions, int nregions, struct pv_queue *q,
                const struct pv_disk *disk, struct pv_buf *bufs, struct iovec *iov,
                struct pv_io *io, struct pv_chain *c, uint16_t *head)
{
    uint16_t idx;
    uint32_t type;
    uint64_t offset, length;

    idx = __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
    if (idx == q->next_avail) {     /* none: ask for a kick for the next, look again */
        store16(q->used + 4 + 8 * (uint64_t)q->num, q->next_avail);    /* avail_event */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);    /* the driver sees it before we look */
        idx = __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
    }
    q->stopped = idx != q->next_avail;
    if (idx == q->next_avail || (uint16_t)(idx - q->next_avail) > q->num)
        return 0;                               /* none, or the Python path's refusal */
    *head = load16(q->avail + 4 + 2 * (uint64_t)(q->next_avail % q->num));
    if (pv_walk(regions, nregions, q->desc, q->num, *head, bufs, c) != PV_OK
        || !plain(bufs, c, disk, &type, &offset, &length))
        return 0;
    q->stopped = 0;

    q->next_avail++;
    if (q->inflight) {
        char *d = INFLIGHT_DESC(q, *head);

        memset(d, 0, 16);
        d[0] = 1;
        memcpy(d + 8, &q->counter, 8);
        q->counter++;
    }
    io->fd = disk->fd;
    io->offset = (int64_t)offset;
    io->length = length;
    io->iov = iov;
    if (type == VIRTIO_BLK_T_IN) {
        io->to_file = 0;
        io->bufs = bufs + c->n_readable;
        io->n = c->n - c->n_readable;
        io->start = 0;
    } else {
        io->to_file = 1;
        io->bufs = bufs;
        io->n = c->n_readable;
        io->start = 16;
    }
    return 1;
}

/* Give the request taken into io back: its status, the used ring, the inflight area. */
static void give_back(struct pv_queue *q, struct pv_disk *disk, const struct pv_io *io,
                      const struct pv_buf *bufs, const struct pv_chain *c, uint16_t head)
{
    uint16_t used_idx;
    uint32_t elem[2];
    char status;

    if (io->done == (int64_t)io->length) {
        status = VIRTIO_BLK_S_OK;
        elem[1] = io->to_file ? 1 : (uint32_t)io->length + 1;
    } else {
        status = VIRTIO_BLK_S_IOERR;
        elem[1] = 1;
        disk->failed++;
        disk->error = io->done < 0 ? (int)-io->done : 0;
    }
    pv_copy(1, &status, 1, bufs + c->n_readable, c->n - c->n_readable, c->writable_len - 1);

    if (q->inflight) {
        char *d = INFLIGHT_DESC(q, head);

        memcpy(d + 6, q->inflight + INFLIGHT_LAST_BATCH_HEAD, 2);
        store16(q->inflight + INFLIGHT_LAST_BATCH_HEAD, head);
    }
    used_idx = load16(q->used + 2);
    elem[0] = head;
    memcpy(q->used + 4 + 8 * (uint64_t)(used_idx % q->num), elem, 8);
    __atomic_store_n((uint16_t *)(q->used + 2), (uint16_t)(used_idx + 1), __ATOMIC_RELEASE);
    if (q->inflight) {
        INFLIGHT_DESC(q, head)[0] = 0;
        memcpy(q->inflight + INFLIGHT_USED_IDX, q->used + 2, 2);   /* as the ring has it */
    }
}

/* Serve the plain requests at the front of queue q, batch at most at a time
   (at most num in all); returns how many. bufs: room for batch * (num + 1)
   buffers; iov: the same; io: batch; chains, heads: batch. (Python calls
   it through pv_blk_kick.) */
static uint32_t pv_blk_serve(const struct pv_region *regions, int nregions,
                             struct pv_queue *q, struct pv_disk *disk, struct pv_buf *bufs,
                             struct iovec *iov, struct pv_io *io, struct pv_chain *chains,
                             uint16_t *heads, uint32_t batch)
{
    uint32_t served = 0, room = q->num + 1;

    q->stopped = 0;
    disk->failed = 0;
    disk->error = 0;
    for (;;) {
        uint32_t n = 0;

        if (served >= q->num) {         /* enough for one call: the loop goes on */
            q->stopped = 1;
            return served;
        }
        while (n < batch && served + n < q->num
               && take(regions, nregions, q, disk, bufs + n * room, iov + n * room, &io[n],
                       &chains[n], &heads[n]))
            n++;
        if (!n)
            return served;
        run_batch(io, n);
        for (uint32_t i = 0; i < n; i++)
            give_back(q, disk, &io[i], bufs + i * room, &chains[i], heads[i]);
        served += n;
        if (n < batch && served < q->num)   /* the ring had no more, or the next is Python's */
            return served;
    }
}

/* Whether the driver wants an interrupt for what was used since the used
   index was used_before (DeviceRing.should_notify): past its used_event with
   VIRTIO_RING_F_EVENT_IDX, else unless it set VIRTQ_AVAIL_F_NO_INTERRUPT. */
static int wants_interrupt(const struct pv_queue *q, uint16_t used_before, int event_idx)
{
    uint16_t used_idx = load16(q->used + 2);

    if (used_idx == used_before)
        return 0;
    /* The used index out before the driver's wish is read (as the kernel's
       vhost_notify): else a driver that enables interrupts (used_event)
       and then reads the used index between the two could miss both this
       entry and its interrupt. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (event_idx)
        return (uint16_t)(used_idx - load16(q->avail + 4 + 2 * (uint64_t)q->num) - 1)
               < (uint16_t)(used_idx - used_before);
    return !(load16(q->avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

/* Add 1 to eventfd fd (daemon._signal): when that fails, its counter is
   full (EAGAIN), and an interrupt is pending already. */
static void signal_eventfd(int fd)
{
    uint64_t one = 1;

    if (write(fd, &one, sizeof one) < 0)
        return;
}

/* Wait in the event loop's epoll set epfd for what is ready next: 1 if that
   is the kick eventfd kick alone (read, as Daemon._on_kick reads it), 0 if
   anything else is (left for the loop to find: its sources are level-
   triggered) or the wait was interrupted (a signal, for Python's handler). */
static int only_kick_next(int epfd, int kick)
{
    struct epoll_event ready[8];
    uint64_t count;
    int n = epoll_wait(epfd, ready, 8, -1);

    if (n <= 0)
        return 0;
    for (int i = 0; i < n; i++)
        if (ready[i].data.fd != kick)
            return 0;
    return read(kick, &count, sizeof count) == sizeof count;
}

/* A kick (Daemon._on_kick with Blk.handle_queue, for the plain requests):
   pv_blk_serve, then the call eventfd call (-1: none) signalled if the
   driver wants to hear of what was used. With epfd (the daemon's event
   loop, else -1): then the ring's next kicks too, in C, for as long as
   they are all that is ready in the loop; so a guest streaming requests
   costs no Python per kick. Returns the requests served: when something
   else is ready, when a request is left for the Python path (q->stopped),
   or after a failed one (disk->failed, for Python to log). */
uint32_t pv_blk_kick(const struct pv_region *regions, int nregions, struct pv_queue *q,
                     struct pv_disk *disk, struct pv_buf *bufs, struct iovec *iov,
                     struct pv_io *io, struct pv_chain *chains, uint16_t *heads,
                     uint32_t batch, int call, int event_idx, int epfd, int kick)
{
    uint32_t served = 0;

    for (;;) {
        uint16_t used_before = load16(q->used + 2);

        served += pv_blk_serve(regions, nregions, q, disk, bufs, iov, io, chains, heads, batch);
        if (call >= 0 && wants_interrupt(q, used_before, event_idx))
            signal_eventfd(call);
        if (epfd < 0 || q->stopped || disk->failed || !only_kick_next(epfd, kick))
            return served;
    }
}
