/*
 * jailhouse: the lab's `jailhouse` command, a launcher for jhlab's Jailhouse tool
 * (harness.hvmodel.tool, Python).
 *
 * Every command pays the start of a program. In the lab's root cell (nested TCG) a
 * Python interpreter takes a few tenths of a second to start, more than most commands
 * take; this static binary takes a few hundredths. It hands the command to the driver
 * loader (harness.hvmodel.loader), which has the tool imported and runs it in a forked
 * child with this process's standard input, output and error, environment, working
 * directory and arguments, then reports how the child ended; this process ends the same
 * way. Signals it gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT) go to the child.
 *
 * Without a loader (its socket absent or refusing, or its code stale) it runs the tool
 * itself: exec python3 -IS on libexec/jailhouse beside this binary's directory.
 *
 * Wire (harness/hvmodel/loader.py): one JSON line with the descriptors 0, 1, 2 as
 * SCM_RIGHTS, {"op": "run", "argv": [...], "env": {...}, "cwd": "..."}; strings carry
 * the bytes as Python's surrogateescape does (ASCII as is, any other byte B as \udcBB).
 * Replies: {"result": 0, "pid": PID} (or a negative result: not served), then
 * {"exit": STATUS} (Popen.returncode: negative for a signal).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/jailhouse-loader.sock"
#define PYTHON "/usr/bin/python3"

extern char **environ;

static volatile pid_t child;
static volatile sig_atomic_t pending;

struct buf {
	char *data;
	size_t len, cap;
};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->len + n + 1) * 2;
		b->data = realloc(b->data, b->cap);
		if (!b->data) {
			perror("jailhouse: realloc");
			exit(1);
		}
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = 0;
}

/* A JSON string holding the bytes of s as Python's surrogateescape decoding would. */
static void put_string(struct buf *b, const char *s)
{
	char esc[8];

	put(b, "\"", 1);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\') {
			esc[0] = '\\';
			esc[1] = (char)*p;
			put(b, esc, 2);
		} else if (*p < 0x20 || *p == 0x7f) {
			snprintf(esc, sizeof(esc), "\\u%04x", *p);
			put(b, esc, 6);
		} else if (*p >= 0x80) {
			snprintf(esc, sizeof(esc), "\\udc%02x", *p);
			put(b, esc, 6);
		} else {
			put(b, (const char *)p, 1);
		}
	}
	put(b, "\"", 1);
}

static void fallback(char **argv)
{
	char self[PATH_MAX], script[PATH_MAX + 32];

	if (pending) {  /* a signal that came while asking the loader ends this command */
		signal((int)pending, SIG_DFL);
		raise((int)pending);
	}
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	char *slash;
	int argc = 0;

	if (n <= 0) {
		perror("jailhouse: /proc/self/exe");
		exit(1);
	}
	self[n] = 0;
	slash = strrchr(self, '/');
	if (slash)
		*slash = 0;
	snprintf(script, sizeof(script), "%s/../libexec/jailhouse", self);
	while (argv[argc])
		argc++;
	char **args = calloc((size_t)argc + 4, sizeof(char *));
	if (!args) {
		perror("jailhouse: calloc");
		exit(1);
	}
	args[0] = "python3";
	args[1] = "-IS";
	args[2] = script;
	for (int i = 1; i < argc; i++)
		args[i + 2] = argv[i];
	execv(PYTHON, args);
	execvp("python3", args);
	perror("jailhouse: python3");
	exit(1);
}

/* The next line from fd (without its newline); NULL at end of file. */
static char *read_line(int fd)
{
	static char data[4096];
	static size_t have;
	static char line[4096];

	for (;;) {
		char *end = memchr(data, '\n', have);
		if (end) {
			size_t n = (size_t)(end - data);
			memcpy(line, data, n);
			line[n] = 0;
			memmove(data, end + 1, have - n - 1);
			have -= n + 1;
			return line;
		}
		if (have == sizeof(data))
			return NULL;
		ssize_t got = read(fd, data + have, sizeof(data) - have);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return NULL;
		have += (size_t)got;
	}
}

/* The integer after "key": in a reply line; 0 and *found = 0 when it is not there. */
static long field(const char *line, const char *key, int *found)
{
	char pattern[32];
	const char *at;

	snprintf(pattern, sizeof(pattern), "\"%s\":", key);
	at = strstr(line, pattern);
	*found = at != NULL;
	return at ? strtol(at + strlen(pattern), NULL, 10) : 0;
}

/* Signals go to the command; one that comes before its pid is known waits for it. */
static void forward(int sig)
{
	if (child > 0)
		kill(child, sig);
	else
		pending = sig;
}

int main(int argc, char **argv)
{
	const char *path = getenv("JAILHOUSE_LOADER");
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct buf req = { 0 };
	char cwd[PATH_MAX];
	int fd, found;

	if (!path || !*path)
		path = DEFAULT_SOCKET;
	if (strlen(path) >= sizeof(addr.sun_path) || !getcwd(cwd, sizeof(cwd)))
		fallback(argv);
	strcpy(addr.sun_path, path);
	struct sigaction sa = { .sa_handler = forward };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGQUIT, &sa, NULL);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		fallback(argv);

	put(&req, "{\"op\":\"run\",\"argv\":[", 20);
	for (int i = 0; i < argc; i++) {
		if (i)
			put(&req, ",", 1);
		put_string(&req, argv[i]);
	}
	put(&req, "],\"env\":{", 9);
	int first = 1;
	for (char **e = environ; *e; e++) {
		char *eq = strchr(*e, '=');
		if (!eq)
			continue;
		*eq = 0;
		if (!first)
			put(&req, ",", 1);
		first = 0;
		put_string(&req, *e);
		*eq = '=';
		put(&req, ":", 1);
		put_string(&req, eq + 1);
	}
	put(&req, "},\"cwd\":", 8);
	put_string(&req, cwd);
	put(&req, "}\n", 2);

	int fds[3] = { 0, 1, 2 };
	char control[CMSG_SPACE(sizeof(fds))];
	struct iovec iov = { .iov_base = req.data, .iov_len = req.len };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = control, .msg_controllen = sizeof(control),
	};
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(cmsg), fds, sizeof(fds));
	ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
	if (sent < 0)
		fallback(argv);
	/* The rest, if the socket took only part (the descriptors went with the first). */
	for (size_t off = (size_t)sent; off < req.len; ) {
		ssize_t n = send(fd, req.data + off, req.len - off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fallback(argv);
		off += (size_t)n;
	}

	char *line = read_line(fd);
	if (!line || field(line, "result", &found) != 0 || !found)
		fallback(argv);  /* not served: nothing ran */
	pid_t pid = (pid_t)field(line, "pid", &found);
	if (!found || pid <= 0)
		fallback(argv);
	child = pid;
	if (pending)
		kill(child, pending);

	line = read_line(fd);
	long status = line ? field(line, "exit", &found) : 0;
	if (!line || !found) {
		fprintf(stderr, "jailhouse: the loader went away before the command ended\n");
		return 1;
	}
	if (status < 0) {  /* the command died of a signal: so does this process */
		signal((int)-status, SIG_DFL);
		raise((int)-status);
		return 128 - (int)status;
	}
	return (int)status;
}
