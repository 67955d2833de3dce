/*
 * vsock: a tiny netcat for AF_VSOCK, since busybox has none.
 *
 *   vsock listen PORT         accept one connection on PORT
 *   vsock connect CID PORT    connect to CID:PORT (the host is CID 2)
 *
 * Then stdin goes to the socket and the socket to stdout until both ends
 * are done; at the end of stdin the socket's sending side is shut down.
 * Built statically into the tiny guest's initramfs by scripts/build-guest.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int die(const char *what)
{
	fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
	return 1;
}

static int usage(void)
{
	fprintf(stderr, "usage: vsock listen PORT | vsock connect CID PORT\n");
	return 2;
}

/* Copy what can be read from fd `from` to fd `to`; 0 at end of input. */
static ssize_t pump(int from, int to)
{
	char buf[65536];
	ssize_t n = read(from, buf, sizeof(buf));

	for (ssize_t done = 0; n > 0 && done < n;) {
		ssize_t w = write(to, buf + done, n - done);
		if (w < 0)
			return -1;
		done += w;
	}
	return n;
}

int main(int argc, char **argv)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK };
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0)
		return die("socket");
	if (argc == 3 && !strcmp(argv[1], "listen")) {
		int one = 1, conn;

		addr.svm_cid = VMADDR_CID_ANY;
		addr.svm_port = strtoul(argv[2], NULL, 0);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) || listen(fd, 1))
			return die("bind/listen");
		conn = accept(fd, NULL, NULL);
		if (conn < 0)
			return die("accept");
		close(fd);
		fd = conn;
	} else if (argc == 4 && !strcmp(argv[1], "connect")) {
		addr.svm_cid = strtoul(argv[2], NULL, 0);
		addr.svm_port = strtoul(argv[3], NULL, 0);
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)))
			return die("connect");
	} else {
		return usage();
	}

	struct pollfd fds[2] = { { .fd = 0, .events = POLLIN }, { .fd = fd, .events = POLLIN } };
	while (fds[1].fd >= 0) {
		if (poll(fds, 2, -1) < 0)
			return die("poll");
		if (fds[0].revents) {
			ssize_t n = pump(0, fd);
			if (n < 0)
				return die("send");
			if (n == 0) {               /* end of stdin */
				shutdown(fd, SHUT_WR);
				fds[0].fd = -1;
			}
		}
		if (fds[1].revents) {
			ssize_t n = pump(fd, 1);
			if (n < 0)
				return die("receive");
			if (n == 0)                 /* the peer is done */
				fds[1].fd = -1;
		}
	}
	return 0;
}
