// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * tee-test: a TEE client for the Linux OP-TEE test (integration/tests/test_linux_optee.py),
 * built static for arm64 into the client initramfs by integration/linux/build-kernel.sh.
 *
 * Talks to /dev/tee0 with the TEE subsystem's ioctls (include/uapi/linux/tee.h)
 * only, as libteec does, and checks what the reference TEE's TAs
 * (hvcproxyd/handlers/tee_proxy/reftee.py) must answer:
 *   echo TA: ECHO (shared memory in and out), REVERSE (in place), ADD (values),
 *            WHOAMI (the client ID the TEE sees);
 *   rpc TA:  SHM_ROUNDTRIP (the TEE allocates kernel shared memory through an
 *            RPC and frees it), GET_TIME (an RPC the kernel answers).
 * Prints "HVCTEST: tee ..." lines; exits 0 only if every check passed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/tee.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* 5e1f0c2a-7d4b-4c8e-9a61-0e2f4b6d8a10 and ...11, in octet order */
static const uint8_t ECHO_TA[16] = {0x5e, 0x1f, 0x0c, 0x2a, 0x7d, 0x4b, 0x4c, 0x8e,
				    0x9a, 0x61, 0x0e, 0x2f, 0x4b, 0x6d, 0x8a, 0x10};
static const uint8_t RPC_TA[16] = {0x5e, 0x1f, 0x0c, 0x2a, 0x7d, 0x4b, 0x4c, 0x8e,
				   0x9a, 0x61, 0x0e, 0x2f, 0x4b, 0x6d, 0x8a, 0x11};
enum { ECHO_CMD_ECHO, ECHO_CMD_REVERSE, ECHO_CMD_ADD, ECHO_CMD_WHOAMI };
enum { RPC_CMD_SHM_ROUNDTRIP, RPC_CMD_GET_TIME };
#define MAX_PARAMS 4

static int failures;

#define CHECK(cond, ...)                                                                                    \
	do {                                                                                                \
		if (!(cond)) {                                                                              \
			printf("HVCTEST: tee FAIL %s:%d: ", __FILE__, __LINE__);                            \
			printf(__VA_ARGS__);                                                                \
			printf("\n");                                                                       \
			failures++;                                                                         \
		}                                                                                           \
	} while (0)

struct shm {
	int fd;
	int id;
	size_t size;
	uint8_t *p;
};

static int shm_alloc(int tee, size_t size, struct shm *out)
{
	struct tee_ioctl_shm_alloc_data data = {.size = size};
	int fd = ioctl(tee, TEE_IOC_SHM_ALLOC, &data);

	if (fd < 0)
		return -errno;
	out->p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (out->p == MAP_FAILED) {
		close(fd);
		return -errno;
	}
	out->fd = fd;
	out->id = data.id;
	out->size = size;
	return 0;
}

static void shm_free(struct shm *s)
{
	munmap(s->p, s->size);
	close(s->fd);
}

static int open_session(int tee, const uint8_t uuid[16], uint32_t *session, uint32_t *ret)
{
	union {
		struct tee_ioctl_open_session_arg arg;
		uint8_t bytes[sizeof(struct tee_ioctl_open_session_arg)];
	} u;
	struct tee_ioctl_buf_data buf = {.buf_ptr = (uintptr_t)&u, .buf_len = sizeof(u)};

	memset(&u, 0, sizeof(u));
	memcpy(u.arg.uuid, uuid, 16);
	u.arg.clnt_login = TEE_IOCTL_LOGIN_PUBLIC;
	if (ioctl(tee, TEE_IOC_OPEN_SESSION, &buf) < 0)
		return -errno;
	*session = u.arg.session;
	*ret = u.arg.ret;
	return 0;
}

struct invoke {
	struct tee_ioctl_invoke_arg arg;
	struct tee_ioctl_param params[MAX_PARAMS];
};

static int invoke(int tee, struct invoke *inv)
{
	struct tee_ioctl_buf_data buf = {.buf_ptr = (uintptr_t)inv,
					 .buf_len = sizeof(inv->arg) + inv->arg.num_params * sizeof(inv->params[0])};

	return ioctl(tee, TEE_IOC_INVOKE, &buf) < 0 ? -errno : 0;
}

static void memref(struct tee_ioctl_param *p, uint64_t attr, struct shm *s, uint64_t size)
{
	p->attr = attr;
	p->a = 0;    /* offset in the shared memory */
	p->b = size;
	p->c = s->id;
}

static void value(struct tee_ioctl_param *p, uint64_t attr, uint64_t a, uint64_t b)
{
	p->attr = attr;
	p->a = a;
	p->b = b;
	p->c = 0;
}

static void start(struct invoke *inv, uint32_t func, uint32_t session, uint32_t n)
{
	memset(inv, 0, sizeof(*inv));
	inv->arg.func = func;
	inv->arg.session = session;
	inv->arg.num_params = n;
}

int main(void)
{
	struct tee_ioctl_version_data ver;
	struct shm in, out;
	struct invoke inv;
	uint32_t echo, rpc, ret;
	static const char msg[] = "hello from the normal world";
	int tee = open("/dev/tee0", O_RDWR), rc;
	size_t i, n = sizeof(msg) - 1;

	if (tee < 0) {
		printf("HVCTEST: tee FAIL open /dev/tee0: %s\n", strerror(errno));
		return 1;
	}
	CHECK(ioctl(tee, TEE_IOC_VERSION, &ver) == 0, "TEE_IOC_VERSION: %s", strerror(errno));
	CHECK(ver.impl_id == TEE_IMPL_ID_OPTEE, "impl_id %u", ver.impl_id);
	printf("HVCTEST: tee version impl=%u gen_caps=%#x\n", ver.impl_id, ver.gen_caps);

	rc = open_session(tee, ECHO_TA, &echo, &ret);
	CHECK(rc == 0 && ret == 0, "open echo: rc %d ret %#x", rc, ret);
	if (rc || ret)
		return 1;
	printf("HVCTEST: tee session echo=%u\n", echo);

	CHECK(shm_alloc(tee, 8192, &in) == 0 && shm_alloc(tee, 8192, &out) == 0, "TEE_IOC_SHM_ALLOC");
	memcpy(in.p, msg, n);
	memset(out.p, 0, out.size);
	start(&inv, ECHO_CMD_ECHO, echo, 2);
	memref(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INPUT, &in, n);
	memref(&inv.params[1], TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_OUTPUT, &out, out.size);
	rc = invoke(tee, &inv);
	CHECK(rc == 0 && inv.arg.ret == 0, "ECHO: rc %d ret %#x origin %u", rc, inv.arg.ret, inv.arg.ret_origin);
	CHECK(inv.params[1].b == n && memcmp(out.p, msg, n) == 0, "ECHO answered %llu bytes '%.*s'",
	      (unsigned long long)inv.params[1].b, (int)n, out.p);
	printf("HVCTEST: tee echo '%.*s'\n", (int)inv.params[1].b < (int)n ? (int)inv.params[1].b : (int)n, out.p);

	for (i = 0; i < 6000; i++)
		in.p[i] = (uint8_t)i;
	start(&inv, ECHO_CMD_REVERSE, echo, 1);
	memref(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_MEMREF_INOUT, &in, 6000);
	rc = invoke(tee, &inv);
	CHECK(rc == 0 && inv.arg.ret == 0, "REVERSE: rc %d ret %#x", rc, inv.arg.ret);
	for (i = 0; i < 6000; i++)
		if (in.p[i] != (uint8_t)(5999 - i))
			break;
	CHECK(i == 6000, "REVERSE: byte %zu is %u", i, in.p[i]);
	printf("HVCTEST: tee reverse %s\n", i == 6000 ? "ok" : "bad");

	start(&inv, ECHO_CMD_ADD, echo, 2);
	value(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT, 40, 2);
	value(&inv.params[1], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT, 0, 0);
	rc = invoke(tee, &inv);
	CHECK(rc == 0 && inv.arg.ret == 0 && inv.params[1].a == 42, "ADD: rc %d ret %#x a %llu", rc, inv.arg.ret,
	      (unsigned long long)inv.params[1].a);
	printf("HVCTEST: tee add %llu\n", (unsigned long long)inv.params[1].a);

	start(&inv, ECHO_CMD_WHOAMI, echo, 1);
	value(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT, 0, 0);
	rc = invoke(tee, &inv);
	CHECK(rc == 0 && inv.arg.ret == 0, "WHOAMI: rc %d ret %#x", rc, inv.arg.ret);
	printf("HVCTEST: tee client %llu\n", (unsigned long long)inv.params[0].a);

	rc = open_session(tee, RPC_TA, &rpc, &ret);
	CHECK(rc == 0 && ret == 0, "open rpc: rc %d ret %#x", rc, ret);
	start(&inv, RPC_CMD_SHM_ROUNDTRIP, rpc, 2);
	value(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT, 3 * 4096, 0);
	value(&inv.params[1], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT, 0, 0);
	rc = invoke(tee, &inv);
	CHECK(rc == 0 && inv.arg.ret == 0 && inv.params[1].a == 3 * 4096 && inv.params[1].b == 1,
	      "SHM_ROUNDTRIP: rc %d ret %#x size %llu freed %llu", rc, inv.arg.ret,
	      (unsigned long long)inv.params[1].a, (unsigned long long)inv.params[1].b);
	printf("HVCTEST: tee rpc-shm %llu freed=%llu\n", (unsigned long long)inv.params[1].a,
	       (unsigned long long)inv.params[1].b);
	{
		/*
		 * The driver answers GET_TIME from CLOCK_REALTIME, which starts at the epoch in a guest
		 * without an RTC: the answer must lie between two readings of that clock, not merely be
		 * nonzero (seconds are 0 in a guest that booted within the last second).
		 */
		struct timespec before, after;
		uint64_t got_ns, before_ns, after_ns;

		clock_gettime(CLOCK_REALTIME, &before);
		start(&inv, RPC_CMD_GET_TIME, rpc, 1);
		value(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT, 0, 0);
		rc = invoke(tee, &inv);
		clock_gettime(CLOCK_REALTIME, &after);
		got_ns = inv.params[0].a * 1000000000ull + inv.params[0].b;
		before_ns = before.tv_sec * 1000000000ull + before.tv_nsec;
		after_ns = after.tv_sec * 1000000000ull + after.tv_nsec;
		CHECK(rc == 0 && inv.arg.ret == 0 && inv.params[0].b < 1000000000ull && before_ns <= got_ns &&
			      got_ns <= after_ns,
		      "GET_TIME: rc %d ret %#x time %llu.%09llu outside [%lld.%09ld, %lld.%09ld]", rc, inv.arg.ret,
		      (unsigned long long)inv.params[0].a, (unsigned long long)inv.params[0].b,
		      (long long)before.tv_sec, before.tv_nsec, (long long)after.tv_sec, after.tv_nsec);
		printf("HVCTEST: tee rpc-time %llu.%09llu\n", (unsigned long long)inv.params[0].a,
		       (unsigned long long)inv.params[0].b);
	}

	{
		struct tee_ioctl_close_session_arg c1 = {.session = echo}, c2 = {.session = rpc};

		CHECK(ioctl(tee, TEE_IOC_CLOSE_SESSION, &c1) == 0 && ioctl(tee, TEE_IOC_CLOSE_SESSION, &c2) == 0,
		      "CLOSE_SESSION: %s", strerror(errno));
	}
	start(&inv, ECHO_CMD_ADD, echo, 2);
	value(&inv.params[0], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_INPUT, 1, 1);
	value(&inv.params[1], TEE_IOCTL_PARAM_ATTR_TYPE_VALUE_OUTPUT, 0, 0);
	rc = invoke(tee, &inv);
	CHECK(rc != 0 || inv.arg.ret != 0, "a closed session still answers");
	shm_free(&in);
	shm_free(&out);
	close(tee);
	printf("HVCTEST: tee %s (%d failures)\n", failures ? "FAILED" : "passed", failures);
	return failures ? 1 : 0;
}
