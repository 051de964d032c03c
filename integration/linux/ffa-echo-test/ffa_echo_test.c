// SPDX-License-Identifier: GPL-2.0-only
/*
 * hvcproxyd FF-A echo test module: an FF-A bus driver for hvcproxyd's echo
 * partition (hvcproxyd/handlers/ffa/echo.py, docs/handlers/ffa.md).  On probe
 * it sends one direct request (FFA_MSG_SEND_DIRECT_REQ, 64-bit unless the
 * driver marked the partition 32-bit) with recognizable data0..data4 and
 * checks that echo answers with the same payload; then it tries
 * FFA_MSG_SEND_DIRECT_REQ2, which the driver only sends if the firmware
 * offers it at the negotiated version (Linux 6.12's driver speaks FF-A 1.1,
 * REQ2 is 1.2, so it is expected to be refused with -EOPNOTSUPP).  Last, it
 * asks the driver for notification ECHO_NOTIFY_ID from echo and has echo
 * raise it (echo's NOTIFY command word): the callback runs from the
 * driver's notification pending interrupt (NPI) handler, which fetches the
 * pending bits with FFA_NOTIFICATION_GET.
 *
 * Every line is logged as "ffa-echo-test: ...":
 *   probe partition 0x8001 uuid <uuid> version 1.1 mode 64-bit
 *   request data0=0x... data1=0x... data2=0x... data3=0x... data4=0x...
 *   reply data0=0x... data1=0x... data2=0x... data3=0x... data4=0x... ok|MISMATCH
 *   req2 unsupported (-95) | req2 reply ... ok|MISMATCH | req2 error N
 *   notification N requested | notifications unavailable (N)
 *   notification N raised by echo status S
 *   notification N received on cpu C | notification N not received
 * The probe fails (-EIO) on a mismatch, so the device stays unbound.
 */

#define pr_fmt(fmt) "ffa-echo-test: " fmt

#include <linux/arm_ffa.h>
#include <linux/completion.h>
#include <linux/errno.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/uuid.h>

/*
 * No MODULE_DEVICE_TABLE: modpost has no alias type for the FF-A bus in 6.12;
 * the module is loaded by init-clients, not by udev.
 *
 * The echo partition's UUID in config/ffa.yaml (handlers.ffa.options
 * .partitions.echo.uuids[0]): a8f3b9e2-5b9c-4c7d-9f0e-3c8e2d6b1a01.
 * Change both together.
 */
static const struct ffa_device_id ffa_echo_test_ids[] = {
	{ UUID_INIT(0xa8f3b9e2, 0x5b9c, 0x4c7d,
		    0x9f, 0x0e, 0x3c, 0x8e, 0x2d, 0x6b, 0x1a, 0x01) },
	{}
};

/*
 * 64-bit words with distinct halves, none of them one of echo's command
 * words (0x45430001..0x45430003 in data0), so echo returns them unchanged.
 */
#define ECHO_WORD(i)	(0xec40ffa000000000ULL | 0xd0d0e0e0ULL | (i))

/* Echo's command word: raise notifications data1 (low) / data2 (high) */
#define ECHO_CMD_NOTIFY	0x45430003UL
#define ECHO_NOTIFY_ID	4

static DECLARE_COMPLETION(ffa_echo_notified);
static atomic_t ffa_echo_notified_cpu = ATOMIC_INIT(-1);

static void ffa_echo_notify_cb(int notify_id, void *cb_data)
{
	atomic_set(&ffa_echo_notified_cpu, raw_smp_processor_id());
	complete(&ffa_echo_notified);
}

/* Notifications are optional: without them, say so and pass. */
static int ffa_echo_notify(struct ffa_device *ffa_dev)
{
	const struct ffa_ops *ops = ffa_dev->ops;
	struct ffa_send_direct_data msg = {
		.data0 = ECHO_CMD_NOTIFY, .data1 = BIT(ECHO_NOTIFY_ID),
	};
	int rc;

	if (!ops->notifier_ops) {
		pr_info("notifications unavailable (no notifier_ops)\n");
		return 0;
	}
	rc = ops->notifier_ops->notify_request(ffa_dev, false,
					       ffa_echo_notify_cb, NULL,
					       ECHO_NOTIFY_ID);
	if (rc) {
		pr_info("notifications unavailable (%d)\n", rc);
		return 0;
	}
	pr_info("notification %d requested\n", ECHO_NOTIFY_ID);
	rc = ops->msg_ops->sync_send_receive(ffa_dev, &msg);
	pr_info("notification %d raised by echo status %d\n", ECHO_NOTIFY_ID,
		rc ?: (int)(u32)msg.data4);
	if (!rc && !msg.data4 &&
	    wait_for_completion_timeout(&ffa_echo_notified, 10 * HZ))
		pr_info("notification %d received on cpu %d\n", ECHO_NOTIFY_ID,
			atomic_read(&ffa_echo_notified_cpu));
	else
		pr_err("notification %d not received\n", ECHO_NOTIFY_ID);
	ops->notifier_ops->notify_relinquish(ffa_dev, ECHO_NOTIFY_ID);
	return 0;
}

static bool ffa_echo_check(const char *what, const unsigned long *got,
			   const unsigned long *want, size_t n)
{
	bool ok = !memcmp(got, want, n * sizeof(*got));

	pr_info("%s data0=0x%lx data1=0x%lx data2=0x%lx data3=0x%lx data4=0x%lx %s\n",
		what, got[0], got[1], got[2], got[3], got[4],
		ok ? "ok" : "MISMATCH");
	return ok;
}

static int ffa_echo_req2(struct ffa_device *ffa_dev)
{
	const struct ffa_msg_ops *ops = ffa_dev->ops->msg_ops;
	struct ffa_send_direct_data2 msg, want;
	size_t i;
	int rc;

	if (!ops->sync_send_receive2) {
		pr_info("req2 not in this kernel's ffa_msg_ops\n");
		return 0;
	}
	for (i = 0; i < ARRAY_SIZE(msg.data); i++)
		msg.data[i] = ECHO_WORD(0x10 + i);
	want = msg;
	rc = ops->sync_send_receive2(ffa_dev, &ffa_dev->uuid, &msg);
	if (rc == -EOPNOTSUPP) {
		pr_info("req2 unsupported (%d)\n", rc);
		return 0;
	}
	if (rc) {
		pr_err("req2 error %d\n", rc);
		return rc;
	}
	return ffa_echo_check("req2 reply", msg.data, want.data,
			      ARRAY_SIZE(msg.data)) ? 0 : -EIO;
}

static int ffa_echo_test_probe(struct ffa_device *ffa_dev)
{
	const struct ffa_ops *ops = ffa_dev->ops;
	struct ffa_send_direct_data msg = {
		.data0 = ECHO_WORD(0), .data1 = ECHO_WORD(1),
		.data2 = ECHO_WORD(2), .data3 = ECHO_WORD(3),
		.data4 = ECHO_WORD(4),
	};
	u32 version = ops->info_ops->api_version_get();
	unsigned long want[5], got[5];
	size_t i;
	int rc;

	pr_info("probe partition 0x%x uuid %pUb version %u.%u mode %s\n",
		ffa_dev->vm_id, &ffa_dev->uuid, version >> 16,
		version & 0xffff, ffa_dev->mode_32bit ? "32-bit" : "64-bit");
	pr_info("request data0=0x%lx data1=0x%lx data2=0x%lx data3=0x%lx data4=0x%lx\n",
		msg.data0, msg.data1, msg.data2, msg.data3, msg.data4);
	for (i = 0; i < ARRAY_SIZE(want); i++) {
		want[i] = ECHO_WORD(i);
		/* DIRECT_REQ32 carries w3..w7: the upper halves do not travel. */
		if (ffa_dev->mode_32bit)
			want[i] = lower_32_bits(want[i]);
	}
	rc = ops->msg_ops->sync_send_receive(ffa_dev, &msg);
	if (rc) {
		pr_err("direct request failed: %d\n", rc);
		return rc;
	}
	got[0] = msg.data0;
	got[1] = msg.data1;
	got[2] = msg.data2;
	got[3] = msg.data3;
	got[4] = msg.data4;
	if (!ffa_echo_check("reply", got, want, ARRAY_SIZE(got)))
		return -EIO;
	rc = ffa_echo_req2(ffa_dev);
	if (rc)
		return rc;
	return ffa_echo_notify(ffa_dev);
}

static void ffa_echo_test_remove(struct ffa_device *ffa_dev)
{
	pr_info("remove partition 0x%x\n", ffa_dev->vm_id);
}

static struct ffa_driver ffa_echo_test_driver = {
	.name = "ffa-echo-test",
	.probe = ffa_echo_test_probe,
	.remove = ffa_echo_test_remove,
	.id_table = ffa_echo_test_ids,
};
module_ffa_driver(ffa_echo_test_driver);

MODULE_DESCRIPTION("hvcproxyd integration test: a direct message round trip and a notification with the FF-A echo partition");
MODULE_LICENSE("GPL");
